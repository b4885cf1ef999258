"""Self-attention KV caches for decoding one position at a time, one layout per attention kind.

A cache is a dict of arrays with a leading axis L (one slot per layer application: applications
that share weights still see different inputs) and the batch second:
- `full` (dense, dot_product): k, v [L, B, max_len, N, H]; position p lives in row p.
- `ring` (window): k, v [L, B, W, N, H], W = min(window_size, max_len); position p lives in row
  p % W, overwriting p - W, which the window no longer sees. Memory O(w), not O(T).
- `topk` (window_topk): full k, v (rounded up to whole blocks) plus what the block selection
  needs: q_sum [L, B, N, H] float32, the running sum of the current block's scaled queries, and
  selected [L, B, N, num_blocks], the earlier key blocks chosen at the block's first position.
  The choice is the one `sparse_attention.window_topk_attention` makes for the block: the mean of
  the previous block's queries and the block's first query against each block's mean key, top_k
  among the blocks entirely before the local ones.

`step(cache, q, k, v, pos, index, ...)` writes application `index`'s key/value row into the
stacked cache in place (a row-sized dynamic update of the decoding loop's carry, not a copy of
the cache) and returns the attention output at `pos` with the cache. Scores and softmax in
float32, as in `attend`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from phase1_jax.model import sparse_attention
from phase1_jax.model.attention import AttentionSpec

_NEG = -1e30


def layout(kind: str) -> str:
  return {'window': 'ring', 'window_topk': 'topk'}.get(kind, 'full')


def _block_size(attention: AttentionSpec) -> int:
  return attention.block_size or sparse_attention.default_block_size(attention.window_size)


def init(attention: AttentionSpec, *, num_applications: int, batch: int, max_len: int,
         num_heads: int, head_dim: int, dtype) -> dict:
  """An empty cache for decoding up to `max_len` positions."""
  length, kind = max_len, attention.kind
  if layout(kind) == 'ring':
    length = min(attention.window_size, max_len)
  elif layout(kind) == 'topk':
    length = math.ceil(max_len / _block_size(attention)) * _block_size(attention)
  zeros = jnp.zeros((num_applications, batch, length, num_heads, head_dim), dtype)
  cache = {'k': zeros, 'v': zeros}
  if layout(kind) == 'topk':
    cache['q_sum'] = jnp.zeros((num_applications, batch, num_heads, head_dim), jnp.float32)
    cache['selected'] = jnp.zeros(
        (num_applications, batch, num_heads, length // _block_size(attention)), bool)
  return cache


def _attend(q_BxNxH, k_BxLxNxH, v_BxLxNxH, visible):
  """One query per row over the cached keys; `visible` broadcasts to [B, N, L]."""
  scale = jnp.asarray(q_BxNxH.shape[-1] ** -0.5, q_BxNxH.dtype)
  scores_BxNxL = jnp.einsum('bnh,blnh->bnl', q_BxNxH * scale, k_BxLxNxH,
                            preferred_element_type=jnp.float32)
  probs_BxNxL = jax.nn.softmax(jnp.where(visible, scores_BxNxL, _NEG), axis=-1)
  return jnp.einsum('bnl,blnh->bnh', probs_BxNxL.astype(q_BxNxH.dtype), v_BxLxNxH)


def _row(x, index):
  return jax.lax.dynamic_index_in_dim(x, index, keepdims=False)


def _set_row(x, index, value):
  return jax.lax.dynamic_update_index_in_dim(x, value.astype(x.dtype), index, axis=0)


def step(cache: dict, q_BxNxH, k_BxNxH, v_BxNxH, pos, index, attention: AttentionSpec):
  """Application `index` at position `pos`: writes its key/value and attends its query over its
  cache. Returns (out_BxNxH, cache)."""
  kind_layout = layout(attention.kind)
  length = cache['k'].shape[2]
  row = pos % length if kind_layout == 'ring' else pos
  write = lambda c, x: jax.lax.dynamic_update_slice(
      c, x[None, :, None].astype(c.dtype), (index, 0, row, 0, 0))
  cache = {**cache, 'k': write(cache['k'], k_BxNxH), 'v': write(cache['v'], v_BxNxH)}
  rows_L = jnp.arange(length)
  if kind_layout == 'full':
    visible_L = rows_L <= pos
    if attention.window_size is not None:   # a window on dense: the reference's band mask
      visible_L &= rows_L > pos - attention.window_size
    visible = visible_L[None, None]
  elif kind_layout == 'ring':
    # Row r holds the latest position p <= pos with p % W == r, if any has been written.
    visible = (pos - (pos - rows_L) % length >= 0)[None, None]
  else:
    cache, visible = _topk_visible(cache, q_BxNxH, pos, index, attention)
  out = _attend(q_BxNxH, _row(cache['k'], index), _row(cache['v'], index), visible)
  return out, cache


def _topk_visible(cache, q_BxNxH, pos, index, attention: AttentionSpec):
  """Block selection at each block's first position, then the visible rows [B, N, L]: the local
  blocks (causal) and the selected ones."""
  b = _block_size(attention)
  length = cache['k'].shape[2]
  n = length // b
  prev = min(math.ceil((attention.window_size - 1) / b), n - 1)
  k_eff = min(attention.top_k, max(n - prev - 1, 0))
  block = pos // b
  scale = jnp.asarray(q_BxNxH.shape[-1] ** -0.5, q_BxNxH.dtype)
  q32_BxNxH = (q_BxNxH * scale).astype(jnp.float32)

  def select(cache):
    count = jnp.where(block > 0, b, 0)   # the previous block's queries, none before block 0
    query_BxNxH = (_row(cache['q_sum'], index) + q32_BxNxH) / (count + 1).astype(jnp.float32)
    keys = _row(cache['k'], index).astype(jnp.float32)
    pooled_BxKxNxH = keys.reshape(keys.shape[0], n, b, *keys.shape[2:]).mean(2)
    scores_BxNxK = jnp.einsum('bnh,bknh->bnk', query_BxNxH, pooled_BxKxNxH)
    eligible_K = jnp.arange(n) < block - prev
    _, idx_BxNxk = jax.lax.top_k(jnp.where(eligible_K, scores_BxNxK, -jnp.inf), k_eff)
    picked = jax.nn.one_hot(idx_BxNxk, n, dtype=bool) & eligible_K[idx_BxNxk][..., None]
    return {**cache, 'q_sum': _set_row(cache['q_sum'], index, q32_BxNxH),
            'selected': _set_row(cache['selected'], index, picked.any(-2))}

  def accumulate(cache):
    return {**cache, 'q_sum': _set_row(cache['q_sum'], index,
                                       _row(cache['q_sum'], index) + q32_BxNxH)}

  if k_eff:
    cache = jax.lax.cond(pos % b == 0, select, accumulate, cache)
  rows_L = jnp.arange(length)
  local_L = (rows_L <= pos) & (rows_L // b >= block - prev)
  selected_BxNxL = jnp.repeat(_row(cache['selected'], index), b, axis=-1)
  return cache, local_L[None, None] | selected_BxNxL
