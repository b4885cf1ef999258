"""The `window_topk` attention kind as a Pallas flash-attention kernel (GPU Triton backend).

`window_topk_attention` equals `sparse_attention.window_topk_attention(q, k, v,
prefix_mask(lengths, T), window_size=w, top_k=k, block_size=b)` for self-attention on every row
that sees a key. The selection is that function's own (`select_blocks` calls
sparse_attention.selection_queries and top_blocks: pooled keys, scores, lax.top_k -> int32 key
blocks and a validity flag per batch, head and query block; no gradient). The kernels are
pallas_window's, looping over lists of blocks instead of the band: forward and dq over each
query block's valid selected blocks, then its local blocks (causal mask only: the window rounded
out to whole blocks, as the reference does); dk/dv over the query blocks that list each key
block (the inverse lists). Both lists are built in jnp, compacted to the front, counted and
padded with the sentinel Q (one past the last block, never read).

Rows that see no key (the reference leaves them unspecified) get dense_attention's mean of all
values, as in pallas_window. The kernel's blocks are the selection's blocks, so block_size must be
a power of two (>= 16 on GPU); the reference takes any block size. Tested in interpret mode and
lowered (not run) for CUDA on CPU; not yet measured on a GPU. The `window_topk` kind runs it on
a GPU at long T (sparse_dispatch.py).
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from phase1_jax.model import pallas_window as pw
from phase1_jax.model import sparse_attention


def select_blocks(q_BxTxNxH, k_BxTxNxH, lengths_B, *, window_size: int, top_k: int,
                  block_size: int):
  """sparse_attention's block selection (its selection_queries and top_blocks, on this layout):
  (block indices int32, valid bool), B x N x Q x k_eff,
  k_eff = min(top_k, Q - prev - 1). Eligible: entirely before the query block's local blocks and
  holding a key below the length; ranked by <selection query, mean of the block's valid keys>;
  slots beyond the eligible blocks are invalid. Inputs are held out of the gradient."""
  batch, t, heads, h = q_BxTxNxH.shape
  b, num = block_size, -(-t // block_size)
  prev = sparse_attention.local_blocks_before(num, window_size, b)
  k_eff = min(top_k, max(num - prev - 1, 0))
  if k_eff == 0:
    return (jnp.zeros((batch, heads, num, 0), jnp.int32),
            jnp.zeros((batch, heads, num, 0), bool))
  blocks = lambda x: jnp.pad(x, ((0, 0), (0, num * b - t), (0, 0), (0, 0))
                             ).reshape(batch, num, b, heads, h).transpose(1, 0, 3, 2, 4)
  ok_QxBxb = (jnp.arange(num * b)[None, :] < lengths_B[:, None]).reshape(
      batch, num, b).transpose(1, 0, 2)
  queries = sparse_attention.selection_queries(
      blocks(q_BxTxNxH * jnp.asarray(h ** -0.5, q_BxTxNxH.dtype)), 0, t)
  idx, valid = sparse_attention.top_blocks(queries, blocks(k_BxTxNxH), ok_QxBxb, prev, k_eff)
  return idx.astype(jnp.int32).transpose(1, 2, 0, 3), valid.transpose(1, 2, 0, 3)


def _compact(blocks, ok, sentinel):
  """Valid entries first (stable), the rest set to the sentinel; and their count."""
  order = jnp.argsort(~ok, axis=-1, stable=True)
  take = lambda x: jnp.take_along_axis(x, order, axis=-1)
  return jnp.where(take(ok), take(blocks), sentinel).astype(jnp.int32), ok.sum(-1, jnp.int32)


def visit_lists(idx_BxNxQxK, valid_BxNxQxK, prev: int):
  """(key blocks per query block: its valid selected blocks then its local ones, count; query
  blocks per key block, ascending, count), as [B*N, Q, L] / [B*N, Q] int32 arrays."""
  batch, heads, num, _ = idx_BxNxQxK.shape
  local_QxP = np.arange(num)[:, None] - prev + np.arange(prev + 1)[None, :]
  wide = lambda x: jnp.broadcast_to(x, (batch, heads, *x.shape))
  keys, key_count = _compact(jnp.concatenate([idx_BxNxQxK, wide(local_QxP)], -1),
                             jnp.concatenate([valid_BxNxQxK, wide(local_QxP >= 0)], -1), num)
  bi, ni = np.arange(batch)[:, None, None, None], np.arange(heads)[None, :, None, None]
  visits_BxNxQxK = jnp.zeros((batch, heads, num, num + 1), bool).at[
      bi, ni, np.arange(num)[None, None, :, None], keys].set(True)[..., :num]
  queries, query_count = _compact(wide(np.arange(num)[None, :].repeat(num, 0)),
                                  jnp.swapaxes(visits_BxNxQxK, 2, 3), num)
  flat = lambda x: x.reshape(batch * heads, *x.shape[2:])
  return tuple(map(flat, (keys, key_count, queries, query_count)))


def _listed(i, g, list_ref, count_ref):
  """pallas_window's `visit` over a list: steps 0 .. count, block list[step]."""
  del i, g
  return 0, count_ref[...], lambda step: list_ref[step]


def _list_specs(blocks):
  return [pl.BlockSpec((None, None, blocks.shape[-1]), lambda bh, i: (bh, i, 0)),
          pl.BlockSpec((None, None), lambda bh, i: (bh, i))]


def _forward(q, k, v, lengths, keys, key_count, g):
  batch, t, _, hp = q.shape
  block, whole = pw._rows(g, g.block_q, hp), pw._rows(g, t, hp, True)
  out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch * g.heads, t), jnp.float32))
  return pw._call(functools.partial(pw._fwd_kernel, visit=_listed), g,
                  (batch * g.heads, t // g.block_q), [block, whole, whole, *_list_specs(keys)],
                  (block, pw._vector(g.block_q)), out_shape, 'window_topk_attention_fwd',
                  lengths, q, k, v, keys, key_count)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash(q, k, v, lengths, keys, key_count, queries, query_count, g):
  return _forward(q, k, v, lengths, keys, key_count, g)[0]


def _flash_fwd(q, k, v, lengths, keys, key_count, queries, query_count, g):
  out, lse = _forward(q, k, v, lengths, keys, key_count, g)
  return out, (q, k, v, lengths, keys, key_count, queries, query_count, out, lse)


def _flash_bwd(g, residuals, d_out):
  q, k, v, lengths, keys, key_count, queries, query_count, out, lse = residuals
  batch, t, _, hp = q.shape
  block, whole = pw._rows(g, g.block_q, hp), pw._rows(g, t, hp, True)
  grid, args = (batch * g.heads, t // g.block_q), (lengths, q, k, v, d_out, lse,
                                                    pw._delta(d_out, out))
  dq = pw._call(functools.partial(pw._dq_kernel, visit=_listed), g, grid,
                [block, whole, whole, block, pw._vector(g.block_q), pw._vector(g.block_q),
                 *_list_specs(keys)], block, jax.ShapeDtypeStruct(q.shape, q.dtype),
                'window_topk_attention_dq', *args, keys, key_count)
  dk, dv = pw._call(functools.partial(pw._dkv_kernel, visit=_listed), g, grid,
                    [whole, block, block, whole, pw._vector(t, True), pw._vector(t, True),
                     *_list_specs(queries)], (block, block),
                    (jax.ShapeDtypeStruct(k.shape, k.dtype),) * 2, 'window_topk_attention_dkv',
                    *args, queries, query_count)
  return dq, dk, dv, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attend_selected(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, idx_BxNxQxK, valid_BxNxQxK,
                    *, window_size: int, block_size: int, interpret: bool = False):
  """Each query block over its local blocks and its valid listed blocks (`select_blocks`'
  output), causal and key < length (None: T), through the Pallas kernels; rows that see no key
  get the mean of all values. Differentiable (reverse mode) in q, k, v."""
  pw.check_arguments(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, window_size,
                     block_size=block_size)
  batch, t, heads, h = q_BxTxNxH.shape
  b, num = int(block_size), -(-t // block_size)
  prev = sparse_attention.local_blocks_before(num, window_size, b)
  # window_size = padded T: pallas_window's mask reduces to causal and key < length.
  g = pw._Geometry(t, heads, num * b, b, b, h ** -0.5, interpret)
  lengths = (jnp.full((batch,), t, jnp.int32) if kv_lengths_B is None
             else jnp.clip(kv_lengths_B.astype(jnp.int32), 0, t))
  pad = lambda x: jnp.pad(x, ((0, 0), (0, num * b - t), (0, 0), (0, pl.next_power_of_2(h) - h)))
  out = _flash(pad(q_BxTxNxH), pad(k_BxTxNxH), pad(v_BxTxNxH), lengths,
               *visit_lists(idx_BxNxQxK, valid_BxNxQxK, prev), g)[:, :t, :, :h]
  if kv_lengths_B is None:
    return out
  # No key: the local blocks start at or past the length and no valid block was selected (a
  # selected block holds a key below the length, and lies before the query).
  local_start_T = np.maximum(np.arange(t) // b - prev, 0) * b
  selected_BxNxT = jnp.repeat(valid_BxNxQxK.any(-1), b, axis=2)[:, :, :t]
  empty_BxTxN = ((jnp.asarray(local_start_T)[None, :] >= lengths[:, None])[:, :, None]
                 & ~jnp.swapaxes(selected_BxNxT, 1, 2))
  mean_Bx1xNxH = jnp.mean(v_BxTxNxH.astype(jnp.float32), axis=1, keepdims=True)
  return jnp.where(empty_BxTxN[..., None], mean_Bx1xNxH.astype(out.dtype), out)


def window_topk_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, *, window_size: int,
                          top_k: int, block_size: int, interpret: bool = False):
  """Causal local blocks + top_k selected earlier key blocks per query block and head, keys
  j < kv_lengths_B[b] (None: all). [B, T, N, H] -> [B, T, N, H] in q's dtype, softmax in
  float32, scale H**-0.5. block_size: a power of two (>= 16 on GPU); T is padded to it.
  interpret=True runs the kernels on CPU."""
  pw.check_arguments(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, window_size,
                     block_size=block_size)
  if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
    raise ValueError(f'top_k={top_k!r}: must be an int >= 0')
  batch, t = q_BxTxNxH.shape[:2]
  lengths = (jnp.full((batch,), t, jnp.int32) if kv_lengths_B is None
             else jnp.clip(kv_lengths_B.astype(jnp.int32), 0, t))
  idx, valid = select_blocks(q_BxTxNxH, k_BxTxNxH, lengths, window_size=window_size,
                             top_k=int(top_k), block_size=int(block_size))
  return attend_selected(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, idx, valid,
                         window_size=window_size, block_size=block_size, interpret=interpret)
