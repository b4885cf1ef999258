"""The on-disk page dataset: ArrayRecord shards of msgpack records, described by dataset.json.

Layout of a prepared directory DIR (see docs/dataset.md, "On disk"):
  DIR/dataset.json            fields, vocabulary, label names, split shard lists, summary
  DIR/tokenizer.json          the byte-level BPE (Hugging Face `tokenizers`) of the detail tokens
  DIR/train/train-00000.array_record, ...   (group_size 1: each record is read alone)
  DIR/val/val-00000.array_record, ...

One record is a msgpack map of one page (arrays as {'dtype', 'shape', 'data': raw bytes}). Its
input is one of two kinds, dataset.json's `input` ('features' when absent; version 1 directories
hold features only):
  features        float16 [num_patches, feature_dim]  rendered layout or user features
or, input 'pixels' (dataset.json also gives `patch_size` and `max_patches`):
  patches         uint8   [num_patches, patch_size * patch_size * 3]  RGB, (y, x, channel) order
  patch_positions int16   [num_patches, 2]   each patch's (row, column) in the screenshot
  patch_labels    int8    [num_patches, 2]   each patch's (section class, element type) from the
                                             rendered boxes, -1 for none (optional: datasets
                                             prepared before it lack it; dataset.json says
                                             `patch_labels: true` when every record has it)
and always:
  tokens          int32   [num_tokens]   detail token ids of the normalised markup (no BOS/EOS)
  semantic_labels int8    [num_tokens]   section class of each token, -1 outside every section
  element_labels  uint8   [num_element_types]  multi-hot element types of the page
  source_id       str     the page's path relative to the HTML folder
FilePages reads a split through grain's ArrayRecordDataSource (random access, never whole into
memory) and returns exactly SyntheticPages' example dict, padded or cut to the configured sizes;
a pixel page's features are Pix2Struct's flattened patches (see to_example).
"""
from __future__ import annotations

import json
import os

import msgpack
import numpy as np
from array_record.python import array_record_module

from phase1_jax.data import synthetic

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
OPTIONAL_FIELDS = {'features': {}, 'pixels': {'patch_labels': 'int8'}}


def array_fields(kind: str = 'features') -> dict[str, str]:
  """{field: dtype} of a record of input `kind` (INPUT_KINDS), in the order records list them."""
  return INPUT_FIELDS[kind] | LABEL_FIELDS


ARRAY_FIELDS = array_fields('features')        # a features record (what version 1 holds)
PIXEL_ARRAY_FIELDS = array_fields('pixels')    # a pixel record
KNOWN_FIELDS = ARRAY_FIELDS | PIXEL_ARRAY_FIELDS | OPTIONAL_FIELDS['pixels']
FIELD_SHAPES = {'features': ['num_patches', 'feature_dim'],
                'patches': ['num_patches', 'patch_pixels'], 'patch_positions': ['num_patches', 2],
                'patch_labels': ['num_patches', 2],
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


class ShardWriter:
  """Writes records of one split into DIR/split/split-NNNNN.array_record, a new shard every
  `records_per_shard` records. `shards` and `count` describe what was written."""

  def __init__(self, directory: str, split: str, records_per_shard: int = 1000):
    self.directory, self.split, self.per_shard = directory, split, records_per_shard
    os.makedirs(os.path.join(directory, split), exist_ok=True)
    self.shards, self.count, self._writer, self._in_shard = [], 0, None, 0

  def write(self, page: dict):
    if self._writer is None or self._in_shard == self.per_shard:
      self._close_shard()
      rel = os.path.join(self.split, f'{self.split}-{len(self.shards):05d}.array_record')
      self._writer = array_record_module.ArrayRecordWriter(
          os.path.join(self.directory, rel), 'group_size:1')
      self.shards.append(rel)
    self._writer.write(encode_record(page))
    self._in_shard += 1
    self.count += 1

  def _close_shard(self):
    if self._writer is not None:
      self._writer.close()
    self._writer, self._in_shard = None, 0

  def close(self):
    self._close_shard()


def write_metadata(directory: str, metadata: dict):
  tmp = os.path.join(directory, METADATA_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(metadata, f, indent=1)
  os.replace(tmp, os.path.join(directory, METADATA_FILE))


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


def input_kind(meta: dict) -> str:
  """dataset.json's input kind: 'features' when it names none (version 1)."""
  return meta.get('input', 'features')


def page_features(page: dict, num_patches: int) -> np.ndarray:
  """The page's first num_patches patch features, float32 [<= num_patches, F]. A pixel record's
  are Pix2Struct's flattened patches: [row, column, RGB pixels / 255...] (F = 2 + 3 ps^2)."""
  if 'patches' not in page:
    return page['features'][:num_patches]
  positions = page['patch_positions'][:num_patches].astype(np.float32)
  pixels = page['patches'][:num_patches].astype(np.float32) / np.float32(255)
  return np.concatenate([positions.reshape(len(positions), 2), pixels], axis=-1)


def to_example(page: dict, *, max_seq_len: int, num_patches: int,
               element_open_tag_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """A record as SyntheticPages' example dict: tokens cut to max_seq_len - 1 (room for EOS),
  features (page_features) cut or zero-padded to num_patches (feature_mask marks the real
  ones), float32; a pixel page adds patch_labels int32 [num_patches, 2] (-2 where it has none).
  With `element_open_tag_ids` (the dataset's, one per element type), an element
  label holds only when its open tag is among the tokens kept: labels and target describe the
  same window of a long page."""
  t = max_seq_len
  tokens = page['tokens'][:t - 1]
  sem = page['semantic_labels'][:t - 1]
  n = len(tokens)
  inputs, targets = synthetic.decoder_arrays(tokens, t)
  semantic = np.zeros(t, np.int32)
  semantic[:n] = np.maximum(sem, 0)
  semantic_mask = np.zeros(t, bool)
  semantic_mask[:n] = sem >= 0          # tokens outside every section carry no class
  element_labels = page['element_labels'].astype(np.float32)
  if element_open_tag_ids is not None:
    element_labels *= np.isin(element_open_tag_ids, tokens)
  real = page_features(page, num_patches)
  p = len(real)
  features = np.zeros((num_patches, real.shape[-1]), np.float32)
  features[:p] = real
  extra = {}
  if 'patches' in page:   # -2: no label (padding, or a record without patch labels)
    extra['patch_labels'] = np.full((num_patches, 2), -2, np.int32)
    if 'patch_labels' in page:
      extra['patch_labels'][:p] = page['patch_labels'][:num_patches]
  return {**extra,
      'features': features,
      'feature_mask': np.arange(num_patches) < p,
      'inputs': inputs,
      'targets': targets,
      'target_mask': np.arange(t) <= n,
      'semantic_labels': semantic,
      'semantic_mask': semantic_mask,
      'element_labels': element_labels,
  }


# A split whose shards total at most this many bytes is read whole when opened (about 0.2 s per
# 100 MB from the page cache), so a garbled record is named before anything compiles. Larger
# splits check each shard's first and last record; a bad record elsewhere is named when read.
VERIFY_ALL_BYTES = 128 << 20
_READ_BATCH = 64


def _corrupt(path: str, index: int, error: Exception) -> DatasetError:
  return DatasetError(f'{path}: record {index} is corrupt ({error})')


def _decoded(path: str, index: int, data: bytes) -> dict:
  try:
    return decode_record(data)
  except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
    raise _corrupt(path, index, e) from None


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
        raise _corrupt(path, index, e) from None
      _decoded(path, index, data)


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


class FilePages:
  """Random-access source of a prepared split: `pages[i]` is SyntheticPages' example dict. Its
  shards are checked when it is opened (check_shard: every record of a small split)."""

  def __init__(self, directory: str, split: str, *, max_seq_len: int, num_patches: int):
    meta = read_metadata(directory)
    if split not in meta['splits']:
      raise DatasetError(f'{directory}: no split {split!r} in {METADATA_FILE}')
    self.directory, self.split, self.metadata = directory, split, meta
    self.max_seq_len, self.num_patches = max_seq_len, num_patches
    ids = meta.get('element_open_tag_ids')
    self.element_open_tag_ids = None if ids is None else np.array(ids)
    self.shards = [os.path.join(directory, s) for s in meta['splits'][split]['shards']]
    every = sum(os.path.getsize(s) for s in self.shards) <= VERIFY_ALL_BYTES
    counts = [check_shard(s, every) for s in self.shards]
    self._starts = np.cumsum([0, *counts])     # the split index of each shard's first record
    import grain  # here, not at import: grain loads jax, which writing records never needs
    self._source = grain.sources.ArrayRecordDataSource(self.shards) if self.shards else []

  def __len__(self) -> int:
    return len(self._source)

  def record(self, index: int) -> dict:
    """The decoded record `index` of the split; DatasetError naming its shard and its index
    there when it cannot be read."""
    if not 0 <= index < len(self):
      raise IndexError(f'{self.split} record {index} out of range [0, {len(self)})')
    shard = int(np.searchsorted(self._starts, index, side='right')) - 1
    path, local = self.shards[shard], index - int(self._starts[shard])
    try:
      data = self._source[index]
    except RuntimeError as e:     # Riegeli: a chunk's hash or framing is wrong
      raise _corrupt(path, local, e) from None
    return _decoded(path, local, data)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return to_example(self.record(int(index)), max_seq_len=self.max_seq_len,
                      num_patches=self.num_patches,
                      element_open_tag_ids=self.element_open_tag_ids)
