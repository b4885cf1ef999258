"""Causal sliding-window attention as a Pallas flash-attention kernel (GPU Triton backend).

`window_attention` equals `attention.dense_attention(q, k, v, prefix_mask(lengths, T),
causal=True, window_size=w)` for self-attention (T == S), including rows that see no valid key
(dense's uniform average over all keys, added outside the kernel). Query i sees keys j with
i - w < j <= i and j < length.

Why: XLA's attention applies the window as a mask over all T x T scores. Here every program
(one batch-head, one query block) loops only over the key blocks that meet its band, with an
online softmax (float32 running max and sum), and saves the log-sum-exp. The backward
(FlashAttention-2) recomputes the probabilities from it: dq loops over the same key blocks, dk/dv
over the query blocks whose band reaches the key block. `visited_blocks` lists those pairs with
the same bounds the kernels use.

Triton needs power-of-two blocks and head dims (H is zero-padded to one here) and dot operands of
at least 16 rows/columns, so use blocks >= 16 on GPU; interpret mode (CPU) takes any power of two.
Tested in interpret mode and lowered (not run) for CUDA on CPU; not yet measured on a GPU. The
`window` kind runs it on a GPU at long T (sparse_dispatch.py).
"""
from __future__ import annotations

import functools
import numbers
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_NEG = -1e30   # masked scores, as dense_attention (finite: a fully masked row stays finite)
_TRACED = (lax.div, jnp.maximum, jnp.minimum)        # block bounds inside the kernels
_PYTHON = (operator.floordiv, max, min)              # the same bounds as Python ints


class _Geometry(NamedTuple):
  """Static shape of one call (hashable: custom_vjp's non-differentiable argument)."""
  t: int              # real sequence length (queries and keys)
  heads: int
  window_size: int
  block_q: int
  block_k: int
  scale: float
  interpret: bool


def _key_blocks(qb, g, ops):
  """Key blocks [lo, hi) that meet the band of query block qb's queries (real keys only)."""
  div, maximum, minimum = ops
  lo = div(maximum(qb * g.block_q - g.window_size + 1, 0), g.block_k)
  hi = minimum(div((qb + 1) * g.block_q - 1, g.block_k), (g.t - 1) // g.block_k) + 1
  return lo, hi


def _query_blocks(kb, g, ops):
  """Query blocks [lo, hi) whose band reaches key block kb (real queries only)."""
  div, _, minimum = ops
  lo = div(kb * g.block_k, g.block_q)
  last = div((kb + 1) * g.block_k + g.window_size - 2, g.block_q)
  return lo, minimum(last, (g.t - 1) // g.block_q) + 1


def visited_blocks(t: int, window_size: int, block_q: int, block_k: int):
  """The (query block, key block) pairs the kernels visit for length t: (forward and dq, which
  loop over key blocks per query block; dk/dv, which loop over query blocks per key block)."""
  g = _Geometry(t, 1, window_size, block_q, block_k, 1.0, True)
  by_query = [(qb, kb) for qb in range(-(-t // block_q))
              for kb in range(*_key_blocks(qb, g, _PYTHON))]
  by_key = [(qb, kb) for kb in range(-(-t // block_k))
            for qb in range(*_query_blocks(kb, g, _PYTHON))]
  return by_query, by_key


def _scores(q, k, qb, kb, length, g):
  """Masked float32 scores of a (block_q, block_k) tile; q already scaled."""
  span_q = qb * g.block_q + jnp.arange(g.block_q)
  span_k = kb * g.block_k + jnp.arange(g.block_k)
  dist = span_q[:, None] - span_k[None, :]
  mask = (dist >= 0) & (dist < g.window_size) & (span_k[None, :] < length)
  return jnp.where(mask, plgpu.dot(q, k, trans_b=True), _NEG)


def _scaled(q_ref, g, rows=slice(None)):
  """q times the scale in q's dtype, rounded as dense_attention does."""
  q = q_ref[rows, :]
  return q * jnp.asarray(g.scale, q.dtype)


def _band_keys(qb, g):
  """The kernels' loop over query block qb's band: (start, stop, key block of a step)."""
  return (*_key_blocks(qb, g, _TRACED), lambda kb: kb)


def _band_queries(kb, g):
  """The dk/dv loop over the query blocks whose band reaches key block kb."""
  return (*_query_blocks(kb, g, _TRACED), lambda qb: qb)


# The kernels loop over the blocks that `visit(program's block, g, *list_refs)` gives; list_refs
# are extra inputs after the kernel's own (none for the band; pallas_window_topk passes lists).
def _fwd_kernel(len_ref, q_ref, k_ref, v_ref, *refs, g, visit=_band_keys):
  *list_refs, o_ref, lse_ref = refs
  qb, length = pl.program_id(1), len_ref[...]
  start, stop, block = visit(qb, g, *list_refs)
  q = _scaled(q_ref, g)

  def body(step, carry):
    acc, row_max, row_sum = carry
    kb = block(step)
    rows = pl.ds(kb * g.block_k, g.block_k)
    v = v_ref[rows, :]
    s = _scores(q, k_ref[rows, :], qb, kb, length, g)
    new_max = jnp.maximum(row_max, s.max(axis=1))
    alpha = jnp.exp(row_max - new_max)
    p = jnp.exp(s - new_max[:, None])
    acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
    return acc, new_max, alpha * row_sum + p.sum(axis=1)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((g.block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((g.block_q,), jnp.float32))
  # Every program visits >= 1 block (its diagonal), so row_sum > 0: masked scores count too.
  acc, row_max, row_sum = lax.fori_loop(start, stop, body, init)
  o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)
  lse_ref[...] = row_max + jnp.log(row_sum)


def _dq_kernel(len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, g,
               visit=_band_keys):
  *list_refs, dq_ref = refs
  qb, length = pl.program_id(1), len_ref[...]
  start, stop, block = visit(qb, g, *list_refs)
  q, do = _scaled(q_ref, g), do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(step, dq):
    kb = block(step)
    rows = pl.ds(kb * g.block_k, g.block_k)
    k = k_ref[rows, :]
    p = jnp.exp(_scores(q, k, qb, kb, length, g) - lse[:, None])
    ds = p * (plgpu.dot(do, v_ref[rows, :], trans_b=True) - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(start, stop, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * g.scale).astype(dq_ref.dtype)


def _dkv_kernel(len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, g,
                visit=_band_queries):
  *list_refs, dk_ref, dv_ref = refs
  kb, length = pl.program_id(1), len_ref[...]
  start, stop, block = visit(kb, g, *list_refs)
  k, v = k_ref[...], v_ref[...]

  def body(step, carry):
    dk, dv = carry
    qb = block(step)
    rows = pl.ds(qb * g.block_q, g.block_q)
    q, do = _scaled(q_ref, g, rows), do_ref[rows, :]
    p = jnp.exp(_scores(q, k, qb, kb, length, g) - lse_ref[rows][:, None])
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (plgpu.dot(do, v, trans_b=True) - delta_ref[rows][:, None])
    return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(start, stop, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _rows(g, rows, hp, whole=False):
  """Spec of `rows` positions of one batch-head of a [B, T, N, H] array, at the grid's block
  (or the whole sequence)."""
  block = lambda i: 0 if whole else i
  return pl.BlockSpec((None, rows, None, hp),
                      lambda bh, i: (lax.div(bh, g.heads), block(i), lax.rem(bh, g.heads), 0))


def _vector(rows, whole=False):
  """Spec of a [B*N, T] float32 array (log-sum-exp, delta)."""
  return pl.BlockSpec((None, rows), lambda bh, i: (bh, 0 if whole else i))


def _call(kernel, g, grid, in_specs, out_specs, out_shape, name, *args):
  """pallas_call over (batch * heads, blocks); the lengths lead every kernel's arguments."""
  hp = args[1].shape[-1]
  length_spec = pl.BlockSpec((None,), lambda bh, i: (lax.div(bh, g.heads),))
  return pl.pallas_call(
      functools.partial(kernel, g=g), out_shape=out_shape, grid=grid,
      in_specs=[length_spec, *in_specs], out_specs=out_specs, interpret=g.interpret, name=name,
      compiler_params=plgpu.CompilerParams(num_warps=4 if hp <= 64 else 8, num_stages=2),
  )(*args)


def _forward(q, k, v, lengths, g):
  batch, tq, _, hp = q.shape
  tk = k.shape[1]
  out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch * g.heads, tq), jnp.float32))
  in_specs = [_rows(g, g.block_q, hp), _rows(g, tk, hp, True), _rows(g, tk, hp, True)]
  out_specs = (_rows(g, g.block_q, hp), _vector(g.block_q))
  return _call(_fwd_kernel, g, (batch * g.heads, tq // g.block_q), in_specs, out_specs,
               out_shape, 'window_attention_fwd', lengths, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, lengths, g):
  return _forward(q, k, v, lengths, g)[0]


def _flash_fwd(q, k, v, lengths, g):
  out, lse = _forward(q, k, v, lengths, g)
  return out, (q, k, v, lengths, out, lse)


def _delta(d_out, out):
  """sum_j p_ij dp_ij = d_out_i . out_i as [B*N, T] float32: one reduction over H, up front."""
  batch, t, heads, _ = out.shape
  delta = jnp.einsum('btnh,btnh->bnt', d_out.astype(jnp.float32), out.astype(jnp.float32))
  return delta.reshape(batch * heads, t)


def _flash_bwd(g, residuals, d_out):
  q, k, v, lengths, out, lse = residuals
  batch, tq, _, hp = q.shape
  tk = k.shape[1]
  args = (lengths, q, k, v, d_out, lse, _delta(d_out, out))
  whole_q = [_rows(g, tq, hp, True)]
  whole_k = [_rows(g, tk, hp, True)] * 2
  dq = _call(_dq_kernel, g, (batch * g.heads, tq // g.block_q),
             [_rows(g, g.block_q, hp), *whole_k, _rows(g, g.block_q, hp), _vector(g.block_q),
              _vector(g.block_q)], _rows(g, g.block_q, hp), jax.ShapeDtypeStruct(q.shape, q.dtype),
             'window_attention_dq', *args)
  block_k = [_rows(g, g.block_k, hp)] * 2
  dk, dv = _call(_dkv_kernel, g, (batch * g.heads, tk // g.block_k),
                 [*whole_q, *block_k, *whole_q, _vector(tq, True), _vector(tq, True)],
                 block_k, (jax.ShapeDtypeStruct(k.shape, k.dtype),) * 2,
                 'window_attention_dkv', *args)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _power_of_two(block: int) -> bool:
  return block & (block - 1) == 0


def check_arguments(q, k, v, kv_lengths_B, window_size, *,
                    block_rule=(_power_of_two, 'a power of two (Triton tiles)'), **blocks):
  """ValueErrors naming the argument, before anything traces: self-attention shapes, lengths,
  window_size, and each named block an int >= 1 that block_rule's predicate accepts (the
  kernels' tiling; the description goes in the message)."""
  if not q.shape == k.shape == v.shape or q.ndim != 4:
    raise ValueError(f'q, k, v: need equal [B, T, N, H] shapes (self-attention), got '
                     f'{q.shape}, {k.shape}, {v.shape}')
  if kv_lengths_B is not None and kv_lengths_B.shape != q.shape[:1]:
    raise ValueError(f'kv_lengths_B: shape {kv_lengths_B.shape}, expected ({q.shape[0]},)')
  if isinstance(window_size, bool) or not isinstance(window_size, numbers.Integral) or (
      window_size < 1):
    raise ValueError(f'window_size={window_size!r}: must be an int >= 1')
  accepts, rule = block_rule
  for name, block in blocks.items():
    if (isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1
        or not accepts(block)):
      raise ValueError(f'{name}={block!r}: must be {rule}')


def window_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, *, window_size: int,
                     block_q: int = 64, block_k: int = 64, interpret: bool = False):
  """Causal sliding-window self-attention: query i sees keys i - window_size < j <= i with
  j < kv_lengths_B[b] (None: all keys). [B, T, N, H] -> [B, T, N, H] in q's dtype, softmax in
  float32, scale H**-0.5; a row with no such key gets the mean of all T values, as in
  dense_attention. Differentiable (reverse mode) in q, k, v. block_q, block_k: powers of two
  (>= 16 on GPU); T is padded to them. interpret=True runs the kernels on CPU."""
  check_arguments(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, window_size, block_q=block_q,
                  block_k=block_k)
  batch, t, heads, h = q_BxTxNxH.shape
  g = _Geometry(t, heads, int(window_size), int(block_q), int(block_k), h ** -0.5, interpret)
  full = kv_lengths_B is None
  lengths = (jnp.full((batch,), t, jnp.int32) if full
             else jnp.clip(kv_lengths_B.astype(jnp.int32), 0, t))
  hp = pl.next_power_of_2(h)
  pad = lambda x, block: jnp.pad(x, ((0, 0), (0, -(-t // block) * block - t), (0, 0),
                                     (0, hp - h)))
  out = _flash(pad(q_BxTxNxH, block_q), pad(k_BxTxNxH, block_k), pad(v_BxTxNxH, block_k),
               lengths, g)[:, :t, :, :h]
  if full:
    return out
  # A row with no valid key in its window: dense's masked scores are all equal, so it averages
  # every key. That mean is O(T * H), outside the kernel (whose blocks cover the band only).
  empty_BxT = jnp.maximum(jnp.arange(t) - window_size + 1, 0)[None, :] >= lengths[:, None]
  mean_Bx1xNxH = jnp.mean(v_BxTxNxH.astype(jnp.float32), axis=1, keepdims=True)
  return jnp.where(empty_BxT[:, :, None, None], mean_Bx1xNxH.astype(out.dtype), out)
