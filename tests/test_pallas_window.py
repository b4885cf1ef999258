"""pallas_window: the Pallas sliding-window flash-attention kernel (interpret mode on CPU) against
dense_attention with the same window and key lengths, forward and gradients, and the key blocks it
visits against the band."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phase1_jax.model import attention, pallas_window

B, N, H = 2, 2, 8
# bfloat16: inputs, kernel and reference all in bf16 (one bf16 rounding of p and of the output
# is ~4e-3 relative); the two differ in summation order and in where they round.
TOLERANCE = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}
STATIC = ('window_size', 'block_q', 'block_k')


@functools.partial(jax.jit, static_argnames=STATIC)
def kernel_vjp(q, k, v, lengths, cotangent, *, window_size, block_q, block_k):
  attend = lambda q, k, v: pallas_window.window_attention(
      q, k, v, lengths, window_size=window_size, block_q=block_q, block_k=block_k, interpret=True)
  out, vjp = jax.vjp(attend, q, k, v)
  return out, vjp(cotangent)


@functools.partial(jax.jit, static_argnames=('window_size',))
def dense_vjp(q, k, v, lengths, cotangent, *, window_size):
  mask = attention.prefix_mask(lengths, q.shape[1])
  attend = lambda q, k, v: attention.dense_attention(q, k, v, mask, causal=True,
                                                     window_size=window_size)
  out, vjp = jax.vjp(attend, q, k, v)
  return out, vjp(cotangent)


def random_inputs(t, dtype):
  """q, k, v and a cotangent (the gradient of a random linear functional of the output)."""
  rng = np.random.default_rng()
  return tuple(jnp.asarray(rng.standard_normal((B, t, N, H)), dtype) for _ in range(4))


# (T, window, block_q, block_k, lengths): T not a multiple of the blocks, window < block, window
# > T, window 1, block_q != block_k, and lengths < T (rows past length - 1 + window see no key;
# length 0: none does).
CASES = [
    (40, 7, 16, 8, (40, 13)),
    (37, 12, 8, 16, (30, 0)),
    (24, 50, 16, 16, (24, 9)),
    (21, 1, 8, 8, (21, 5)),
    (48, 16, 16, 16, (48, 33)),
]


# bfloat16 on two of the cases (interpret mode is slow on CPU).
DTYPE_CASES = [(jnp.float32, *c) for c in CASES] + [(jnp.bfloat16, *c) for c in CASES[:2]]


@pytest.mark.parametrize('dtype, t, window, block_q, block_k, lengths', DTYPE_CASES)
def test_matches_dense_forward_and_gradients(dtype, t, window, block_q, block_k, lengths):
  q, k, v, cotangent = random_inputs(t, dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  out, grads = kernel_vjp(q, k, v, lengths, cotangent, window_size=window, block_q=block_q,
                          block_k=block_k)
  want_out, want_grads = dense_vjp(q, k, v, lengths, cotangent, window_size=window)
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  chex.assert_shape(out, (B, t, N, H))
  f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
  chex.assert_trees_all_close(f32(out), f32(want_out), **TOLERANCE[dtype])
  chex.assert_trees_all_close(f32(grads), f32(want_grads), **TOLERANCE[dtype])


def test_without_lengths_equals_full_lengths():
  t, window = 27, 5
  q, k, v, _ = random_inputs(t, jnp.float32)
  run = lambda lengths: pallas_window.window_attention(
      q, k, v, lengths, window_size=window, block_q=8, block_k=8, interpret=True)
  chex.assert_trees_all_close(run(None), run(jnp.full((B,), t, jnp.int32)), atol=0, rtol=0)


def band_blocks(t, window, block_q, block_k):
  """(query block, key block) pairs holding at least one (query, key) pair of the band."""
  band = np.asarray(attention._causal_mask_TxS(t, t, window))
  rows, cols = np.nonzero(band)
  return set(zip((rows // block_q).tolist(), (cols // block_k).tolist()))


@pytest.mark.parametrize('t, window, block_q, block_k', [
    (1, 1, 16, 16), (40, 7, 16, 8), (37, 12, 8, 16), (24, 50, 16, 16), (21, 1, 8, 8),
    (256, 64, 32, 32), (300, 100, 64, 16), (100, 3, 4, 32)])
def test_visited_blocks_are_the_band(t, window, block_q, block_k):
  by_query, by_key = pallas_window.visited_blocks(t, window, block_q, block_k)
  band = band_blocks(t, window, block_q, block_k)
  assert len(by_query) == len(set(by_query)) and set(by_query) == band
  assert len(by_key) == len(set(by_key)) and set(by_key) == band


def test_visits_only_listed_blocks():
  """Poison (NaN) every block a program should not visit: its rows stay finite and exact. A
  visited NaN value block gives 0 * NaN = NaN even where the scores are masked."""
  t, window, block = 64, 10, 16
  q, k, v, cotangent = random_inputs(t, jnp.float32)
  lengths = jnp.full((B,), t, jnp.int32)
  run = functools.partial(kernel_vjp, lengths=lengths, window_size=window, block_q=block,
                          block_k=block)
  clean_out, (clean_dq, clean_dk, clean_dv) = run(q, k, v, cotangent=cotangent)
  by_query, by_key = pallas_window.visited_blocks(t, window, block, block)
  assert len(by_query) < (t // block) * (t // block + 1) // 2   # fewer than the causal blocks

  def poison(x, keep_blocks):
    keep = np.zeros(t, bool)
    for b in keep_blocks:
      keep[b * block:(b + 1) * block] = True
    return jnp.where(jnp.asarray(keep)[None, :, None, None], x, jnp.nan)

  for qb in range(t // block):
    rows = slice(qb * block, (qb + 1) * block)
    keys = [kb for i, kb in by_query if i == qb]
    out, (dq, _, _) = run(q, poison(k, keys), poison(v, keys), cotangent=cotangent)
    chex.assert_trees_all_close((out[:, rows], dq[:, rows]),
                                (clean_out[:, rows], clean_dq[:, rows]), atol=1e-6, rtol=1e-6)
  for kb in range(t // block):
    rows = slice(kb * block, (kb + 1) * block)
    queries = [i for i, j in by_key if j == kb]
    _, (_, dk, dv) = run(poison(q, queries), k, v, cotangent=poison(cotangent, queries))
    chex.assert_trees_all_close((dk[:, rows], dv[:, rows]),
                                (clean_dk[:, rows], clean_dv[:, rows]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('kwargs, message', [
    (dict(window_size=0), 'window_size'), (dict(window_size=4, block_q=24), 'block_q'),
    (dict(window_size=4, block_k=True), 'block_k')])
def test_bad_arguments(kwargs, message):
  q = jnp.zeros((1, 8, 1, 4))
  with pytest.raises(ValueError, match=message):
    pallas_window.window_attention(q, q, q, None, interpret=True, **kwargs)
  with pytest.raises(ValueError, match='self-attention'):
    pallas_window.window_attention(q, q[:, :4], q[:, :4], None, window_size=2, interpret=True)


def test_lowers_for_the_triton_backend():
  """Interpret mode does not run the Triton lowering (power-of-two tiles, supported ops): export
  the forward and backward for CUDA (lowering only, no GPU needed), bfloat16, H padded 24 -> 32."""
  shape = jax.ShapeDtypeStruct((2, 100, 2, 24), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
  attend = lambda q, k, v, lengths: pallas_window.window_attention(
      q, k, v, lengths, window_size=40, block_q=32, block_k=16)
  loss = lambda q, k, v, lengths, c: jnp.sum(attend(q, k, v, lengths).astype(jnp.float32) * c)
  triton = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=['cuda'],
                               disabled_checks=triton)(shape, shape, shape, lengths, shape)
  text = exported.mlir_module()
  for name in ('window_attention_fwd', 'window_attention_dq', 'window_attention_dkv'):
    assert f'name = "{name}"' in text
