"""Checks of a prepared directory: dataset.json read and validated, shards opened and decoded.

A damaged dataset.json or shard is named in one line (a DatasetError naming the file, and the
record when one is bad) when the dataset is opened, not by a KeyError or a failure inside the
data loader's threads later. records.FilePages runs these checks when it opens a split.
"""
from __future__ import annotations

import json
import os

import msgpack
from array_record.python import array_record_module

from phase1_jax.data.record_format import (
  FORMAT,
  INPUT_KINDS,
  METADATA_FILE,
  READABLE_VERSIONS,
  DatasetError,
  decode_record,
  input_kind,
)

_READ_BATCH = 64


def read_metadata(directory: str, complete: bool = False) -> dict:
  """dataset.json of a prepared directory, checked for what the loader reads (the splits'
  shards), the types of the other keys it holds and, with `complete`, that it holds every key a
  training config reads: a damaged file is named in one line, not by a KeyError later."""
  path = os.path.join(directory, METADATA_FILE)
  try:
    with open(path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise DatasetError(f'{path}: not found (prepare the directory with '
                       'python -m phase1_jax.data.prepare)') from None
  except (OSError, ValueError) as e:
    raise DatasetError(f'{path}: unreadable ({e})') from None
  if not isinstance(meta, dict):
    raise DatasetError(f'{path}: holds a JSON {type(meta).__name__}, expected an object')
  if meta.get('format') != FORMAT or meta.get('version') not in READABLE_VERSIONS:
    raise DatasetError(f'{path}: format {meta.get("format")!r} version {meta.get("version")!r}, '
                       f'expected {FORMAT!r} version {" or ".join(map(str, READABLE_VERSIONS))}')
  kind = input_kind(meta)
  if kind not in INPUT_KINDS:
    raise DatasetError(f'{path}: input {kind!r}, expected one of {", ".join(INPUT_KINDS)}')
  for key in ('patch_size', 'max_patches') if kind == 'pixels' else ():
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise DatasetError(f'{path}: {key} {value!r}, a pixel dataset needs a positive integer')
  _check_fields(path, meta, complete)
  for split in ('train', 'val'):
    for shard in meta['splits'][split]['shards']:
      if not os.path.isfile(os.path.join(directory, shard)):
        raise DatasetError(f'{os.path.join(directory, shard)}: shard listed in {path} is missing')
  return meta


def _is_count(value, least: int = 0) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= least


# dataset.json keys the configs read: (what each must be, its check).
_METADATA_FIELDS = {
    'vocab_size': ('a positive integer', lambda v: _is_count(v, 1)),
    'feature_dim': ('a positive integer', lambda v: _is_count(v, 1)),
    'semantic_classes': ('a list of names', lambda v: isinstance(v, list)),
    'element_types': ('a list of names', lambda v: isinstance(v, list)),
    'element_open_tag_ids': ('a list of token ids',
                             lambda v: isinstance(v, list) and all(map(_is_count, v))),
}


def _check_fields(path: str, meta: dict, complete: bool) -> None:
  """Raises DatasetError naming the first ill-typed key of dataset.json `meta`, or a missing
  one: `splits` (the loader's), or with `complete` any _METADATA_FIELDS and record count."""
  for key, (want, ok) in _METADATA_FIELDS.items():
    if key not in meta and complete and key != 'element_open_tag_ids':   # pipeline names it
      raise DatasetError(f'{path}: no {key!r} (a prepared dataset.json has it)')
    if key in meta and not ok(meta[key]):
      raise DatasetError(f'{path}: {key} {meta[key]!r:.60} is not {want}')
  if not isinstance(meta.get('splits'), dict):
    raise DatasetError(f'{path}: no \'splits\' object (a prepared dataset.json lists the train '
                       'and val shards there)')
  for split in ('train', 'val'):
    entry = meta['splits'].get(split)
    ok = (isinstance(entry, dict) and isinstance(entry.get('shards'), list) and
          all(isinstance(s, str) for s in entry['shards']))
    count = entry.get('num_records') if ok else None
    if not ok or (count is None and complete) or not (count is None or _is_count(count)):
      raise DatasetError(f'{path}: splits.{split} {entry!r:.60} is not {{"num_records": N, '
                         '"shards": [paths]}')


def corrupt(path: str, index: int, error: Exception) -> DatasetError:
  """The error for record `index` of shard `path` that failed to read or decode with `error`."""
  return DatasetError(f'{path}: record {index} is corrupt ({error})')


def decode_at(path: str, index: int, data: bytes) -> dict:
  """decode_record(data), record `index` of shard `path`; DatasetError naming both if corrupt."""
  try:
    return decode_record(data)
  except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
    raise corrupt(path, index, e) from None


def _check_records(reader, path: str, indices) -> None:
  """Reads and decodes `indices` of an open shard in batches; a failed batch is read again one
  record at a time, to name the bad one."""
  for start in range(0, len(indices), _READ_BATCH):
    batch = list(indices[start:start + _READ_BATCH])
    try:
      datas = reader.read(batch)
    except RuntimeError:
      datas = None
    for i, index in enumerate(batch):
      try:
        data = reader.read([index])[0] if datas is None else datas[i]
      except RuntimeError as e:
        raise corrupt(path, index, e) from None
      decode_at(path, index, data)


def check_shard(path: str, every_record: bool = False) -> int:
  """Opens one ArrayRecord shard and decodes its first and last records (all of them with
  `every_record`); returns its record count. Raises DatasetError naming the file, and the
  record when one is bad: a truncated, overwritten or garbled shard fails here, in one line,
  instead of inside the data loader's threads."""
  try:
    reader = array_record_module.ArrayRecordReader(path)
  except (RuntimeError, OSError, ValueError) as e:
    raise DatasetError(f'{path}: not a readable ArrayRecord shard ({e})') from None
  try:
    if not reader.ok():
      raise DatasetError(f'{path}: not a readable ArrayRecord shard (truncated or overwritten)')
    n = reader.num_records()
    _check_records(reader, path, range(n) if every_record else sorted({0, n - 1} - {-1}))
    return n
  finally:
    try:
      reader.close()
    except RuntimeError:   # a failed reader's close repeats its (empty) error
      pass
