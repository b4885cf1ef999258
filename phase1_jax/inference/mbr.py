"""Minimum Bayes risk decoding: of K pages decoded for one screenshot, keep the one that agrees best
with the others (Kumar & Byrne 2004; the candidates stand in for draws from the model's
distribution over pages, so the choice maximises the expected utility under it).

The candidates are the greedy page and K - 1 pages sampled at decode.temperature (decode.top_k,
top_p). The utility is what the rendered evaluation scores, block match plus text similarity
(visual_metrics.block_scores), computed on the markup without rendering: each text node is a
block, its area its length in characters, its position its order. Greedy decoding alone closes a
text block after its first uncertain word (the closing tag is likelier than any one next word);
the samples write whole blocks, and the choice keeps the page whose blocks the others share.
Nothing here reads a reference.

Shape suffixes: K = candidates per page, B = pages, T = decoded length.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import lxml.etree
import lxml.html
import numpy as np

from phase1_jax import visual_metrics
from phase1_jax.data.render import TextBlock
from phase1_jax.inference import decoding
from phase1_jax.metrics import length_before_eos

HIDDEN = frozenset({'head', 'title', 'script', 'style', 'template', 'noscript'})
UTILITY = ('block_match', 'text')   # visual_metrics.block_scores terms, summed


def text_blocks(markup: str) -> visual_metrics.PageRender:
  """The markup's text nodes (whitespace collapsed, outside HIDDEN elements) as the blocks of a
  page in which block i spans (0, i) to (characters, i + 1): what block_scores needs, without a
  browser. Markup that does not parse has no blocks."""
  try:
    root = lxml.html.fromstring(markup) if markup.strip() else None
  except (lxml.etree.ParserError, ValueError):
    root = None
  texts = []
  for el in () if root is None else root.iter():
    if not isinstance(el.tag, str):   # comments, processing instructions
      continue
    parent = el.getparent()
    for text, owner in ((el.text, el), (el.tail, parent)):
      if text and (owner is None or owner.tag not in HIDDEN) and (text := ' '.join(text.split())):
        texts.append(text)
  blocks = tuple(TextBlock(t, (0.0, float(i), float(len(t)), 1.0), (0, 0, 0))
                 for i, t in enumerate(texts))
  return visual_metrics.PageRender(ok=True, width=float(max((len(t) for t in texts), default=1)),
                                   height=float(max(len(texts), 1)), blocks=blocks)


def utility(candidate: visual_metrics.PageRender, other: visual_metrics.PageRender) -> float:
  scores = visual_metrics.block_scores(candidate, other)
  return sum(scores[k] for k in UTILITY)


def choose(markups: Sequence[str]) -> int:
  """The index of the markup with the highest summed utility against all the others (ties: the
  first, so the greedy page when it is candidate 0)."""
  pages = [text_blocks(m) for m in markups]
  k = len(pages)
  utility_KxK = np.asarray([[utility(pages[a], pages[b]) if a != b else 0.0 for b in range(k)]
                            for a in range(k)])
  return int(np.argmax(utility_KxK.sum(1)))


def choose_rows(candidates: Sequence[dict], to_markup: Callable[[list[int]], str],
                eos_id: int) -> dict:
  """K decoded batches (decoding.generate's dicts, on the host) -> one: each page's chosen row."""
  tokens_KxBxT = np.stack([np.asarray(c['tokens']) for c in candidates])
  chosen_B = np.asarray([
      choose([to_markup(row[:length_before_eos(row, eos_id)].tolist()) for row in tokens_KxB])
      for tokens_KxB in tokens_KxBxT.transpose(1, 0, 2)])
  rows_B = np.arange(len(chosen_B))
  return {key: np.stack([np.asarray(c[key]) for c in candidates])[chosen_B, rows_B]
          for key in candidates[0]}


def generator(make: Callable[[decoding.DecodeSettings], Callable],
              settings: decoding.DecodeSettings, *,
              to_markup: Callable[[list[int]], str] | None,
              eos_id: int) -> Callable:
  """`make(settings)`: a compiled (params, features_BxPxF, feature_mask_BxP, rng) -> generate dict.
  For strategy 'mbr', a function of the same arguments returning the chosen pages (host numpy:
  the greedy page and settings.candidates - 1 samples, keys fold_in(rng, k)); otherwise
  make(settings) itself."""
  if settings.strategy != 'mbr':
    return make(settings)
  if to_markup is None:
    raise ValueError("decode.strategy='mbr' needs to_markup: its utility reads the markup")
  greedy = make(dataclasses.replace(settings, strategy='greedy'))
  sample = make(dataclasses.replace(settings, strategy='sample'))

  def generate(params, features_BxPxF, feature_mask_BxP, rng):
    outs = [greedy(params, features_BxPxF, feature_mask_BxP, rng)]
    outs += [sample(params, features_BxPxF, feature_mask_BxP, jax.random.fold_in(rng, k))
             for k in range(1, settings.candidates)]
    return choose_rows(jax.device_get(outs), to_markup, eos_id)
  return generate
