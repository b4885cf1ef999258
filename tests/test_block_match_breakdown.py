"""Tests for benchmarks/block_match_breakdown.py's table on constructed pages (no browser)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import block_match_breakdown as bmb  # noqa: E402

from phase1_jax import visual_metrics as vm  # noqa: E402
from phase1_jax.data.render import TextBlock  # noqa: E402

WORDS = 'amber birch cedar dune ember fjord grove heath inlet jade'.split()


def _page(texts, rng):
  """Blocks of the given texts in rows down a 400 x 600 page, random widths."""
  blocks = tuple(TextBlock(t, (8, 20 + 30 * i, int(rng.integers(40, 300)), 20), (0, 0, 0))
                 for i, t in enumerate(texts))
  return vm.PageRender(ok=True, width=400, height=600, blocks=blocks)


def _texts(rng, counts):
  return [' '.join(rng.choice(WORDS, n, replace=False)) for n in counts]


def test_buckets_shares_and_words_per_block():
  rng = np.random.default_rng()
  counts = [1, 2, 2, 3, 5, 1]
  reference = _page(_texts(rng, counts), rng)
  one_word = _page([t.split()[0] for t in (b.text for b in reference.blocks)], rng)
  out = bmb.breakdown({'same': [reference], 'first words': [one_word]}, [reference])
  areas = vm.block_areas_N(reference)
  bucket = np.asarray([min(n, 4) - 1 for n in counts])
  for k, name in enumerate(bmb.BUCKETS):
    assert out['reference'][name] == pytest.approx(areas[bucket == k].sum() / areas.sum(),
                                                   abs=1e-3)
    assert out['same'][name] == 1.0      # every block matched to itself
  # A block's first word alone matches every one-word block, no 5-word one (similarity < 0.5).
  assert out['first words']['1 word'] == 1.0
  assert out['first words']['4+ words'] == 0.0
  assert out['same']['words_per_block'] == out['reference']['words_per_block'] == round(
      np.mean(counts), 2)
  assert out['first words']['words_per_block'] == 1.0
