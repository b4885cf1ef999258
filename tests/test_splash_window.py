"""splash_window: the window and window_topk kinds through JAX's TPU splash attention kernel
(interpret mode on CPU) against dense_attention / sparse_attention.window_topk_attention with the
lengths' prefix mask, forward and gradients; the data-dependent MaskInfo against the mask it
encodes; the same signatures as the Pallas GPU kernels; lowering for TPU (Mosaic, not run)."""
from __future__ import annotations

import functools
import inspect
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import (
  KERNEL_BNH,
  assert_kernel_matches,
  kernel_inputs,
  kernel_vjp,
  window_expected_vjp,
  window_topk_expected_vjp,
)

from phase1_jax.model import pallas_window, pallas_window_topk, splash_window

B, N, _ = KERNEL_BNH


# (T, window, block_q, block_k, lengths): T not a multiple of the blocks (padded), window < block,
# block_q != block_k with window > T, window 1 with length 0 (no row sees a key), window = block;
# lengths < T (rows past length - 1 + window see no key).
WINDOW_CASES = [
    (300, 37, 128, 128, (300, 100)),
    (200, 500, 128, 256, (200, 60)),
    (256, 1, 128, 128, (256, 0)),
    (384, 128, 128, 128, (384, 250)),
]
# bfloat16 on two of the cases (interpret mode is slow on CPU).
WINDOW_DTYPE_CASES = ([(jnp.float32, *c) for c in WINDOW_CASES]
                      + [(jnp.bfloat16, *c) for c in WINDOW_CASES[:2]])


@pytest.mark.parametrize('dtype, t, window, block_q, block_k, lengths', WINDOW_DTYPE_CASES)
def test_window_matches_dense_forward_and_gradients(dtype, t, window, block_q, block_k, lengths):
  q, k, v, cotangent = kernel_inputs(t, dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  out, grads = kernel_vjp(splash_window.window_attention, q, k, v, lengths, cotangent,
                          window_size=window, block_q=block_q, block_k=block_k)
  want_out, want_grads = window_expected_vjp(q, k, v, lengths, cotangent, window_size=window)
  assert_kernel_matches(out, grads, want_out, want_grads, dtype, t)


# (T, window, block, top_k, lengths): five blocks, one local block before its own, k_eff = 2;
# T not a multiple of the block, window > block (two local blocks), top_k above the eligible
# blocks, length 0; window > T (nothing selectable: causal); top_k 0 with window 1 (rows past
# the second block of length 130 see no key); lengths < T with many blocks (blocks past the
# length are not eligible, nor visited).
TOPK_CASES = [
    (640, 50, 128, 2, (640, 300)),
    (600, 200, 128, 3, (600, 0)),
    (300, 700, 128, 1, (300, 100)),
    (520, 1, 128, 0, (520, 130)),
    (777, 129, 128, 4, (500, 777)),
]
TOPK_DTYPE_CASES = ([(jnp.float32, *c) for c in TOPK_CASES]
                    + [(jnp.bfloat16, *c) for c in TOPK_CASES[:2]])


@pytest.mark.parametrize('dtype, t, window, block, top_k, lengths', TOPK_DTYPE_CASES)
def test_window_topk_matches_reference_forward_and_gradients(dtype, t, window, block, top_k,
                                                             lengths):
  """Against sparse_attention.window_topk_attention, with dense's mean on rows that see no key
  (the reference leaves them unspecified), as the Pallas kernel's test."""
  q, k, v, cotangent = kernel_inputs(t, dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  kwargs = dict(window_size=window, top_k=top_k, block_size=block)
  out, grads = kernel_vjp(splash_window.window_topk_attention, q, k, v, lengths, cotangent,
                          **kwargs)
  want_out, want_grads = window_topk_expected_vjp(q, k, v, lengths, cotangent, **kwargs)
  assert_kernel_matches(out, grads, want_out, want_grads, dtype, t)


@pytest.mark.parametrize('attend', [
    functools.partial(splash_window.window_attention, window_size=40),
    functools.partial(splash_window.window_topk_attention, window_size=40, top_k=1,
                      block_size=128)])
def test_without_lengths_equals_full_lengths(attend):
  t = 300
  q, k, v, _ = kernel_inputs(t, jnp.float32)
  run = lambda lengths: attend(q, k, v, lengths, interpret=True)
  chex.assert_trees_all_close(run(None), run(jnp.full((B,), t, jnp.int32)), atol=1e-6, rtol=0)


def test_mask_info_encodes_the_lists_and_the_mask():
  """Every (query block, key block) pair the MaskInfos visit, for forward/dQ and dK/dV, is one
  the lists name with a key below the length; block_mask 2 exactly where the whole block is
  visible, else the partial block it points to is the block's mask (transposed for dK/dV)."""
  t, window, b, top_k = 700, 150, 128, 2
  num, prev = -(-t // b), 2
  q, k, _, _ = kernel_inputs(t, jnp.float32)
  lengths = jnp.asarray([700, 390], jnp.int32)
  idx, valid = pallas_window_topk.select_blocks(q, k, lengths, window_size=window, top_k=top_k,
                                                block_size=b)
  keys, _, queries, _ = pallas_window_topk.visit_lists(idx, valid, prev)
  fwd, dkv = jax.tree.map(np.asarray, splash_window.mask_infos(keys, queries, lengths, N, b, num))
  keys, pos = np.asarray(keys), np.arange(num * b)
  listed = np.zeros((B * N, num, num + 1), bool)             # the sentinel num: padding
  np.put_along_axis(listed, keys, True, axis=2)
  listed = listed[..., :num]
  assert listed.sum() < B * N * num * (num + 1) // 2      # sparser than causal
  for bn in range(B * N):
    visible = (pos[:, None] >= pos[None, :]) & (pos[None, :] < int(lengths[bn // N]))
    blocks = visible.reshape(num, b, num, b).transpose(0, 2, 1, 3)      # qb, kb, row, col
    for mask_info, dkv_side in ((fwd, False), (dkv, True)):
      # forward/dQ: [query block, slot] -> key block; dK/dV: [slot, key block] -> query block.
      data_next, mask_next, block_mask = (x[bn].T if dkv_side else x[bn] for x in mask_info[:3])
      seen = np.zeros((num, num), bool)
      for own, slot in zip(*np.nonzero(block_mask), strict=True):
        other = int(data_next[own, slot])
        pair = (other, own) if dkv_side else (own, other)
        assert not seen[pair]
        seen[pair] = True
        assert (block_mask[own, slot] == 2) == blocks[pair].all()
        if block_mask[own, slot] == 1:
          partial = mask_info.partial_mask_blocks[mask_next[own, slot]]
          np.testing.assert_array_equal(partial.T if dkv_side else partial, blocks[pair])
      np.testing.assert_array_equal(seen, listed[bn] & blocks.any((2, 3)))


@pytest.mark.parametrize('splash, pallas', [
    (splash_window.window_attention, pallas_window.window_attention),
    (splash_window.window_topk_attention, pallas_window_topk.window_topk_attention),
    (splash_window.attend_selected, pallas_window_topk.attend_selected)])
def test_same_signatures_as_the_pallas_kernels(splash, pallas):
  """A dispatcher can call either with the same arguments (only block defaults differ)."""
  params = lambda f: [(p.name, p.kind) for p in inspect.signature(f).parameters.values()]
  assert params(splash) == params(pallas)


@pytest.mark.parametrize('attend, kwargs, message', [
    (splash_window.window_attention, dict(window_size=0), 'window_size'),
    (splash_window.window_attention, dict(window_size=True), 'window_size'),
    (splash_window.window_attention, dict(window_size=4, block_q=64), 'block_q'),
    (splash_window.window_attention, dict(window_size=4, block_k=100), 'block_k'),
    (splash_window.window_topk_attention, dict(window_size=4, top_k=1, block_size=64),
     'block_size'),
    (splash_window.window_topk_attention, dict(window_size=4, top_k=-1, block_size=128),
     'top_k'),
    (splash_window.window_topk_attention, dict(window_size=4, top_k=True, block_size=128),
     'top_k')])
def test_bad_arguments(attend, kwargs, message):
  """Blocks must be multiples of 128 (splash's TPU lanes), unlike the Pallas kernels'."""
  q = jnp.zeros((1, 8, 1, 4))
  with pytest.raises(ValueError, match=message):
    attend(q, q, q, None, interpret=True, **kwargs)


@pytest.mark.parametrize('attend', [
    functools.partial(splash_window.window_attention, window_size=4),
    functools.partial(splash_window.window_topk_attention, window_size=4, top_k=1,
                      block_size=128)])
def test_bad_shapes(attend):
  q = jnp.zeros((1, 8, 1, 4))
  with pytest.raises(ValueError, match='self-attention'):
    attend(q, q[:, :4], q[:, :4], None, interpret=True)
  with pytest.raises(ValueError, match='kv_lengths_B'):
    attend(q, q, q, jnp.zeros((2,), jnp.int32), interpret=True)


@pytest.mark.parametrize('attend', [
    functools.partial(splash_window.window_attention, window_size=100),
    functools.partial(splash_window.window_topk_attention, window_size=100, top_k=1,
                      block_size=128)])
def test_lowers_for_tpu(attend):
  """Forward and backward exported for TPU (Mosaic lowering on CPU, not compiled or run):
  bfloat16 [2, 300, 2, 64] (T padded to 384), the three splash kernels present."""
  shape = jax.ShapeDtypeStruct((2, 300, 2, 64), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
  loss = lambda q, k, v, lengths, c: jnp.sum(attend(q, k, v, lengths).astype(jnp.float32) * c)
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=['tpu'])(
      shape, shape, shape, lengths, shape)
  names = set(re.findall(r'splash_mha_(fwd|dq|dkv)', exported.mlir_module()))
  assert names == {'fwd', 'dq', 'dkv'}
