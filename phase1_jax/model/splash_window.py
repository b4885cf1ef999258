"""The `window` and `window_topk` attention kinds through JAX's TPU splash attention kernel.

Same signatures and results as pallas_window.window_attention and
pallas_window_topk.window_topk_attention (the GPU kernels), so a dispatcher can pick by
jax.default_backend(); built on `jax.experimental.pallas.ops.tpu.splash_attention` (Mosaic TPU),
which visits only the key blocks its MaskInfo lists, with a float32 online softmax and its own
FlashAttention-2 backward. Splash takes [heads, T, H] and unscaled logits: q is scaled here (in
q's dtype, as dense_attention), and T is padded to the blocks.

- `window`: a static `LocalMask(window_size=(w - 1, 0))` (query i sees i - w < j <= i: the band
  and causality in one mask, computed in the kernel), the key lengths as segment ids (keys at
  or past the length get id 1, every query id 0), vmapped over the batch.
- `window_topk`: the selection is data-dependent (pallas_window_topk.select_blocks), so the
  MaskInfo is built in jnp instead of from a numpy mask: per (batch, head) as one splash head,
  per query block the listed key blocks (selected then local, visit_lists) as `data_next`, with
  `block_mask` 2 (all visible), 1 (partial: the diagonal's causal triangle and/or the block
  holding the length) or 0 (skipped: list padding, blocks past the length), and `mask_next`
  into 2B + 1 partial blocks (causal; keys below length % b per batch row; both). The dK/dV
  MaskInfo holds the inverse lists. These arrays are the kernel's scalar-prefetch operands, so
  traced values work (the grid is static: list width, and Q for dK/dV in the worst case).
  Batch folded into heads, not vmapped: vmap over batched scalar-prefetch operands falls back to
  a loop of B kernel calls (pallas' batching rule). Cost: scalar memory of B*N*Q*(L + Q) int8
  (int16 past 127 blocks) entries, and a dK/dV grid of B*N*Q*Q steps, most of them skipped.

Rows that see no key get dense_attention's mean of all values, outside the kernel (as the Pallas
kernels). Blocks must be multiples of 128 (TPU lanes; splash checks it even in interpret mode),
so window_topk's selection blocks are >= 128. The `window` and `window_topk` kinds run these on a
TPU backend (sparse_dispatch.py). Tested in interpret mode on CPU only.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as info

from phase1_jax.model import pallas_window, pallas_window_topk, sparse_attention

LANES = 128   # splash's block_kv (and, with segment ids, block_q) must be multiples of this


def _check(q, k, v, kv_lengths_B, window_size, **blocks):
  pallas_window.check_arguments(
      q, k, v, kv_lengths_B, window_size, **blocks,
      block_rule=(lambda b: b % LANES == 0, f'a positive multiple of {LANES} (TPU lanes)'))


def _block_sizes(block_q: int, block_k: int):
  """The same blocks for the forward, dQ and dK/dV kernels (separate dQ kernel: the fused one
  keeps a [key blocks, heads, T, H] dQ)."""
  return splash.BlockSizes(block_q=block_q, block_kv=block_k, block_kv_compute=block_k,
                           block_q_dkv=block_q, block_kv_dkv=block_k,
                           block_kv_dkv_compute=block_k, block_q_dq=block_q, block_kv_dq=block_k)


def _lengths(kv_lengths_B, batch: int, t: int):
  if kv_lengths_B is None:
    return jnp.full((batch,), t, jnp.int32)
  return jnp.clip(kv_lengths_B.astype(jnp.int32), 0, t)


def _heads_major(x_BxTxNxH, padded: int, scale=None):
  """[B, T, N, H] -> [B, N, padded, H] (zeros after T), times `scale` in x's dtype if given."""
  if scale is not None:
    x_BxTxNxH = x_BxTxNxH * jnp.asarray(scale, x_BxTxNxH.dtype)
  t = x_BxTxNxH.shape[1]
  return jnp.pad(x_BxTxNxH, ((0, 0), (0, padded - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)


def _unpad(out_BxNxPxH, v_BxTxNxH, empty_BxTxN=None):
  """[B, N, padded, H] -> [B, T, N, H]; rows marked empty (they see no key) get the mean of all
  values, dense_attention's value for a fully masked row."""
  out = out_BxNxPxH[:, :, :v_BxTxNxH.shape[1]].transpose(0, 2, 1, 3)
  if empty_BxTxN is None:
    return out
  mean_Bx1xNxH = jnp.mean(v_BxTxNxH.astype(jnp.float32), axis=1, keepdims=True)
  return jnp.where(empty_BxTxN[..., None], mean_Bx1xNxH.astype(out.dtype), out)


def window_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, *, window_size: int,
                     block_q: int = LANES, block_k: int = LANES, interpret: bool = False):
  """Causal sliding-window self-attention: query i sees keys i - window_size < j <= i with
  j < kv_lengths_B[b] (None: all keys). [B, T, N, H] -> [B, T, N, H] in q's dtype, softmax in
  float32, scale H**-0.5; a row with no such key gets the mean of all T values, as in
  dense_attention. Differentiable (reverse mode) in q, k, v. block_q, block_k: multiples of 128;
  T is padded to both. interpret=True runs splash's kernels on CPU."""
  _check(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, window_size, block_q=block_q,
         block_k=block_k)
  batch, t, heads, h = q_BxTxNxH.shape
  padded = -(-t // math.lcm(block_q, block_k)) * math.lcm(block_q, block_k)
  band = masks.LocalMask((padded, padded), window_size=(window_size - 1, 0), offset=0)
  kernel = splash.make_splash_mha_single_device(
      masks.MultiHeadMask([band] * heads), block_sizes=_block_sizes(block_q, block_k),
      interpret=interpret)
  q, k, v = (_heads_major(x, padded, s) for x, s in ((q_BxTxNxH, h ** -0.5), (k_BxTxNxH, None),
                                                    (v_BxTxNxH, None)))
  if kv_lengths_B is None:
    # Padded keys (j >= T) lie after every real query: the band already hides them.
    return _unpad(jax.vmap(kernel)(q, k, v), v_BxTxNxH)
  lengths = _lengths(kv_lengths_B, batch, t)
  segments = splash.SegmentIds(
      q=jnp.zeros((batch, padded), jnp.int32),
      kv=(jnp.arange(padded)[None, :] >= lengths[:, None]).astype(jnp.int32))
  empty_BxT = jnp.maximum(jnp.arange(t) - window_size + 1, 0)[None, :] >= lengths[:, None]
  return _unpad(jax.vmap(kernel)(q, k, v, segments), v_BxTxNxH,
                jnp.broadcast_to(empty_BxT[..., None], (batch, t, heads)))


def _small(x, largest: int):
  """A scalar-prefetch array in the smallest int type holding `largest` (TPU scalar memory is
  small; the kernels widen it back to int32)."""
  for dtype in (jnp.int8, jnp.int16):
    if largest <= jnp.iinfo(dtype).max:
      return x.astype(dtype)
  return x.astype(jnp.int32)


def _partial_blocks(lengths_B, b: int):
  """[2B + 1, b, b] bool, (query row, key column): causal; keys below length % b of batch row
  i at 1 + i; both at 1 + B + i."""
  r = np.arange(b)
  causal_bxb = jnp.asarray(r[:, None] >= r[None, :])
  prefix_Bxbxb = jnp.broadcast_to(r[None, None, :] < (lengths_B % b)[:, None, None],
                                  (lengths_B.shape[0], b, b))
  return jnp.concatenate([causal_bxb[None], prefix_Bxbxb, prefix_Bxbxb & causal_bxb[None]])


def _kinds(q_blocks, k_blocks, lengths, row, batch: int, b: int, num: int):
  """(block_mask, mask_next) of (query block, key block) pairs (broadcast; num: list padding):
  0 when no key of the pair is below the length, 2 when every key is (off the diagonal, whose
  causal triangle is partial), else 1 with its partial block in _partial_blocks."""
  start = k_blocks * b
  live = (k_blocks < num) & (q_blocks < num) & (start < lengths)
  whole = start + b <= lengths
  diagonal = q_blocks == k_blocks
  block_mask = jnp.where(live, jnp.where(whole & ~diagonal, 2, 1), 0)
  mask_next = jnp.where(diagonal, jnp.where(whole, 0, 1 + batch + row), 1 + row)
  return block_mask, jnp.where(block_mask == 1, mask_next, 0)


def _filled(blocks, live, num: int):
  """data_next: each slot's block; a skipped slot repeats the last live one before it (the
  pipeline then fetches nothing new) or block 0."""
  slot = jnp.arange(blocks.shape[-1]).reshape((1,) * (blocks.ndim - 1) + (-1,))
  last = lax.cummax(jnp.where(live, slot, 0), axis=blocks.ndim - 1)
  return jnp.take_along_axis(jnp.minimum(blocks, num - 1), last, axis=-1)


def mask_infos(keys, queries, lengths_B, heads: int, b: int, num: int):
  """splash MaskInfos (forward and dQ; dK/dV) of visit_lists' lists, one splash head per (batch,
  head): keys [B*N, Q, L] -> data_next etc. [B*N, Q, L]; queries [B*N, Q, Q] (per key block)
  -> [B*N, Q, Q] indexed (head, query slot, key block), partial blocks transposed."""
  batch = lengths_B.shape[0]
  lengths = jnp.repeat(lengths_B, heads)[:, None, None]
  row = np.repeat(np.arange(batch), heads)[:, None, None]
  partial = _partial_blocks(lengths_B, b)
  blocks = np.arange(num)[None, :, None]

  def one(q_blocks, k_blocks, listed, dkv):
    block_mask, mask_next = _kinds(q_blocks, k_blocks, lengths, row, batch, b, num)
    arrays = (_small(_filled(listed, block_mask > 0, num), num - 1),
              _small(mask_next, 2 * batch), block_mask.astype(jnp.int8))
    if dkv:
      arrays = tuple(jnp.swapaxes(x, 1, 2) for x in arrays)
    return info.MaskInfo(*arrays, partial_mask_blocks=jnp.swapaxes(partial, 1, 2) if dkv
                         else partial, q_sequence=None)

  return one(blocks, keys, keys, False), one(queries, blocks, queries, True)


def attend_selected(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, idx_BxNxQxK, valid_BxNxQxK,
                    *, window_size: int, block_size: int, interpret: bool = False):
  """Each query block over its local blocks and its valid listed blocks (select_blocks' output),
  causal and key < length (None: T), through splash with the MaskInfos built from the lists;
  rows that see no key get the mean of all values. Differentiable (reverse mode) in q, k, v."""
  _check(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, window_size, block_size=block_size)
  batch, t, heads, h = q_BxTxNxH.shape
  b, num = int(block_size), -(-t // block_size)
  prev = sparse_attention.local_blocks_before(num, window_size, b)
  lengths = _lengths(kv_lengths_B, batch, t)
  keys, _, queries, _ = pallas_window_topk.visit_lists(idx_BxNxQxK, valid_BxNxQxK, prev)
  fwd, dkv = mask_infos(keys, queries, lengths, heads, b, num)
  kernel = splash.SplashAttentionKernel(   # what make_splash_mha returns, with these MaskInfos
      fwd, fwd, dkv, block_sizes=_block_sizes(b, b), is_mqa=False, save_residuals=False,
      mask_value=splash.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
      residual_checkpoint_name=None, mask_function=None, interpret=interpret)
  flat = lambda x, scale=None: _heads_major(x, num * b, scale).reshape(batch * heads, num * b, h)
  out = kernel(flat(q_BxTxNxH, h ** -0.5), flat(k_BxTxNxH), flat(v_BxTxNxH))
  # No key: the local blocks start at or past the length and no valid block was selected.
  local_start_T = np.maximum(np.arange(t) // b - prev, 0) * b
  selected_BxNxT = jnp.repeat(valid_BxNxQxK.any(-1), b, axis=2)[:, :, :t]
  empty_BxTxN = ((jnp.asarray(local_start_T)[None, :] >= lengths[:, None])[:, :, None]
                 & ~jnp.swapaxes(selected_BxNxT, 1, 2))
  return _unpad(out.reshape(batch, heads, num * b, h), v_BxTxNxH, empty_BxTxN)


def window_topk_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, *, window_size: int,
                          top_k: int, block_size: int, interpret: bool = False):
  """Causal local blocks + top_k selected earlier key blocks per query block and head, keys
  j < kv_lengths_B[b] (None: all), as sparse_attention.window_topk_attention (its selection).
  [B, T, N, H] -> [B, T, N, H] in q's dtype, softmax in float32, scale H**-0.5. block_size: a
  multiple of 128 (the kernel's and the selection's blocks); T is padded to it.
  interpret=True runs splash's kernels on CPU."""
  _check(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, window_size, block_size=block_size)
  if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
    raise ValueError(f'top_k={top_k!r}: must be an int >= 0')
  lengths = _lengths(kv_lengths_B, *q_BxTxNxH.shape[:2])
  idx, valid = pallas_window_topk.select_blocks(q_BxTxNxH, k_BxTxNxH, lengths,
                                                window_size=window_size, top_k=int(top_k),
                                                block_size=int(block_size))
  return attend_selected(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, idx, valid,
                         window_size=window_size, block_size=block_size, interpret=interpret)
