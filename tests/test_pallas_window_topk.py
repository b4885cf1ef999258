"""pallas_window_topk: the Pallas window + top-k blocks kernel (interpret mode on CPU) against
sparse_attention.window_topk_attention with the lengths' prefix mask, forward and gradients, and
the blocks it reads against the window's and the selected ones."""
from __future__ import annotations

import functools

import chex
import jax
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
  window_topk_expected_vjp,
)

from phase1_jax.model import pallas_window_topk

B, N, _ = KERNEL_BNH
# (T, window, block, top_k, lengths): window < block (one local block before its own), T not a
# multiple of the block, window > block, top_k above the eligible blocks (k_eff = 2, and block 3
# has one), length 0; window > T (nothing selectable: causal); top_k 0 with window 1 (rows past
# the first block of length 5 see no key); many blocks with lengths < T (blocks past it are not
# eligible).
CASES = [
    (40, 7, 8, 2, (40, 13)),
    (37, 12, 8, 3, (30, 0)),
    (24, 50, 8, 1, (24, 9)),
    (21, 1, 8, 0, (21, 5)),
    (64, 3, 8, 2, (64, 20)),
]
# bfloat16 on two of the cases (interpret mode is slow on CPU).
DTYPE_CASES = [(jnp.float32, *c) for c in CASES] + [(jnp.bfloat16, *c) for c in CASES[:2]]


@pytest.mark.parametrize('dtype, t, window, block, top_k, lengths', DTYPE_CASES)
def test_matches_reference_forward_and_gradients(dtype, t, window, block, top_k, lengths):
  q, k, v, cotangent = kernel_inputs(t, dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  kwargs = dict(window_size=window, top_k=top_k, block_size=block)
  out, grads = kernel_vjp(pallas_window_topk.window_topk_attention, q, k, v, lengths, cotangent,
                          **kwargs)
  want_out, want_grads = window_topk_expected_vjp(q, k, v, lengths, cotangent, **kwargs)
  assert_kernel_matches(out, grads, want_out, want_grads, dtype, t)


def test_without_lengths_equals_full_lengths():
  t = 27
  q, k, v, _ = kernel_inputs(t, jnp.float32)
  run = lambda lengths: pallas_window_topk.window_topk_attention(
      q, k, v, lengths, window_size=5, top_k=1, block_size=4, interpret=True)
  chex.assert_trees_all_close(run(None), run(jnp.full((B,), t, jnp.int32)), atol=0, rtol=0)


@functools.partial(jax.jit, static_argnames=('window_size', 'block_size'))
def selected_vjp(q, k, v, idx, valid, cotangent, *, window_size, block_size):
  attend = lambda q, k, v: pallas_window_topk.attend_selected(
      q, k, v, None, idx, valid, window_size=window_size, block_size=block_size, interpret=True)
  out, vjp = jax.vjp(attend, q, k, v)
  return out, vjp(cotangent)


def test_reads_only_window_and_selected_blocks():
  """With the selection made on clean inputs, every block a program should not read poisoned
  (NaN): its rows stay finite and exact."""
  t, window, block, top_k = 96, 10, 16, 2
  num, prev = t // block, 1
  inputs = kernel_inputs(t, jnp.float32)
  idx, valid = pallas_window_topk.select_blocks(
      *inputs[:2], jnp.full((B,), t, jnp.int32), window_size=window, top_k=top_k,
      block_size=block)
  run = functools.partial(selected_vjp, idx=idx, valid=valid, window_size=window,
                          block_size=block)
  reads = np.zeros((B, N, num, num), bool)       # [batch, head, query block, key block]
  for qb in range(num):
    reads[:, :, qb, max(qb - prev, 0):qb + 1] = True
  for b, n, qb, slot in zip(*np.nonzero(np.asarray(valid)), strict=True):
    reads[b, n, qb, np.asarray(idx)[b, n, qb, slot]] = True
  assert reads.sum() < B * N * num * (num + 1) // 2    # fewer than the causal blocks
  assert np.asarray(valid).sum(-1).max() == top_k
  assert_reads_only(run, inputs, block, num, keys_read=lambda qb: reads[:, :, qb, :],
                    queries_reading=lambda kb: reads[:, :, :, kb])


@pytest.mark.parametrize('kwargs, message', [
    (dict(window_size=0, top_k=1, block_size=4), 'window_size'),
    (dict(window_size=4, top_k=-1, block_size=4), 'top_k'),
    (dict(window_size=4, top_k=True, block_size=4), 'top_k'),
    (dict(window_size=4, top_k=1, block_size=12), 'block_size')])
def test_bad_arguments(kwargs, message):
  """block_size must be a power of two (Triton tiles), unlike the reference's."""
  q = jnp.zeros((1, 8, 1, 4))
  with pytest.raises(ValueError, match=message):
    pallas_window_topk.window_topk_attention(q, q, q, None, interpret=True, **kwargs)
  with pytest.raises(ValueError, match='self-attention'):
    pallas_window_topk.window_topk_attention(q, q[:, :4], q[:, :4], None, window_size=2,
                                             top_k=1, block_size=4, interpret=True)


def test_lowers_for_the_triton_backend():
  """Power-of-two tiles, supported ops and scalar loads from the lists (which interpret mode does
  not check), H padded 24 -> 32, T = 100 padded to 128."""
  assert_lowers_for_triton(
      lambda q, k, v, lengths: pallas_window_topk.window_topk_attention(
          q, k, v, lengths, window_size=20, top_k=2, block_size=16),
      ('window_topk_attention_fwd', 'window_topk_attention_dq', 'window_topk_attention_dkv'))
