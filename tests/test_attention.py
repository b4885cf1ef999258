"""phase1_jax.model.attention against a naive per-head numpy softmax reference."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phase1_jax.model import attention

B, N, H = 2, 3, 8


def naive_attention(q, k, v, kv_mask=None, causal=False):
  """Per batch row, per head: softmax(q k^T / sqrt(H) + mask) v, in float64 numpy. A query whose
  keys are all masked averages all values uniformly (what a finite large negative bias gives)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  s = k.shape[1]
  out = np.zeros((b, t, n, h))
  for bi in range(b):
    for ni in range(n):
      for i in range(t):
        allowed = np.ones(s, bool)
        if kv_mask is not None:
          allowed &= np.asarray(kv_mask[bi], bool)
        if causal:
          allowed &= np.arange(s) <= i + (s - t)   # query i sits at key position i + s - t
        if not allowed.any():
          allowed[:] = True
        scores = k[bi, :, ni] @ q[bi, i, ni] / np.sqrt(h)
        scores = np.where(allowed, scores, -np.inf)
        p = np.exp(scores - scores.max())
        p /= p.sum()
        out[bi, i, ni] = p @ v[bi, :, ni]
  return out


# Jitted once per (shapes, dtype, causal): the model runs it under jit, and eager dispatch of every
# op would compile each one separately (slow on CPU).
dense = jax.jit(attention.dense_attention, static_argnames='causal')
attend = jax.jit(attention.attend, static_argnames=('causal', 'kind'))


def random_qkv(seed, t, s, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal(shape).astype(np.float32)
             for shape in ((B, t, N, H), (B, s, N, H), (B, s, N, H)))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def random_kv_mask(seed, s):
  """Random key mask with at least one valid key per row, placed at key 0 so that every causal
  query (which always sees key 0) has a valid key too."""
  mask = np.random.default_rng(seed).random((B, s)) < 0.5
  mask[:, 0] = True
  assert not mask.all()
  return jnp.asarray(mask)


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('use_mask', [False, True])
@pytest.mark.parametrize('t,s', [(5, 5), (4, 7)])
def test_dense_matches_naive_reference(causal, use_mask, t, s):
  q, k, v = random_qkv(t * 10 + s, t, s)
  mask = random_kv_mask(t + s, s) if use_mask else None
  out = dense(q, k, v, mask, causal=causal)
  chex.assert_shape(out, (B, t, N, H))
  chex.assert_type(out, jnp.float32)
  np.testing.assert_allclose(out, naive_attention(q, k, v, mask, causal), rtol=1e-5, atol=1e-6)


def test_causal_query_offset_when_fewer_queries_than_keys():
  """T < S: the T queries are the last T positions; query i sees keys 0 .. i + S - T, so the last
  query sees every key and equals non-causal attention, and the first sees S - T + 1 keys."""
  t, s = 3, 8
  q, k, v = random_qkv(7, t, s)
  causal = dense(q, k, v, causal=True)
  full = dense(q, k, v, causal=False)
  np.testing.assert_allclose(causal[:, -1], full[:, -1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(causal[:, 0], full[:, 0], atol=1e-3)
  # Query 0 equals attention over exactly the first S - T + 1 keys.
  w = s - t + 1
  first = dense(q[:, :1], k[:, :w], v[:, :w], causal=False)
  np.testing.assert_allclose(causal[:, :1], first, rtol=1e-5, atol=1e-6)
  # The last T queries of a full causal T=S run see the same keys.
  q_full = jnp.concatenate([random_qkv(8, s - t, s)[0], q], axis=1)
  np.testing.assert_allclose(dense(q_full, k, v, causal=True)[:, -t:], causal,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('causal', [False, True])
def test_bfloat16_close_to_float32_and_keeps_dtype(causal):
  q, k, v = random_qkv(3, 6, 6)
  mask = random_kv_mask(4, 6)
  ref = dense(q, k, v, mask, causal=causal)
  out = dense(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask,
                                  causal=causal)
  chex.assert_type(out, jnp.bfloat16)
  chex.assert_tree_all_finite(out)
  out, ref = np.asarray(out, np.float32), np.asarray(ref)
  # Relative error in norm (elementwise relative error is meaningless for entries near zero).
  rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert rel < 1e-2, rel
  np.testing.assert_allclose(out, ref, atol=3e-2)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_output_dtype_follows_q(dtype):
  q, k, v = random_qkv(5, 4, 4, dtype)
  chex.assert_type(attend(q, k, v, causal=True), dtype)


def test_fully_masked_row_is_finite():
  q, k, v = random_qkv(11, 4, 6)
  mask = np.ones((B, 6), bool)
  mask[1] = False                      # row 1: no valid key at all
  mask = jnp.asarray(mask)
  out = dense(q, k, v, mask, causal=False)
  chex.assert_tree_all_finite(out)
  # Finite bias => uniform average of the values; the other row is unaffected.
  np.testing.assert_allclose(out[1], jnp.broadcast_to(v[1].mean(axis=0), (4, N, H)), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(out[0], naive_attention(q, k, v)[0], rtol=1e-5, atol=1e-6)
  # Also with causal on top: still finite.
  chex.assert_tree_all_finite(dense(q, k, v, mask, causal=True))


def test_attend_dense_is_dense_attention():
  q, k, v = random_qkv(13, 5, 5)
  mask = random_kv_mask(2, 5)
  np.testing.assert_array_equal(attend(q, k, v, mask, causal=True, kind='dense'),
                                dense(q, k, v, mask, causal=True))


def test_attend_unknown_kind_raises_naming_it():
  q, k, v = random_qkv(0, 2, 2)
  with pytest.raises(ValueError, match="'nope'"):
    attention.attend(q, k, v, kind='nope')


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason="cuDNN's fused attention needs a GPU")
@pytest.mark.parametrize('causal,keys,t,s', [(True, None, 256, 256), (True, 'mask', 256, 256),
                                             (False, 'mask', 256, 64),
                                             (True, 'lengths', 256, 256),
                                             (False, 'lengths', 256, 64)])
def test_dot_product_on_gpu_calls_cudnn_and_matches_dense(causal, keys, t, s):
  """On a GPU the bfloat16 `dot_product` kind is cuDNN's fused attention (the compiled gradient
  calls it, not the XLA fallback) and gives the float32 dense reference's output and gradients
  within bfloat16 rounding, at the model's shapes (self-attention over 256, cross over 64), with
  a key mask or with key lengths (the model's way: no mask tensor)."""
  rng = np.random.default_rng(t + s + 2 * causal + len(keys or ''))
  q, k, v = (jnp.asarray(rng.standard_normal((2, n, 4, 64)), jnp.float32)
             for n in (t, s, s))
  mask, lengths = None, None
  if keys == 'mask':
    mask = rng.random((2, s)) < 0.7
    mask[:, 0] = True
    mask = jnp.asarray(mask)
  elif keys == 'lengths':
    lengths = jnp.asarray([s, s // 3])
  w = jnp.asarray(rng.standard_normal((2, t, 4, 64)), jnp.float32)

  def out_and_grads(kind, q, k, v):
    def loss(q, k, v):
      by_lengths = {} if lengths is None else {'kv_lengths_B': lengths}
      out = attention.attend(q, k, v, mask, causal=causal, kind=kind, **by_lengths)
      return (out.astype(jnp.float32) * w).sum(), out
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)[::-1]

  fast = jax.jit(functools.partial(out_and_grads, 'dot_product'))
  bf16 = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
  assert 'cudnn' in fast.lower(*bf16).compile().as_text()
  got = fast(*bf16)
  ref = jax.jit(functools.partial(out_and_grads, 'dense'))(q, k, v)
  chex.assert_trees_all_equal_dtypes(got, (bf16[0], bf16))
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    g, r = np.asarray(g, np.float32), np.asarray(r)
    assert np.linalg.norm(g - r) / np.linalg.norm(r) < 2e-2
