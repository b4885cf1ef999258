"""What a record and dataset.json hold, and the codec of one record (records.py describes the
layout of a prepared directory and each field).

Kept apart from records.py so that the checks of a prepared directory (record_checks.py) and the
reader and writer (records.py) share one definition of the format without importing each other.
"""
from __future__ import annotations

import msgpack
import numpy as np

# Version 2 added pixel records (dataset.json `input`); version 1 directories still read.
FORMAT, VERSION = 'phase1_jax.page_records', 2
READABLE_VERSIONS = (1, 2)
METADATA_FILE, TOKENIZER_FILE = 'dataset.json', 'tokenizer.json'
INPUT_KINDS = ('features', 'pixels')
# The array fields of each input kind, then the labels every record holds.
INPUT_FIELDS = {'features': {'features': 'float16'},
                'pixels': {'patches': 'uint8', 'patch_positions': 'int16'}}
LABEL_FIELDS = {'tokens': 'int32', 'semantic_labels': 'int8', 'element_labels': 'uint8'}
# Fields a record of an input kind may hold besides array_fields(kind).
OPTIONAL_FIELDS = {'features': {}, 'pixels': {'patch_labels': 'int8', 'patch_words': 'int32'}}


def array_fields(kind: str = 'features') -> dict[str, str]:
  """{field: dtype} of a record of input `kind` (INPUT_KINDS), in the order records list them."""
  return INPUT_FIELDS[kind] | LABEL_FIELDS


ARRAY_FIELDS = array_fields('features')        # a features record (what version 1 holds)
PIXEL_ARRAY_FIELDS = array_fields('pixels')    # a pixel record
KNOWN_FIELDS = ARRAY_FIELDS | PIXEL_ARRAY_FIELDS | OPTIONAL_FIELDS['pixels']
FIELD_SHAPES = {'features': ['num_patches', 'feature_dim'],
                'patches': ['num_patches', 'patch_pixels'], 'patch_positions': ['num_patches', 2],
                'patch_labels': ['num_patches', 2], 'patch_words': ['num_pairs', 2],
                'tokens': ['num_tokens'], 'semantic_labels': ['num_tokens'],
                'element_labels': ['num_element_types']}


class DatasetError(ValueError):
  """A prepared dataset directory or record is unusable; one line naming the file or record.
  (pipeline.DataError is this class: the CLIs catch it.)"""


def record_kind(page: dict) -> str:
  """The input kind of a page dict or decoded record: 'pixels' if it holds patches."""
  kind = 'pixels' if 'patches' in page else 'features'
  for name in array_fields(kind):
    if name not in page:
      raise KeyError(f'{name!r} (a {kind} record holds {", ".join(array_fields(kind))})')
  return kind


def encode_record(page: dict) -> bytes:
  """One page dict (array_fields(kind) arrays + 'source_id') -> record bytes."""
  out = {'source_id': str(page['source_id'])}
  kind = record_kind(page)
  fields = array_fields(kind) | {k: v for k, v in OPTIONAL_FIELDS[kind].items() if k in page}
  for name, dtype in fields.items():
    a = np.ascontiguousarray(page[name], dtype=dtype)
    out[name] = {'dtype': dtype, 'shape': list(a.shape), 'data': a.tobytes()}
  return msgpack.packb(out, use_bin_type=True)


def decode_record(data: bytes) -> dict:
  """Record bytes -> page dict of the array fields it holds (either input kind)."""
  raw = msgpack.unpackb(data, raw=False)
  page = {'source_id': raw['source_id']}
  for name in KNOWN_FIELDS:
    if name in raw:
      f = raw[name]
      page[name] = np.frombuffer(f['data'], dtype=f['dtype']).reshape(f['shape'])
  record_kind(page)
  return page


def input_kind(meta: dict) -> str:
  """dataset.json's input kind: 'features' when it names none (version 1)."""
  return meta.get('input', 'features')
