"""pallas_window: the Pallas sliding-window flash-attention kernel (interpret mode on CPU) against
dense_attention with the same window and key lengths, forward and gradients, and the key blocks it
visits against the band."""
from __future__ import annotations

import functools

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from support import (
  KERNEL_BNH,
  assert_kernel_matches,
  assert_lowers_for_triton,
  assert_reads_only,
  kernel_inputs,
  kernel_vjp,
  window_expected_vjp,
)

from phase1_jax.model import attention, pallas_window

B = KERNEL_BNH[0]
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
  q, k, v, cotangent = kernel_inputs(t, dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  out, grads = kernel_vjp(pallas_window.window_attention, q, k, v, lengths, cotangent,
                          window_size=window, block_q=block_q, block_k=block_k)
  want_out, want_grads = window_expected_vjp(q, k, v, lengths, cotangent, window_size=window)
  assert_kernel_matches(out, grads, want_out, want_grads, dtype, t)


def test_without_lengths_equals_full_lengths():
  t, window = 27, 5
  q, k, v, _ = kernel_inputs(t, jnp.float32)
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
  """Every block a program should not visit poisoned (NaN): its rows stay finite and exact."""
  t, window, block = 64, 10, 16
  num = t // block
  run = functools.partial(kernel_vjp, pallas_window.window_attention,
                          lengths=jnp.full((B,), t, jnp.int32), window_size=window,
                          block_q=block, block_k=block)
  by_query, by_key = pallas_window.visited_blocks(t, window, block, block)
  assert len(by_query) < num * (num + 1) // 2   # fewer than the causal blocks

  def blocks(listed):
    keep = np.zeros((1, 1, num), bool)
    keep[..., listed] = True
    return keep

  assert_reads_only(run, kernel_inputs(t, jnp.float32), block, num,
                    keys_read=lambda qb: blocks([kb for i, kb in by_query if i == qb]),
                    queries_reading=lambda kb: blocks([i for i, j in by_key if j == kb]))


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
  """Power-of-two tiles and supported ops (which interpret mode does not check), H padded 24 ->
  32."""
  assert_lowers_for_triton(
      lambda q, k, v, lengths: pallas_window.window_attention(
          q, k, v, lengths, window_size=40, block_q=32, block_k=16),
      ('window_attention_fwd', 'window_attention_dq', 'window_attention_dkv'))
