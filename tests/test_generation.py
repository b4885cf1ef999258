"""Decoding strategies: sampling filters, seeded sampling, beam search against exhaustive search,
cached against recomputed, and the annotations that come with the tokens."""
from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import SEQ, TINY

from phase1_jax import config as config_lib
from phase1_jax.inference import decoding

IDS = decoding.TokenIds(bos=1, eos=2, pad=0)


def test_strategies_match_the_config_choices():
  assert decoding.STRATEGIES + ('mbr',) == config_lib.DECODE_STRATEGIES   # mbr: on the host


def test_filter_logits_top_k_top_p_temperature():
  logits = jnp.log(jnp.array([[0.05, 0.1, 0.4, 0.25, 0.2]]))
  kept = lambda **kw: np.isfinite(np.asarray(decoding.filter_logits(logits, **kw)))[0]
  np.testing.assert_array_equal(kept(temperature=1.0, top_k=2, top_p=1.0), [0, 0, 1, 1, 0])
  # Nucleus 0.6: 0.4 (mass before it 0) and 0.25 (0.4 < 0.6) stay; 0.2 (0.65 >= 0.6) goes.
  np.testing.assert_array_equal(kept(temperature=1.0, top_k=0, top_p=0.6), [0, 0, 1, 1, 0])
  np.testing.assert_array_equal(kept(temperature=1.0, top_k=0, top_p=0.7), [0, 0, 1, 1, 1])
  # The most likely token survives any top_p.
  np.testing.assert_array_equal(kept(temperature=1.0, top_k=0, top_p=1e-6), [0, 0, 1, 0, 0])
  np.testing.assert_allclose(decoding.filter_logits(logits, temperature=0.5, top_k=0, top_p=1.0),
                             logits / 0.5)


@functools.partial(jax.jit, static_argnames=('settings', 'use_cache'))
def _decode(model, features, feature_mask, rng, *, settings, use_cache=True):
  return decoding.decode_tokens(model, features, feature_mask, settings=settings, ids=IDS,
                                rng=rng, use_cache=use_cache)


def _args(tiny_model, tiny_batch):
  return tiny_model, tiny_batch['features'], tiny_batch['feature_mask']


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_model, tiny_batch):
  sample = decoding.DecodeSettings(max_len=SEQ, strategy='sample', temperature=1.5)
  a, score_a = _decode(*_args(tiny_model, tiny_batch), jax.random.key(0), settings=sample)
  b, score_b = _decode(*_args(tiny_model, tiny_batch), jax.random.key(0), settings=sample)
  c, _ = _decode(*_args(tiny_model, tiny_batch), jax.random.key(1), settings=sample)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(score_a, score_b)
  assert (np.asarray(a) != np.asarray(c)).any()
  chex.assert_shape(a, (tiny_batch['features'].shape[0], SEQ))
  chex.assert_type([a, score_a], [jnp.int32, jnp.float32])
  for row in np.asarray(a):   # no PAD or BOS before EOS; PAD only after it
    end = int(np.argmax(row == IDS.eos)) if (row == IDS.eos).any() else SEQ
    assert not np.isin(row[:end], [IDS.pad, IDS.bos]).any()
    assert (row[end + 1:] == IDS.pad).all()
  greedy = decoding.DecodeSettings(max_len=SEQ)
  top1 = decoding.DecodeSettings(max_len=SEQ, strategy='sample', top_k=1)
  np.testing.assert_array_equal(
      _decode(*_args(tiny_model, tiny_batch), jax.random.key(3), settings=top1)[0],
      _decode(*_args(tiny_model, tiny_batch), None, settings=greedy)[0])


def _teacher_forced_log_prob(model, features, feature_mask, tokens):
  """Sum over each page's tokens (up to EOS) of the model's log-probability, PAD/BOS excluded
  from the softmax as in decoding."""
  logits = model(features, feature_mask, decoding.decoder_inputs(tokens, IDS))['detail_logits']
  logits = logits.at[..., jnp.array([IDS.bos, IDS.pad])].set(-jnp.inf)
  token_lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
  return jnp.where(tokens == IDS.pad, 0.0, token_lp).sum(-1)


def test_scores_are_the_log_probability_of_the_tokens(tiny_model, tiny_batch):
  """Greedy: the score is the tokens' log-probability. Beam: that over the length penalty."""
  model, features, mask = _args(tiny_model, tiny_batch)
  eos_settings = dict(max_len=SEQ)
  greedy, greedy_score = _decode(model, features, mask, None,
                                 settings=decoding.DecodeSettings(**eos_settings))
  np.testing.assert_allclose(greedy_score, _teacher_forced_log_prob(model, features, mask, greedy),
                             rtol=1e-4)
  beam = decoding.DecodeSettings(max_len=SEQ, strategy='beam', beam_size=3, length_penalty=0.6)
  tokens, score = _decode(model, features, mask, None, settings=beam)
  length = (np.asarray(tokens) != IDS.pad).sum(-1)
  expected = _teacher_forced_log_prob(model, features, mask, tokens) / ((5 + length) / 6) ** 0.6
  np.testing.assert_allclose(score, expected, rtol=1e-4)


def test_beam_of_one_without_penalty_is_greedy(tiny_model, tiny_batch):
  greedy = _decode(*_args(tiny_model, tiny_batch), None,
                   settings=decoding.DecodeSettings(max_len=SEQ))[0]
  beam = decoding.DecodeSettings(max_len=SEQ, strategy='beam', beam_size=1, length_penalty=0.0)
  np.testing.assert_array_equal(_decode(*_args(tiny_model, tiny_batch), None, settings=beam)[0],
                                greedy)


def test_beam_cached_equals_recomputed(tiny_model, tiny_batch):
  beam = decoding.DecodeSettings(max_len=SEQ, strategy='beam', beam_size=3)
  cached = _decode(*_args(tiny_model, tiny_batch), None, settings=beam)
  recomputed = _decode(*_args(tiny_model, tiny_batch), None, settings=beam, use_cache=False)
  np.testing.assert_array_equal(cached[0], recomputed[0])
  np.testing.assert_allclose(cached[1], recomputed[1], rtol=1e-5)


@pytest.mark.parametrize('alpha', [0.0, 0.6, 2.0])
def test_beam_search_finds_the_exhaustive_optimum(alpha):
  """With a beam wide enough to hold every prefix, beam search returns the best page by
  log_prob / length_penalty over all pages up to max_len, found by enumeration."""
  rng = np.random.default_rng(int(alpha * 10))
  vocab, max_len, batch = 5, 4, 3    # tokens 2 (EOS), 3, 4 can be emitted
  tables = rng.normal(size=(batch, vocab, vocab)) * 2.0
  best_pages = []
  for table in tables:
    log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(table).at[:, :2].set(-jnp.inf)))
    best, best_score = None, -np.inf
    for length in range(1, max_len + 1):   # every page ending in EOS within max_len
      for body in itertools.product((3, 4), repeat=length - 1):
        page = (*body, 2)
        lp = sum(log_probs[prev, tok] for prev, tok in zip((1, *page[:-1]), page))
        score = lp / ((5 + length) / 6) ** alpha
        if score > best_score:
          best, best_score = page, score
    best_pages.append((best, best_score))
  settings = decoding.DecodeSettings(max_len=max_len, strategy='beam', beam_size=16,
                                     length_penalty=alpha)
  # A toy decoder: the next token's logits depend only on the previous token, one table per
  # page (rows b*W .. b*W + W-1 are page b's beams).
  table_all = jnp.asarray(tables)

  def step(tokens_R, pos, state):
    return table_all[jnp.arange(batch * 16) // 16, tokens_R], state

  stepper = decoding.Stepper(step, jnp.zeros((batch * 16,)), lambda s, rows: s[rows])
  tokens, scores = jax.jit(lambda: decoding._beam_loop(stepper, batch, settings, IDS))()
  for b, (page, score) in enumerate(best_pages):
    np.testing.assert_array_equal(np.asarray(tokens[b, :len(page)]), page)
    assert (np.asarray(tokens[b, len(page):]) == IDS.pad).all()
    np.testing.assert_allclose(float(scores[b]), score, rtol=1e-5)


def test_generate_annotations_equal_a_forward_pass(tiny_model, tiny_forward, tiny_batch):
  settings = decoding.DecodeSettings(max_len=SEQ)
  out = jax.jit(lambda m, f, fm: decoding.generate(m, f, fm, settings=settings, ids=IDS))(
      *_args(tiny_model, tiny_batch))
  b = tiny_batch['features'].shape[0]
  chex.assert_shape([out['tokens'], out['semantic']], (b, SEQ))
  chex.assert_shape(out['element_probs'], (b, TINY['num_element_types']))
  forward = tiny_forward(tiny_batch['features'], tiny_batch['feature_mask'],
                         decoding.decoder_inputs(out['tokens'], IDS))
  np.testing.assert_array_equal(out['semantic'], np.argmax(forward['semantic_logits'], -1))
  np.testing.assert_allclose(out['element_probs'], jax.nn.sigmoid(forward['element_logits']),
                             rtol=1e-5, atol=1e-6)
  assert ((0 < np.asarray(out['element_probs'])) & (np.asarray(out['element_probs']) < 1)).all()


def test_bad_strategy_and_missing_key_are_errors(tiny_model, tiny_batch):
  with pytest.raises(ValueError, match='strategy'):
    decoding.decode_tokens(*_args(tiny_model, tiny_batch), ids=IDS,
                           settings=decoding.DecodeSettings(max_len=4, strategy='nucleus'))
  with pytest.raises(ValueError, match='rng'):
    decoding.decode_tokens(*_args(tiny_model, tiny_batch), ids=IDS,
                           settings=decoding.DecodeSettings(max_len=4, strategy='sample'))
