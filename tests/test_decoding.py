"""KV-cached decoding against the uncached definitions it must equal.

The model is conftest's tiny Phase1Decoder: 3 layer applications over 2 unique blocks (so the
cache is per application while memory K/V are per unique block), random parameters, a feature
mask with masked patches, 3 batch rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import SEQ, TINY, JittedModel

from phase1_jax.inference import decoding

BOS, PAD = 1, 0
NEVER = -1  # an eos_id no token equals: rows run to max_len


@functools.partial(jax.jit, static_argnames=('max_len', 'bos_id', 'eos_id', 'pad_id'))
def cached_decode(model, features, feature_mask, *, max_len, bos_id, eos_id, pad_id):
  return decoding.greedy_decode(model, features, feature_mask, max_len=max_len, bos_id=bos_id,
                                eos_id=eos_id, pad_id=pad_id)


def reference_decode(model, features, feature_mask, *, eos_id, pad_id=PAD):
  # The package's uncached reference, with the model's __call__ jitted (same math, one compile).
  return np.asarray(decoding.greedy_decode_reference(
      JittedModel(model), features, feature_mask, max_len=SEQ, bos_id=BOS, eos_id=eos_id,
      pad_id=pad_id))


def decode_both(model, batch, eos_id, pad_id=PAD):
  args = (batch['features'], batch['feature_mask'])
  cached = np.asarray(cached_decode(model, *args, max_len=SEQ, bos_id=BOS, eos_id=eos_id,
                                    pad_id=pad_id))
  return cached, reference_decode(model, *args, eos_id=eos_id, pad_id=pad_id)


@pytest.fixture(scope='module')
def free_run(tiny_model, tiny_batch):
  """Cached and reference decodes with an EOS that never comes (every row runs to max_len)."""
  return decode_both(tiny_model, tiny_batch, NEVER)


def test_cached_equals_reference_without_eos(free_run):
  cached, reference = free_run
  rows = reference.shape[0]
  assert cached.shape == (rows, SEQ) and cached.dtype == np.int32
  np.testing.assert_array_equal(cached, reference)
  assert (cached != PAD).all()
  # The rows differ (features matter), and the decode is not one repeated token.
  assert len({tuple(r) for r in cached}) == rows
  assert len(np.unique(cached)) > 2


def pick_eos(tokens):
  """A token of the free run that, used as EOS, ends the rows at different positions (one row
  never emitting it), as many rows as possible, none at the very first step."""
  best, best_key = None, None
  for v in np.unique(tokens):
    if v in (PAD, BOS):
      continue
    first = [int(np.argmax(r == v)) if (r == v).any() else SEQ for r in tokens]
    key = (len(set(first)), SEQ in first, sum(f < SEQ for f in first), min(first) > 0)
    if best_key is None or key > best_key:
      best, best_key = int(v), key
  return best


def test_cached_equals_reference_with_eos_and_pads_after_it(tiny_model, tiny_batch, free_run):
  free = free_run[0]
  eos = pick_eos(free)
  first = [int(np.argmax(r == eos)) if (r == eos).any() else SEQ for r in free]
  # Rows really end differently, and at least one ends with room for PADs after the EOS.
  assert len(set(first)) >= 2 and min(first) < SEQ - 1, first
  cached, reference = decode_both(tiny_model, tiny_batch, eos)
  np.testing.assert_array_equal(cached, reference)
  for row, free_row, f in zip(cached, free, first):
    # Up to and including the first EOS the row is the free run (greedy is prefix-determined);
    # every position after it is PAD.
    np.testing.assert_array_equal(row[:f + 1], free_row[:f + 1])
    assert (row[f + 1:] == PAD).all()
    assert (row[:f] != eos).all()


def test_all_rows_end_early(tiny_model, tiny_batch, free_run):
  """Every row emits EOS at step 3 (all rows are page 0, EOS := page 0's 4th token): the cached
  while_loop's all-done exit is taken, and the rest of every row is PAD, as in the reference."""
  free = free_run[0]
  eos = int(free[0, 3])
  assert (free[0, :3] != eos).all()
  same_page = {k: jnp.broadcast_to(tiny_batch[k][:1], tiny_batch[k].shape)
               for k in ('features', 'feature_mask')}
  cached, reference = decode_both(tiny_model, same_page, eos)
  np.testing.assert_array_equal(cached, reference)
  np.testing.assert_array_equal(cached, np.broadcast_to(
      np.concatenate([free[0, :4], np.full(SEQ - 4, PAD)]), cached.shape))


def test_pad_is_never_decoded_even_when_favoured(tiny_model, tiny_batch, free_run):
  """Make PAD tie with the greedy choice wherever token v was: PAD's embedding := v's (tied head:
  equal logits, a plain argmax would take the lower id, PAD). Decoding must never emit PAD before
  a row ends, and the cached and reference decoders must still agree."""
  free = free_run[0]
  candidates = list(dict.fromkeys(int(v) for v in free[:, 1:6].ravel()))
  for v in candidates:
    model = nnx.clone(tiny_model)
    embedding = np.asarray(model.token_embed.embedding[...]).copy()
    embedding[PAD] = embedding[v]
    model.token_embed.embedding[...] = jnp.asarray(embedding)
    cached, reference = decode_both(model, tiny_batch, NEVER)
    assert not (cached == PAD).any()   # no row ends (no EOS), so PAD can only be a choice
    np.testing.assert_array_equal(cached, reference, err_msg=f'PAD decoded in place of {v}')


@functools.partial(jax.jit, static_argnames='max_len')
def _decode_steps(model, features, feature_mask, tokens, *, max_len):
  """decode_step at positions 0..T-1 with the given input tokens: logits per position."""
  state = model.init_decode_state(features, max_len)

  def body(state, xs):
    pos, tok = xs
    detail, semantic, state = model.decode_step(tok, pos, state, feature_mask)
    return state, (detail, semantic)

  t = tokens.shape[1]
  _, (detail, semantic) = jax.lax.scan(body, state, (jnp.arange(t), tokens.T))
  return jnp.swapaxes(detail, 0, 1), jnp.swapaxes(semantic, 0, 1)


def test_decode_step_equals_call_on_each_prefix(tiny_model, tiny_forward, tiny_batch):
  rng = np.random.default_rng(21)
  b = tiny_batch['features'].shape[0]
  tokens = rng.integers(3, TINY['vocab_size'], (b, SEQ)).astype(np.int32)
  tokens[:, 0] = BOS
  detail, semantic = _decode_steps(tiny_model, tiny_batch['features'], tiny_batch['feature_mask'],
                                   jnp.asarray(tokens), max_len=SEQ)
  assert detail.shape == (b, SEQ, TINY['vocab_size']) and detail.dtype == jnp.float32
  assert semantic.shape == (b, SEQ, TINY['num_semantic_classes'])
  for p in range(SEQ):
    # __call__ on the prefix tokens[:, :p + 1] (padded to the compiled length: pads are masked).
    prefix = jnp.asarray(np.where(np.arange(SEQ) <= p, tokens, PAD).astype(np.int32))
    out = tiny_forward(tiny_batch['features'], tiny_batch['feature_mask'], prefix)
    np.testing.assert_allclose(detail[:, p], out['detail_logits'][:, p], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(semantic[:, p], out['semantic_logits'][:, p], atol=1e-4,
                               rtol=1e-4)


def test_cache_is_per_application_not_per_unique_layer(tiny_model, tiny_batch):
  state = jax.eval_shape(lambda m, f: m.init_decode_state(f, SEQ), tiny_model,
                         tiny_batch['features'])
  assert state['cache']['k'].shape[0] == TINY['num_layers']
  assert state['memory_kv'][0].shape[0] == TINY['num_unique_layers']
