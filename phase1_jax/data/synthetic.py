"""Procedural synthetic UI pages, deterministic in (seed, split, index).

A page is a vertical stack of 1..max_sections sections. Each section has a semantic class and holds
1..max_elements_per_section elements whose types follow a class-dependent distribution; each element
carries 0..max_words_per_element words from a class-dependent part of the lexicon.

The targets are the page's markup and labels; the input is a rendered layout:
  features_PxF: the page as grid_rows x grid_cols patches (row-major, P = rows * cols). Each section
    owns a band of rows (rows shared out by element count); inside a band the elements take runs of
    patches in reading order. A patch is the sum of fixed random embeddings of its section class,
    its element type, its row, its column, and one word of its element's text (patch j of an element
    shows word j, each word visible with probability text_visibility), plus N(0, feature_noise^2).
So the markup is recoverable from the features up to noise, hidden words and long elements.

The "world" (embeddings, class -> element and word preferences) is fixed by WORLD_SEED, so every
split and every data seed describes the same world; `seed` only changes which pages are drawn.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from phase1_jax.data import vocab

WORLD_SEED = 20240101
SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}


@dataclasses.dataclass(frozen=True)
class PageSpec:
  """Sizes of the generated pages and arrays."""
  max_seq_len: int = 128
  num_semantic_classes: int = 50
  num_element_types: int = 30
  grid_rows: int = 16
  grid_cols: int = 4
  feature_dim: int = 64
  feature_noise: float = 0.5
  text_visibility: float = 0.8
  min_sections: int = 1
  max_sections: int = 8
  max_elements_per_section: int = 3
  max_words_per_element: int = 2

  def __post_init__(self):
    if self.num_semantic_classes > len(vocab.SEMANTIC_CLASSES):
      raise ValueError(f'num_semantic_classes={self.num_semantic_classes}: the synthetic pages '
                       f'know {len(vocab.SEMANTIC_CLASSES)} classes')
    if self.num_element_types > len(vocab.ELEMENT_TYPES):
      raise ValueError(f'num_element_types={self.num_element_types}: the synthetic pages know '
                       f'{len(vocab.ELEMENT_TYPES)} element types')
    if self.max_seq_len < 9:
      raise ValueError(f'max_seq_len={self.max_seq_len}: a one-element page needs 9 tokens')


class World:
  """Fixed random embeddings and class preferences shared by all splits."""

  def __init__(self, spec: PageSpec):
    rng = np.random.default_rng(WORLD_SEED)
    f = spec.feature_dim
    n_cls, n_el = len(vocab.SEMANTIC_CLASSES), len(vocab.ELEMENT_TYPES)
    emb = lambda n: rng.standard_normal((n, f)).astype(np.float32)
    self.class_emb, self.element_emb = emb(n_cls), emb(n_el)
    self.row_emb, self.col_emb = emb(spec.grid_rows), emb(spec.grid_cols)
    self.word_emb = emb(len(vocab.WORDS))
    self.section_tag = rng.integers(0, len(vocab.SECTION_TAGS), n_cls)
    # Element distribution per class: signature types carry most of the mass.
    self.element_probs = np.zeros((spec.num_semantic_classes, spec.num_element_types))
    for c in range(spec.num_semantic_classes):
      name = vocab.SEMANTIC_CLASSES[c]
      sig = [vocab.ELEMENT_TYPES.index(e) for e in vocab.SIGNATURE_ELEMENTS.get(name, ())]
      sig = [e for e in sig if e < spec.num_element_types]
      if not sig:
        sig = list(rng.choice(spec.num_element_types, 3, replace=False))
      p = np.full(spec.num_element_types, 0.15 / spec.num_element_types)
      p[sig] += 0.85 / len(sig)
      self.element_probs[c] = p / p.sum()
    # Each class talks about a few dozen words of the lexicon, mostly.
    n_words = len(vocab.WORDS)
    self.class_words = np.stack([rng.choice(n_words, 24, replace=False) for _ in range(n_cls)])
    self.word_ids = np.array([vocab.TOKEN_TO_ID[w] for w in vocab.WORDS])



def decoder_arrays(tokens, max_seq_len: int):
  """Teacher forcing of a page's n < max_seq_len tokens: inputs = BOS + tokens, targets =
  tokens + EOS, PAD after; both int32 [max_seq_len]."""
  n = len(tokens)
  inputs = np.full(max_seq_len, vocab.PAD_ID, np.int32)
  targets = np.full(max_seq_len, vocab.PAD_ID, np.int32)
  inputs[0] = vocab.BOS_ID
  inputs[1:n + 1] = tokens
  targets[:n] = tokens
  targets[n] = vocab.EOS_ID
  return inputs, targets


class SyntheticPages:
  """Random-access source of pages: `pages[i]` is a dict of numpy arrays (grain-compatible).

  Arrays of one page (T = max_seq_len, P = grid_rows * grid_cols, F = feature_dim, E = types):
    features_PxF float32, feature_mask_P bool,
    inputs_T int32 (BOS + tokens), targets_T int32 (tokens + EOS), target_mask_T bool,
    semantic_labels_T int32 (section class of each target token), semantic_mask_T bool
    (target tokens inside a section: not EOS, not PAD), element_labels_E float32 multi-hot.
  Dict keys drop the shape suffix: 'features', 'feature_mask', 'inputs', ...
  """

  def __init__(self, spec: PageSpec, *, num_samples: int, seed: int, split: str = 'train'):
    if split not in SPLIT_IDS:
      raise ValueError(f'split={split!r}: must be one of {", ".join(SPLIT_IDS)}')
    self.spec, self.num_samples, self.seed, self.split = spec, num_samples, seed, split
    self._world = World(spec)

  def __len__(self) -> int:
    return self.num_samples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.num_samples:
      raise IndexError(f'{self.split} page index {index} out of range [0, {self.num_samples})')
    rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], int(index)])
    return self._render(self._draw_page(rng), rng)

  def _draw_page(self, rng) -> list[tuple[int, list[tuple[int, list[int]]]]]:
    """[(class, [(element_type, [word token ids])])], trimmed so the markup fits max_seq_len."""
    s, w = self.spec, self._world
    num_sections = rng.integers(s.min_sections, s.max_sections + 1)
    page, length = [], 1  # +1 for EOS
    for _ in range(num_sections):
      cls = int(rng.integers(s.num_semantic_classes))
      elements = []
      for _ in range(rng.integers(1, s.max_elements_per_section + 1)):
        etype = int(rng.choice(s.num_element_types, p=w.element_probs[cls]))
        n = rng.integers(0, s.max_words_per_element + 1)
        pool = w.class_words[cls] if rng.random() < 0.85 else np.arange(len(vocab.WORDS))
        elements.append((etype, [int(x) for x in rng.choice(pool, n)]))
      cost = 5 + sum(3 + len(words) for _, words in elements)
      if length + cost > s.max_seq_len:
        break
      page.append((cls, elements))
      length += cost
    if not page:  # the first section alone is too long: keep one short element of it
      page = [(cls, [(elements[0][0], [])])]
    return page

  def _render(self, page, rng) -> dict[str, np.ndarray]:
    s, w = self.spec, self._world
    tok = vocab.TOKEN_TO_ID
    tokens, sem = [], []
    for cls, elements in page:
      tag = vocab.SECTION_TAGS[w.section_tag[cls]]
      sec = [tok[f'<{tag}'], tok['class='], tok[f'"{vocab.SEMANTIC_CLASSES[cls]}"'], tok['>']]
      for etype, words in elements:
        etag = vocab.ELEMENT_TAGS[etype]
        sec += [tok[f'<{etag}'], tok['>'], *w.word_ids[words], tok[f'</{etag}>']]
      sec.append(tok[f'</{tag}>'])
      tokens += sec
      sem += [cls] * len(sec)

    t = s.max_seq_len
    n = len(tokens)
    inputs, targets = decoder_arrays(tokens, t)
    semantic = np.zeros(t, np.int32)
    semantic[:n] = sem
    element_labels = np.zeros(s.num_element_types, np.float32)
    for _, elements in page:
      for etype, _ in elements:
        element_labels[etype] = 1.0

    return {
        'features': self._features(page, rng),
        'feature_mask': np.ones(s.grid_rows * s.grid_cols, bool),
        'inputs': inputs,
        'targets': targets,
        'target_mask': np.arange(t) <= n,
        'semantic_labels': semantic,
        'semantic_mask': np.arange(t) < n,
        'element_labels': element_labels,
    }

  def _features(self, page, rng) -> np.ndarray:
    s = self.spec
    return layout_features(page, self._world, grid_rows=s.grid_rows, grid_cols=s.grid_cols,
                           text_visibility=s.text_visibility, feature_noise=s.feature_noise,
                           rng=rng)


def layout_features(page, world: World, *, grid_rows: int, grid_cols: int, text_visibility: float,
                    feature_noise: float, rng) -> np.ndarray:
  """The rendered layout features_PxF (P = grid_rows * grid_cols) of a page
  [(class or None, [(element type, [word indices into vocab.WORDS])])], as the module docstring
  describes. Shared with the HTML converter so models transfer between the two datasets; a class
  of None (content outside any section) adds no class embedding. At most grid_rows sections."""
  rows, cols, w = grid_rows, grid_cols, world
  if not 0 < len(page) <= rows:
    raise ValueError(f'layout_features: {len(page)} sections for {rows} rows')
  # Share rows out by element count, at least one row per section.
  counts = np.array([len(el) for _, el in page], float)
  spare_rows = rows - len(page)
  band = np.ones(len(page), int) + np.floor(counts / max(counts.sum(), 1) * spare_rows).astype(int)
  band[np.argsort(-counts, kind='stable')[:rows - band.sum()]] += 1
  feats = np.zeros((rows, cols, w.row_emb.shape[-1]), np.float32)
  feats += w.row_emb[:rows, None] + w.col_emb[None, :cols]
  row = 0
  for (cls, elements), n_rows in zip(page, band, strict=True):
    patches = n_rows * cols
    # Element k owns patches [start_k, start_{k+1}) of the band, in reading order.
    starts = (np.arange(len(elements) + 1) * patches) // max(len(elements), 1)
    for k, (etype, words) in enumerate(elements):
      for j, p in enumerate(range(starts[k], starts[k + 1])):
        r, c = row + p // cols, p % cols
        feats[r, c] += w.element_emb[etype] if cls is None else (
            w.class_emb[cls] + w.element_emb[etype])
        if j < len(words) and rng.random() < text_visibility:
          feats[r, c] += w.word_emb[words[j]]
    row += n_rows
  feats += feature_noise * rng.standard_normal(feats.shape).astype(np.float32)
  return feats.reshape(rows * cols, -1)
