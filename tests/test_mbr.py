"""Minimum Bayes risk decoding (inference/mbr.py): markup text blocks, the consensus choice, the
row gather, and the generator against its candidates decoded one by one."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from support import SEQ

from phase1_jax import config as config_lib
from phase1_jax import specs
from phase1_jax.inference import decoding, mbr

IDS = decoding.TokenIds(bos=1, eos=2, pad=0)


def test_text_blocks_are_visible_text_nodes_in_order():
  page = mbr.text_blocks('<html><head><title>T</title><style>p{}</style></head><body>'
                         '<nav><a>Home</a> <a>News  of\nthe day</a></nav>'
                         '<p>Lead <b>bold</b> tail</p><script>x=1</script><!-- c --></body></html>')
  assert [b.text for b in page.blocks] == ['Home', 'News of the day', 'Lead', 'bold', 'tail']
  assert [b.box for b in page.blocks][:2] == [(0.0, 0.0, 4.0, 1.0), (0.0, 1.0, 15.0, 1.0)]
  for empty in ('', '   ', '<div><span></span></div>'):
    assert mbr.text_blocks(empty).blocks == ()


def test_utility_of_a_page_with_itself_is_two_and_of_disjoint_text_zero():
  a, b = mbr.text_blocks('<p>red apple</p><p>blue sky</p>'), mbr.text_blocks('<p>qqqq zzzz</p>')
  assert mbr.utility(a, a) == 2.0
  assert mbr.utility(a, b) == 0.0


def test_choose_keeps_the_consensus_and_breaks_ties_to_the_first():
  words = np.random.default_rng().choice(['alpha', 'bravo', 'delta', 'omega', 'sigma'], 3,
                                         replace=False)
  shared = f'<h1>{words[0]} {words[1]}</h1><p>{words[2]}</p>'
  outlier = '<h1>zzzzzzzz</h1>'
  assert mbr.choose([outlier, shared, shared + '<p>x</p>', shared]) == 1
  assert mbr.choose([shared, shared]) == 0
  assert mbr.choose(['', '']) == 0


def test_choose_rows_gathers_each_page_from_its_chosen_candidate():
  k, b, t = 3, 4, 5
  rng = np.random.default_rng()
  tokens_KxBxT = rng.integers(3, 9, (k, b, t)).astype(np.int32)
  # Page p's consensus is candidate p % k: its text is shared by one other candidate.
  markup = {}
  for p in range(b):
    win = p % k
    for c in range(k):
      tokens_KxBxT[c, p, 0] = 100 + 10 * p + c
      markup[100 + 10 * p + c] = '<p>same words here</p>' if c in (win, (win + 1) % k) else \
          f'<p>odd {c}</p>'
  tokens_KxBxT[:, :, 1] = IDS.eos   # candidates end after their first token
  candidates = [{'tokens': tokens_KxBxT[c], 'score': rng.standard_normal(b),
                 'element_probs_BxE': rng.random((b, 2))} for c in range(k)]
  out = mbr.choose_rows(candidates, lambda ids: markup[ids[0]], IDS.eos)
  chosen = [min(p % k, (p % k + 1) % k) for p in range(b)]   # the tie goes to the first
  for key in candidates[0]:
    np.testing.assert_array_equal(out[key], np.stack([candidates[c][key][p]
                                                      for p, c in enumerate(chosen)]))


@functools.partial(jax.jit, static_argnames=('settings',))
def _generate(model, features, feature_mask, rng, *, settings):
  return decoding.generate(model, features, feature_mask, settings=settings, ids=IDS, rng=rng)


def test_generator_chooses_among_greedy_and_seeded_samples(tiny_model, tiny_batch):
  settings = decoding.DecodeSettings(max_len=SEQ, strategy='mbr', temperature=1.5, candidates=3)
  make = lambda s: functools.partial(_generate, settings=s)
  to_markup = lambda ids: ''.join(f'<p>w{i % 7}</p>' for i in ids)
  generate = mbr.generator(make, settings, to_markup=to_markup, eos_id=IDS.eos)
  args = (tiny_model, tiny_batch['features'], tiny_batch['feature_mask'])
  rng = jax.random.key(np.random.default_rng().integers(1 << 30))
  out = generate(*args, rng)
  greedy = dict(settings=decoding.DecodeSettings(max_len=SEQ))
  sample = dict(settings=decoding.DecodeSettings(max_len=SEQ, strategy='sample', temperature=1.5,
                                                 candidates=3))
  candidates = jax.device_get([_generate(*args, rng, **greedy)] + [
      _generate(*args, jax.random.fold_in(rng, k), **sample) for k in (1, 2)])
  expected = mbr.choose_rows(candidates, to_markup, IDS.eos)
  assert set(out) == {'tokens', 'score', 'semantic', 'element_probs'}
  for key, value in expected.items():
    np.testing.assert_array_equal(out[key], value)
  assert mbr.generator(make, greedy['settings'], to_markup=to_markup, eos_id=2).func is _generate
  with pytest.raises(ValueError, match='to_markup'):
    mbr.generator(make, settings, to_markup=None, eos_id=IDS.eos)


def test_mbr_is_a_host_strategy_with_candidates_from_the_config(tiny_model, tiny_batch):
  with pytest.raises(ValueError, match='mbr'):
    decoding.decode_tokens(tiny_model, tiny_batch['features'], tiny_batch['feature_mask'],
                           ids=IDS, settings=decoding.DecodeSettings(max_len=4, strategy='mbr'))
  config = config_lib.base_config()
  config.decode.strategy, config.decode.candidates = 'mbr', 5
  assert specs.decode_settings(config).candidates == 5
