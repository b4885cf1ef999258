"""grain pipelines over a page source: shuffled training epochs, ordered evaluation batches.

Sources: data.name='synthetic' (SyntheticPages) or 'files' (records.FilePages over a prepared
directory, data.path); both give the same example dicts. Batches are dicts of numpy arrays with a
leading batch axis (see SyntheticPages for keys, shapes and dtypes). An epoch's order is a
function of (seed, epoch), so the iterator of epoch e at position k is reproducible from those
three numbers alone (and grain's iterator state holds k). With several JAX processes each takes a
disjoint, equal-sized slice of every epoch's order (train.batch_size is then per process).
"""
from __future__ import annotations

import dataclasses
import os

import grain
import numpy as np

from phase1_jax.data import bpe, records, synthetic, vocab


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Where a run's pages come from and their shapes (specs.data_spec reads config.data).
  name: 'synthetic' (SyntheticPages of `page`, seeded by `seed`) or 'files' (the prepared
  directory `path`); num_patches: P per page; patch_labels: the loss trains on patch labels,
  which a prepared directory must then hold; patch_words: batches hold patch_words int32
  [K, 2] (patch, token) pairs (records.patch_word_pairs), which it must then hold too."""
  name: str
  page: synthetic.PageSpec
  num_patches: int
  path: str = ''
  seed: int = 0
  train_samples: int = 0
  val_samples: int = 0
  patch_labels: bool = False
  patch_words: bool = False


# One error type for unusable data, whether a prepared directory's files (records.py: dataset.json,
# a shard, a record) or a source's records (CheckedSource: keys, shapes, dtypes): the CLIs catch
# it and print its one line, which names the file or the source and the record.
DataError = records.DatasetError


def record_spec(spec: synthetic.PageSpec,
                patches: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{key: (shape, dtype)} every page record must have (see SyntheticPages): P = `patches`
  (DataSpec.num_patches), by default the spec's grid_rows * grid_cols; F = spec.feature_dim."""
  t = spec.max_seq_len
  p = spec.grid_rows * spec.grid_cols if patches is None else patches
  i32, f32, b = np.dtype(np.int32), np.dtype(np.float32), np.dtype(bool)
  return {'features': ((p, spec.feature_dim), f32), 'feature_mask': ((p,), b),
          'inputs': ((t,), i32), 'targets': ((t,), i32), 'target_mask': ((t,), b),
          'semantic_labels': ((t,), i32), 'semantic_mask': ((t,), b),
          'element_labels': ((spec.num_element_types,), f32)}


class CheckedSource:
  """Wraps a random-access source; every record read is checked against `spec`, and a bad one
  raises DataError naming `name` and the index (instead of a shape error deep inside a batch)."""

  def __init__(self, source, name: str, fields: dict):
    self.source, self.name, self.fields = source, name, fields

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self.source[index]
    where = f'{self.name}[{index}]'
    if not isinstance(record, dict):
      raise DataError(f'{where}: record is a {type(record).__name__}, not a dict of arrays')
    missing = [k for k in self.fields if k not in record]
    if missing:
      raise DataError(f'{where}: record lacks {", ".join(missing)}')
    for key, (shape, dtype) in self.fields.items():
      value = np.asarray(record[key])
      if value.shape != shape or value.dtype != dtype:
        raise DataError(f'{where}: {key} is {value.dtype}{list(value.shape)}, expected '
                        f'{dtype}{list(shape)}')
    return record


def check_patch_fields(data: DataSpec) -> None:
  """DataError (one line naming dataset.json and the loss weight) when a patch loss is on and
  the prepared directory's records lack what it trains on."""
  meta = records.read_metadata(data.path)
  for on, field, what, weight in ((data.patch_labels, 'patch_labels', 'patch labels',
                                   'loss.patch_weight'),
                                  (data.patch_words, 'patch_words', 'patch words',
                                   'loss.patch_words_weight')):
    if on and not meta.get(field):
      raise DataError(f'{data.path}/{records.METADATA_FILE}: its records hold no {what}, which '
                      f'{weight} > 0 trains on (prepare --render writes them; or set '
                      f'{weight}=0)')


def make_source(data: DataSpec, split: str):
  """The random-access page source of a split ('train' or 'val'), record-checked."""
  if data.name == 'files':
    check_patch_fields(data)
    return records.FilePages(data.path, split, max_seq_len=data.page.max_seq_len,
                             num_patches=data.num_patches, patch_words=data.patch_words)
  n = {'train': data.train_samples, 'val': data.val_samples}[split]
  pages = synthetic.SyntheticPages(data.page, num_samples=n, seed=data.seed, split=split)
  return CheckedSource(pages, f'{data.name} {split} split',
                       record_spec(data.page, data.num_patches))


def element_open_tag_ids(data: DataSpec) -> tuple[int, ...]:
  """The detail token id of each element type's open tag (the consistency loss reads them): the
  fixed vocabulary's, or the prepared dataset's BPE ids (dataset.json)."""
  if data.name == 'files':
    ids = records.read_metadata(data.path).get('element_open_tag_ids')
    if ids is None:
      raise DataError(f'{data.path}/{records.METADATA_FILE}: no element_open_tag_ids (the '
                      'consistency loss reads them; prepare writes them)')
    return tuple(ids)
  return vocab.ELEMENT_OPEN_TAG_IDS


def steps_per_epoch(source, batch_size: int) -> int:
  """Full global batches per epoch."""
  return len(source) // batch_size


def train_iterator(source, *, batch_size: int, seed: int, epoch: int, shard_index: int = 0,
                   shard_count: int = 1):
  """Epoch `epoch`'s shuffled, full batches as a checkpointable grain iterator.

  `batch_size` is the global batch. With `shard_count` processes, process `shard_index` yields
  its `batch_size // shard_count` pages of every global batch: positions shard_index,
  shard_index + shard_count, ... of the epoch's order, so it generates only its own pages and
  global batch k holds the same pages whatever the number of processes.
  """
  ds = grain.MapDataset.source(source).shuffle(seed=seed * 100_003 + epoch)
  ds = ds[:steps_per_epoch(source, batch_size) * batch_size][shard_index::shard_count]
  ds = ds.batch(batch_size // shard_count, drop_remainder=True)
  read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
  return iter(ds.to_iter_dataset(read_options=read))


def eval_batches(source, *, batch_size: int, limit: int | None = None):
  """Pages in order, in batches of exactly `batch_size` so one compiled eval step serves all: the
  last batch is padded by repeating its final page, and `page_mask_B` marks the real pages.
  Yields (batch, num_real_pages)."""
  n = len(source) if limit is None else min(limit, len(source))
  ds = grain.MapDataset.source(source)[:n].batch(batch_size, drop_remainder=False)
  for batch in ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)):
    real = len(batch['features'])
    batch['page_mask'] = np.arange(batch_size) < real
    if real < batch_size:
      batch = {k: v if k == 'page_mask' else
               np.concatenate([v, np.repeat(v[-1:], batch_size - real, axis=0)])
               for k, v in batch.items()}
    yield batch, real


def markup_decoder(data: DataSpec, vocab_size: int):
  """token ids (before EOS) -> markup text: the fixed vocabulary's tokens joined by spaces, or
  the prepared dataset's byte-level BPE (data.name='files')."""
  if data.name == 'files':
    tokenizer = bpe.load(os.path.join(data.path, records.TOKENIZER_FILE))
    return lambda ids: bpe.decode(tokenizer, ids)
  id_to_token = vocab.id_to_token(vocab_size)
  return lambda ids: ' '.join(id_to_token[i] for i in ids)
