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
  patch_words     int32   [num_pairs, 2]     distinct (patch index, BPE token id) pairs: each
                                             token of the visible text on each patch it lies on
                                             (optional as patch_labels: `patch_words: true`)
and always:
  tokens          int32   [num_tokens]   detail token ids of the normalised markup (no BOS/EOS)
  semantic_labels int8    [num_tokens]   section class of each token, -1 outside every section
  element_labels  uint8   [num_element_types]  multi-hot element types of the page
  source_id       str     the page's path relative to the HTML folder
FilePages reads a split through grain's ArrayRecordDataSource (random access, never whole into
memory) and returns exactly SyntheticPages' example dict, padded or cut to the configured sizes;
a pixel page's features are Pix2Struct's flattened patches (see to_example).

This module writes and reads; record_format.py defines the fields and codes one record, and
record_checks.py validates dataset.json and the shards (their names are importable from here).
"""
from __future__ import annotations

import json
import os

import numpy as np
from array_record.python import array_record_module

from phase1_jax.data import synthetic
from phase1_jax.data.record_checks import check_shard, corrupt, decode_at, read_metadata

# The format lives in record_format.py; its names are re-exported here, where callers use them.
from phase1_jax.data.record_format import (  # noqa: F401
  ARRAY_FIELDS,
  FIELD_SHAPES,
  FORMAT,
  INPUT_FIELDS,
  INPUT_KINDS,
  KNOWN_FIELDS,
  LABEL_FIELDS,
  METADATA_FILE,
  OPTIONAL_FIELDS,
  PIXEL_ARRAY_FIELDS,
  READABLE_VERSIONS,
  TOKENIZER_FILE,
  VERSION,
  DatasetError,
  array_fields,
  decode_record,
  encode_record,
  input_kind,
  record_kind,
)

# A split whose shards total at most this many bytes is read whole when opened (about 0.2 s per
# 100 MB from the page cache), so a garbled record is named before anything compiles. Larger
# splits check each shard's first and last record; a bad record elsewhere is named when read.
VERIFY_ALL_BYTES = 128 << 20


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


def page_features(page: dict, num_patches: int) -> np.ndarray:
  """The page's first num_patches patch features, float32 [<= num_patches, F]. A pixel record's
  are Pix2Struct's flattened patches: [row, column, RGB pixels / 255...] (F = 2 + 3 ps^2)."""
  if 'patches' not in page:
    return page['features'][:num_patches]
  positions = page['patch_positions'][:num_patches].astype(np.float32)
  pixels = page['patches'][:num_patches].astype(np.float32) / np.float32(255)
  return np.concatenate([positions.reshape(len(positions), 2), pixels], axis=-1)


def patch_word_pairs(page: dict, num_patches: int, max_pairs: int) -> np.ndarray:
  """int32 [max_pairs, 2]: a pixel page's (patch, token) patch_words pairs on its first
  num_patches patches, padded with (-1, -1) rows (none for a page without them; it holds at most
  max_pairs). The pairs, not a [patches, vocab] multi-hot, travel in the batch: a page holds a
  few hundred, the multi-hot a million floats."""
  pairs = page.get('patch_words', np.zeros((0, 2), np.int32))
  pairs = pairs[pairs[:, 0] < min(num_patches, len(page['patches']))]
  out_Kx2 = np.full((max_pairs, 2), -1, np.int32)
  out_Kx2[:len(pairs)] = pairs
  return out_Kx2


def to_example(page: dict, *, max_seq_len: int, num_patches: int,
               element_open_tag_ids: np.ndarray | None = None,
               max_patch_words: int = 0) -> dict[str, np.ndarray]:
  """A record as SyntheticPages' example dict: tokens cut to max_seq_len - 1 (room for EOS),
  features (page_features) cut or zero-padded to num_patches (feature_mask marks the real
  ones), float32; a pixel page adds patch_labels int32 [num_patches, 2] (-2 where it has none)
  and, with `max_patch_words` K > 0, patch_words int32 [K, 2] (patch_word_pairs).
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
    if max_patch_words:
      extra['patch_words'] = patch_word_pairs(page, num_patches, max_patch_words)
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


class FilePages:
  """Random-access source of a prepared split: `pages[i]` is SyntheticPages' example dict. Its
  shards are checked when it is opened (check_shard: every record of a small split).
  patch_words: examples hold patch_words int32 [K, 2], K = dataset.json's max_patch_words
  (to_example)."""

  def __init__(self, directory: str, split: str, *, max_seq_len: int, num_patches: int,
               patch_words: bool = False):
    meta = read_metadata(directory)
    if split not in meta['splits']:
      raise DatasetError(f'{directory}: no split {split!r} in {METADATA_FILE}')
    self.directory, self.split, self.metadata = directory, split, meta
    self.max_seq_len, self.num_patches = max_seq_len, num_patches
    self.max_patch_words = meta.get('max_patch_words', 0) if patch_words else 0
    if patch_words and not self.max_patch_words:
      raise DatasetError(f'{directory}/{METADATA_FILE}: no max_patch_words (the length batches '
                         'pad patch_words to): prepare the directory again')
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
      raise corrupt(path, local, e) from None
    return decode_at(path, local, data)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    page = self.record(int(index))
    if len(page.get('patch_words', ())) > self.max_patch_words > 0:
      raise DatasetError(f'{self.directory}: {self.split} record {index} holds '
                         f'{len(page["patch_words"])} patch words, more than the max_patch_words '
                         f'{self.max_patch_words} of its {METADATA_FILE}')
    return to_example(page, max_seq_len=self.max_seq_len,
                      num_patches=self.num_patches,
                      element_open_tag_ids=self.element_open_tag_ids,
                      max_patch_words=self.max_patch_words)
