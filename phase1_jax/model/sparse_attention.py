"""Block-sparse causal self-attention: a sliding window, and the window plus top-k key blocks.

Both cut the (query-aligned, padded) sequence into blocks of b = block_size positions. Query block
i meets key blocks i - p .. i, p = ceil((w - 1) / b): exactly the blocks its queries' windows
touch, taken by slicing the blocked keys (no gather). Work and memory are O(T * (w + b))
instead of O(T^2); the softmax runs in float32.

- `window`: inside the local blocks an exact band mask: query t sees keys t - w + 1 .. t. Equals
  `dense_attention(..., causal=True, window_size=w)` on every query with a visible key.
- `window_topk`: the local blocks with only a causal mask (the band rounded out to whole blocks,
  a superset of it that costs nothing: those scores are computed anyway), plus per query block and
  head the `top_k` earlier key blocks, among those entirely before the local blocks, whose pooled
  key (mean of its valid keys) best matches the query block (Mixture-of-Block-Attention / NSA
  selection), gathered once as whole blocks. Local + selectable blocks hold every earlier key, so
  top_k >= number of blocks equals causal dense.

Selection query (a choice): the mean of the queries that exist when the block starts, i.e. the
previous block's queries and the block's own first query. Every query of the block comes at or
after all of them, so no output depends on a later token (a mean over the block's own queries
would let a later query steer an earlier output), and a decoder can make the same choice at the
block's first position. The choice is stop-gradient integer indices; gradients flow through the
attention only.

The blocks run as a `lax.scan` over chunks of query blocks with a hand-written (flash-style)
backward: the float32 scores exist one chunk at a time (in cache on CPU), the backward pass
recomputes them instead of storing T x context probabilities, and each chunk slices its local
keys out of the one padded key array (the window's keys are never copied per query block).
Reverse-mode only (custom_vjp). A query whose visible keys are all masked gets a finite but
unspecified output (dense averages every key, these kinds their local keys); a valid token
always sees itself.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1e30
# Query positions per scan step: 12 heads x 1024 queries x 512 keys of float32 scores = 24 MiB.
CHUNK_POSITIONS = 1024


def default_block_size(window_size: int) -> int:
  """min(128, max(16, w)): work per query is ~w + b keys, so b <= w keeps the window's overhead
  <= 2x, while tiny blocks make many small matmuls."""
  return min(128, max(16, window_size))


def local_blocks_before(num_blocks: int, window_size: int, block_size: int) -> int:
  """Key blocks before its own that a query block's window reaches (none beyond the sequence
  start): the local part of `window` and `window_topk`, in every implementation."""
  return min(-(-(window_size - 1) // block_size), num_blocks - 1)


class _Blocks:
  """Static geometry and block-major inputs (Kc query blocks of b positions, x_KcxBxNxbxH).

  Queries are front-padded by S - T so that query position == key position, and everything is
  end-padded to Kc = chunks * per_chunk blocks; padded keys are masked, padded query rows are
  dropped at the end. Keys/values/mask carry `prev` extra all-masked blocks in front, so query
  block i's local keys are padded blocks i .. i + prev.
  """

  def __init__(self, q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS, window_size, block_size,
               chunk_positions):
    batch, t, heads, h = q_BxTxNxH.shape
    s = k_BxSxNxH.shape[1]
    self.t, self.s, self.b = t, s, block_size
    self.num = math.ceil(s / block_size)   # blocks holding real positions
    self.prev = local_blocks_before(self.num, window_size, block_size)
    self.per_chunk = min(self.num, max(1, chunk_positions // block_size))
    padded = math.ceil(self.num / self.per_chunk) * self.per_chunk * block_size
    front = self.prev * block_size
    blocks = lambda x: x.reshape(batch, -1, block_size, heads, h).transpose(1, 0, 3, 2, 4)
    pad = lambda x, before, after: jnp.pad(x, ((0, 0), (before, after)) + ((0, 0),) * (x.ndim - 2))
    scale = jnp.asarray(h ** -0.5, q_BxTxNxH.dtype)   # applied to q first, as dense does
    self.q = blocks(pad(q_BxTxNxH * scale, s - t, padded - s))
    self.k_pad = blocks(pad(k_BxSxNxH, front, padded - s))
    self.v_pad = blocks(pad(v_BxSxNxH, front, padded - s))
    if kv_mask_BxS is None:
      kv_mask_BxS = jnp.ones((batch, s), bool)
    self.ok_pad = pad(kv_mask_BxS, front, padded - s).reshape(batch, -1, block_size).transpose(
        1, 0, 2)

  def local_allowed(self, window_size: int | None):
    """Static (b, (prev+1)*b) mask over a query block's local keys: the band when window_size is
    given, else causal only (the band rounded out to whole blocks)."""
    b, p = self.b, self.prev
    dist_bxC = np.arange(b)[:, None] + p * b - np.arange((p + 1) * b)[None, :]
    allowed_bxC = dist_bxC >= 0
    if window_size is not None:
      allowed_bxC &= dist_bxC < window_size
    return allowed_bxC

  def no_selection(self):
    kc, batch, heads, _, h = self.q.shape
    empty = lambda x: jnp.zeros((kc, batch, heads, 0, h), x.dtype)
    return empty(self.k_pad), empty(self.v_pad), jnp.zeros((kc, batch, heads, 0), bool)

  def selected(self, top_k: int):
    """Keys/values/validity (Kc x B x N x top_k*b) of the top_k selected key blocks per query
    block and head, gathered as whole blocks in one go."""
    n, b, p = self.num, self.b, self.prev
    k_eff = min(top_k, max(n - p - 1, 0))   # most blocks any query block can select
    if k_eff == 0:
      return self.no_selection()
    kc, batch, heads = self.q.shape[:3]
    k, v, ok = self.k_pad[p:p + n], self.v_pad[p:p + n], self.ok_pad[p:p + n]
    queries = selection_queries(self.q, self.s - self.t, self.s)
    idx_QxBxNxk, slot_ok = top_blocks(queries, k, ok, p, k_eff)
    bi = jnp.arange(batch)[None, :, None, None]
    ni = jnp.arange(heads)[None, None, :, None]
    take = lambda x: x[idx_QxBxNxk, bi, ni].reshape(kc, batch, heads, k_eff * b, -1)
    key_ok = (ok[idx_QxBxNxk, bi] & slot_ok[..., None]).reshape(kc, batch, heads, k_eff * b)
    return take(k), take(v), key_ok

  def attend(self, allowed_bxC, k_sel, v_sel, ok_sel):
    """Each query block over its local keys and its selected ones -> BxTxNxH."""
    out = _block_attention(self.prev, self.per_chunk, self.q, self.k_pad, self.v_pad,
                           self.ok_pad, jnp.asarray(allowed_bxC), k_sel, v_sel, ok_sel)
    batch, heads = out.shape[1:3]
    out_BxNxPxH = out.transpose(1, 2, 0, 3, 4).reshape(batch, heads, -1, out.shape[-1])
    return out_BxNxPxH[:, :, self.s - self.t:self.s].transpose(0, 2, 1, 3)


def selection_queries(q_KxBxNxbxH, first_real: int, end: int):
  """Per query block of the (scaled, padded) queries: the mean of the previous block's real
  queries and its own first real query (real: positions [first_real, end), not alignment or end
  padding): KxBxNxH, float32, no gradient."""
  kc, b = q_KxBxNxbxH.shape[0], q_KxBxNxbxH.shape[3]
  pos_Kxb = np.arange(kc * b).reshape(kc, b)
  real_Kxb = (pos_Kxb >= first_real) & (pos_Kxb < end)
  q32 = jax.lax.stop_gradient(q_KxBxNxbxH).astype(jnp.float32)
  block_sums = jnp.einsum('kbnrh,kr->kbnh', q32, jnp.asarray(real_Kxb, jnp.float32))
  prev_sums = jnp.pad(block_sums, ((1, 0), (0, 0), (0, 0), (0, 0)))[:-1]
  prev_counts = np.concatenate([[0], real_Kxb.sum(1)[:-1]])
  first_pos = np.minimum(np.maximum(np.arange(kc) * b, first_real), kc * b - 1)
  firsts = q32[first_pos // b, :, :, first_pos % b]
  return (prev_sums + firsts) / jnp.asarray(prev_counts + 1, jnp.float32)[:, None, None, None]


def top_blocks(queries_QxBxNxH, k_KxBxNxbxH, ok_KxBxb, prev: int, k_eff: int):
  """The selection: each query block's k_eff key blocks whose mean valid key (float32, no
  gradient) best matches its selection query, among the blocks entirely before its local ones
  that hold a valid key. (indices, slot valid), QxBxNxk_eff: with fewer eligible blocks than
  k_eff the extra slots hold ineligible indices, marked invalid."""
  counts_KxB = ok_KxBxb.sum(-1)
  ok_f = ok_KxBxb.astype(jnp.float32)[:, :, None, :, None]
  k32 = jax.lax.stop_gradient(k_KxBxNxbxH).astype(jnp.float32)
  pooled_KxBxNxH = (k32 * ok_f).sum(3) / jnp.maximum(counts_KxB, 1)[:, :, None, None]
  scores_QxBxNxK = jnp.einsum('qbnh,kbnh->qbnk', queries_QxBxNxH, pooled_KxBxNxH)
  qi, ki = np.arange(scores_QxBxNxK.shape[0])[:, None], np.arange(k_KxBxNxbxH.shape[0])[None, :]
  eligible_QxBxNxK = jnp.broadcast_to(
      jnp.asarray(ki < qi - prev)[:, None, None, :] & (counts_KxB.T > 0)[None, :, None, :],
      scores_QxBxNxK.shape)
  _, idx_QxBxNxk = jax.lax.top_k(jnp.where(eligible_QxBxNxK, scores_QxBxNxK, -jnp.inf), k_eff)
  return idx_QxBxNxk, jnp.take_along_axis(eligible_QxBxNxK, idx_QxBxNxk, axis=-1)


def _chunk_parts(prev, g, c, k_pad, v_pad, ok_pad, allowed, k_sel, v_sel, ok_sel):
  """Chunk c's key parts (query blocks c*g ..), each (keys, values, mask broadcastable to the
  scores): its local blocks, sliced from the padded arrays (one dynamic slice, then static
  slices), and its selected blocks if any. Separate parts share one softmax without
  concatenating keys or scores."""
  window = lambda x: jax.lax.dynamic_slice_in_dim(x, c * g, g + prev, axis=0)
  local = lambda x, axis: jnp.concatenate([x[j:j + g] for j in range(prev + 1)], axis=axis)
  ok_local = local(window(ok_pad), 2)[:, :, None, None, :]
  parts = [(local(window(k_pad), 3), local(window(v_pad), 3), allowed[None, None, None] & ok_local)]
  if k_sel.shape[3]:
    parts.append((k_sel, v_sel, ok_sel[:, :, :, None, :]))
  return parts


def _scores(q, k, mask):
  scores = jnp.einsum('kbnrh,kbnch->kbnrc', q, k, preferred_element_type=jnp.float32)
  return jnp.where(mask, scores, _NEG)


def _chunks(g, x):
  return x.reshape(x.shape[0] // g, g, *x.shape[1:])


def _unchunk(x):
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _block_attention(prev, g, q, k_pad, v_pad, ok_pad, allowed, k_sel, v_sel, ok_sel):
  """softmax(mask(q k^T)) v per query block over its local + selected keys, float32 softmax, g
  query blocks per scan step. Hand-written backward: autodiff's fused softmax backward ran
  several times slower than the matmuls on XLA CPU, and it would store the probabilities."""
  return _block_attention_fwd(prev, g, q, k_pad, v_pad, ok_pad, allowed, k_sel, v_sel,
                              ok_sel)[0]


def _block_attention_fwd(prev, g, q, k_pad, v_pad, ok_pad, allowed, k_sel, v_sel, ok_sel):
  def step(_, xs):
    c, q_c, k_sel_c, v_sel_c, ok_sel_c = xs
    parts = _chunk_parts(prev, g, c, k_pad, v_pad, ok_pad, allowed, k_sel_c, v_sel_c, ok_sel_c)
    scores = [_scores(q_c, k, mask) for k, _, mask in parts]
    row_max = functools.reduce(jnp.maximum, [s.max(-1, keepdims=True) for s in scores])
    exps = [jnp.exp(s - row_max) for s in scores]
    row_sum = sum(e.sum(-1, keepdims=True) for e in exps)
    out = sum(jnp.einsum('kbnrc,kbnch->kbnrh', (e / row_sum).astype(q.dtype), part[1],
                         preferred_element_type=jnp.float32)
              for e, part in zip(exps, parts, strict=True))
    return None, (out.astype(q.dtype), row_max[..., 0], row_sum[..., 0])

  xs = (jnp.arange(q.shape[0] // g),) + tuple(_chunks(g, x) for x in (q, k_sel, v_sel, ok_sel))
  _, (out, row_max, row_sum) = jax.tree.map(_unchunk, jax.lax.scan(step, None, xs))
  return out, (q, k_pad, v_pad, ok_pad, allowed, k_sel, v_sel, ok_sel, out, row_max, row_sum)


def _block_attention_bwd(prev, g, residuals, d_out):
  q, k_pad, v_pad, ok_pad, allowed, k_sel, v_sel, ok_sel, out, row_max, row_sum = residuals
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

  def add_local(acc, d_local, c):
    # Local key j of query block i is padded block i + j: fold the prev + 1 slots back onto the
    # g + prev blocks this chunk read, and add them where they came from.
    slots = d_local.reshape(*d_local.shape[:3], prev + 1, -1, d_local.shape[-1])
    d_window = sum(jnp.pad(slots[:, :, :, j], ((j, prev - j),) + ((0, 0),) * 4)
                   for j in range(prev + 1))
    start = c * g
    current = jax.lax.dynamic_slice_in_dim(acc, start, g + prev, axis=0)
    return jax.lax.dynamic_update_slice_in_dim(acc, current + d_window, start, axis=0)

  def step(carry, xs):
    c, q_c, k_sel_c, v_sel_c, ok_sel_c, max_c, sum_c, delta_c, d_out_c = xs
    parts = _chunk_parts(prev, g, c, k_pad, v_pad, ok_pad, allowed, k_sel_c, v_sel_c, ok_sel_c)
    d_q, d_kv = 0, []
    for k, v, mask in parts:
      # Probabilities recomputed from the saved row max/sum (exact also for fully masked rows).
      probs = jnp.exp(_scores(q_c, k, mask) - max_c[..., None]) / sum_c[..., None]
      d_v = f32('kbnrc,kbnrh->kbnch', probs.astype(q.dtype), d_out_c)
      d_probs = f32('kbnrh,kbnch->kbnrc', d_out_c, v)
      d_scores = (probs * (d_probs - delta_c[..., None])).astype(q.dtype)
      d_q = d_q + f32('kbnrc,kbnch->kbnrh', d_scores, k)
      d_kv.append((f32('kbnrc,kbnrh->kbnch', d_scores, q_c), d_v))
    (d_k_local, d_v_local), d_sel = d_kv[0], d_kv[1:]
    d_k_pad, d_v_pad = carry
    carry = add_local(d_k_pad, d_k_local, c), add_local(d_v_pad, d_v_local, c)
    d_k_sel, d_v_sel = d_sel[0] if d_sel else (k_sel_c, v_sel_c)   # else zero-size
    return carry, (d_q.astype(q.dtype), d_k_sel.astype(k_sel.dtype), d_v_sel.astype(v_sel.dtype))

  # sum_c probs * d_probs == d_out . out: a reduction over H, not the context, done up front (in
  # the loop XLA CPU fused it into the d_probs matmul, which then ran ~4x slower).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
  xs = (jnp.arange(q.shape[0] // g),) + tuple(
      _chunks(g, x) for x in (q, k_sel, v_sel, ok_sel, row_max, row_sum, delta, d_out))
  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)   # float32 sums across chunks
  (d_k_pad, d_v_pad), (d_q, d_k_sel, d_v_sel) = jax.lax.scan(step, (zeros(k_pad), zeros(v_pad)),
                                                             xs)
  return (_unchunk(d_q), d_k_pad.astype(k_pad.dtype), d_v_pad.astype(v_pad.dtype), None, None,
          _unchunk(d_k_sel), _unchunk(d_v_sel), None)


_block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)


def window_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS=None, *, window_size: int,
                     block_size: int, chunk_positions: int = CHUNK_POSITIONS):
  """Causal sliding-window attention, O(T * (w + b)): each query sees itself and the
  window_size - 1 keys before it (valid ones per kv_mask)."""
  blocks = _Blocks(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS, window_size, block_size,
                   chunk_positions)
  return blocks.attend(blocks.local_allowed(window_size), *blocks.no_selection())


def window_topk_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS=None, *,
                          window_size: int, top_k: int, block_size: int,
                          chunk_positions: int = CHUNK_POSITIONS):
  """Causal local blocks + top_k selected earlier key blocks, O(T * (w + b + top_k * b))."""
  blocks = _Blocks(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS, window_size, block_size,
                   chunk_positions)
  return blocks.attend(blocks.local_allowed(None), *blocks.selected(top_k))
