"""Attention behind one function: every kind takes the same arguments and returns the same shape.

`attend(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS=None, *, kv_lengths_B=None, causal=False,
        kind='dense', window_size=None, top_k=None, block_size=None) -> BxTxNxH` (dtype of q).

Keys are masked by `kv_mask_BxS` (any pattern) or by `kv_lengths_B` (keys [0, length) valid),
not both. Every kind takes either; lengths are what cuDNN's fused attention takes without a
mask tensor, so the model passes lengths (its masks are prefixes, see phase1.py).

Kinds:
- `dense`: the reference. Scores and softmax in float32 (normalized after the value matmul),
  masks applied as a large negative bias (finite, so a fully masked row gives a uniform average
  instead of NaN). O(T*S) memory.
- `dot_product`: `jax.nn.dot_product_attention` (cuDNN flash for bf16/fp16 on GPU when it accepts
  the call, XLA otherwise). Same masks, same result. Given lengths, cuDNN runs its padding mask
  and no mask tensor: 1.16x on the configs/default.py bf16 train step on an H100
  (docs/performance.md).
- `window`, `window_topk`: block-sparse causal kinds, see sparse_attention.py. On a GPU,
  self-attention runs their Pallas kernels (long T) or cuDNN with the same mask (T <= 2048); on
  a TPU splash attention; elsewhere sparse_attention's XLA code: sparse_dispatch.py decides.
- `fused_cpu`: the same result as `dense` from a compiled C++ kernel (cpu_attention.py): the
  scores stay in cache-sized blocks, the masked causal half is skipped, and the backward pass
  recomputes the probabilities. CPU only; keys masked by lengths (prefixes) only.

`window_size` on `dense`/`dot_product` applies the same band as `window` as a mask only (still
O(T*S)): the reference the sparse kinds are tested against. Arguments a kind does not use raise
a ValueError rather than being ignored, so a config cannot silently run a kind it did not mean;
`kind_options` picks the ones a kind takes.

`AttentionSpec` is one resolved attention as a value (kind + options, checked once when built):
the model's layers hold it and call it in place of `attend`.

Causal with T < S: query i sits at key position i + S - T (the last T positions), in every kind.
"""
from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from phase1_jax.model import cpu_attention, sparse_attention, sparse_dispatch

KINDS = ('dense', 'dot_product', 'window', 'window_topk', 'fused_cpu')
SPARSE_KINDS = ('window', 'window_topk')
# Kinds that take key lengths (no mask tensor), causal or not: the model's cross-attention runs
# the same kind as its self-attention when it is one of these.
LENGTH_KINDS = ('dot_product', 'fused_cpu')
_NEG = -1e30
# Options each kind accepts; anything else passed to `attend` is an error.
_OPTIONS = {'dense': ('window_size',), 'dot_product': ('window_size',),
            'window': ('window_size', 'block_size'),
            'window_topk': ('window_size', 'top_k', 'block_size'), 'fused_cpu': ()}
_REQUIRED = {'window': ('window_size',), 'window_topk': ('window_size', 'top_k')}


def prefix_mask(lengths_B, size: int):
  """[batch, size] bool: True at positions [0, length) of each row."""
  return jnp.arange(size)[None, :] < lengths_B[:, None]


def _causal_mask_TxS(t: int, s: int, window_size: int | None):
  """Query i (at key position i + s - t) sees keys j <= its position, and with a window only
  the `window_size` latest of them (itself included)."""
  dist_TxS = jnp.arange(t)[:, None] + (s - t) - jnp.arange(s)[None, :]
  mask_TxS = dist_TxS >= 0
  if window_size is not None:
    mask_TxS = mask_TxS & (dist_TxS < window_size)
  return mask_TxS


def dense_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS=None, *, causal: bool = False,
                    window_size: int | None = None):
  """Plain masked softmax attention, O(T*S) memory. Output dtype = q's dtype.

  `window_size` (causal only) restricts each query to itself and the `window_size - 1` keys
  before it: the band the `window` kind computes block-sparsely.
  """
  if window_size is not None and not causal:
    raise ValueError('window_size: a sliding window needs causal=True')
  dtype = q_BxTxNxH.dtype
  scale = q_BxTxNxH.shape[-1] ** -0.5
  scores_BxNxTxS = jnp.einsum('btnh,bsnh->bnts', q_BxTxNxH * jnp.asarray(scale, dtype), k_BxSxNxH,
                              preferred_element_type=jnp.float32)
  t, s = scores_BxNxTxS.shape[-2:]
  mask = jnp.ones((1, 1, t, s), bool)
  if causal:
    mask = mask & _causal_mask_TxS(t, s, window_size)[None, None]
  if kv_mask_BxS is not None:
    mask = mask & kv_mask_BxS[:, None, None, :]
  scores_BxNxTxS = jnp.where(mask, scores_BxNxTxS, _NEG)
  # Softmax normalized after the value matmul: the division (and its gradient) runs on the
  # B x T x N x H output instead of the B x N x T x S probabilities, for which XLA:CPU
  # materialized a broadcast of 1/sum per layer (measured: 1.06x on the configs/small.py step,
  # 1.02x on bench_cpu). The max is held out of the gradient (any constant gives the same result).
  max_BxNxT = jax.lax.stop_gradient(scores_BxNxTxS.max(axis=-1))
  unnorm_BxNxTxS = jnp.exp(scores_BxNxTxS - max_BxNxT[..., None])
  sum_BxTxN = jnp.swapaxes(unnorm_BxNxTxS.sum(axis=-1), 1, 2)
  out_BxTxNxH = jnp.einsum('bnts,bsnh->btnh', unnorm_BxNxTxS.astype(dtype), v_BxSxNxH,
                           preferred_element_type=jnp.float32)
  return (out_BxTxNxH / sum_BxTxN[..., None]).astype(dtype)


def _dot_product_implementation(dtype):
  # In jax 0.10.2 implementation=None always means XLA, so cuDNN must be asked for by name; it
  # takes only half-precision inputs.
  if jax.default_backend() == 'gpu' and dtype in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return None


def dot_product_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS=None, *,
                          kv_lengths_B=None, causal: bool = False,
                          window_size: int | None = None):
  """`jax.nn.dot_product_attention` with this module's mask conventions."""
  if window_size is not None and not causal:
    raise ValueError('window_size: a sliding window needs causal=True')
  t, s = q_BxTxNxH.shape[1], k_BxSxNxH.shape[1]
  kwargs = {}
  if kv_lengths_B is not None:
    kwargs['key_value_seq_lengths'] = kv_lengths_B.astype(jnp.int32)
  mask_BxNxTxS = None
  if causal and t == s:
    # Built-in flags let cuDNN skip the masked blocks instead of reading a mask tensor.
    kwargs['is_causal'] = True
    if window_size is not None:
      kwargs['local_window_size'] = (window_size - 1, 0)
  elif causal:
    # is_causal aligns query 0 with key 0; ours aligns the last query with the last key.
    mask_BxNxTxS = _causal_mask_TxS(t, s, window_size)[None, None]
  if kv_mask_BxS is not None:
    kv_BxNxTxS = kv_mask_BxS[:, None, None, :]
    mask_BxNxTxS = kv_BxNxTxS if mask_BxNxTxS is None else mask_BxNxTxS & kv_BxNxTxS
  call = lambda impl: jax.nn.dot_product_attention(
      q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask=mask_BxNxTxS, implementation=impl, **kwargs)
  implementation = _dot_product_implementation(q_BxTxNxH.dtype)
  if implementation is None:
    return call(None)
  try:
    return call(implementation)
  except (ValueError, NotImplementedError, RuntimeError):
    # cuDNN refuses some shapes/head dims at trace time; XLA takes everything.
    return call(None)


def kind_options(kind: str, *, window_size=None, top_k=None, block_size=None) -> dict:
  """The subset of (window_size, top_k, block_size) that `kind` takes, as `attend` kwargs.

  For a model config that stores all three: `attend(..., kind=kind, **kind_options(kind, ...))`.
  `dense`/`dot_product` get none of them (a window on those is only for testing).
  """
  _check_kind(kind)
  given = {'window_size': window_size, 'top_k': top_k, 'block_size': block_size}
  names = () if kind not in SPARSE_KINDS else _OPTIONS[kind]
  return {name: given[name] for name in names}


def _check_kind(kind):
  if kind not in KINDS:
    raise ValueError(f'attention kind {kind!r}: must be one of {", ".join(KINDS)}')


def _check_options(kind, options):
  for name, value in options.items():
    if value is not None and name not in _OPTIONS[kind]:
      raise ValueError(f'{name}={value!r}: not used by attention kind {kind!r} '
                       f'(takes {", ".join(_OPTIONS[kind])})')
  for name in _REQUIRED.get(kind, ()):
    if options[name] is None:
      raise ValueError(f'{name}: required by attention kind {kind!r}')
  for name, low in (('window_size', 1), ('top_k', 0), ('block_size', 1)):
    value = options[name]
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                              or value < low):
      raise ValueError(f'{name}={value!r}: must be an int >= {low}')


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """One resolved attention (never 'auto'): a kind and the options it takes, checked once, here.

  Frozen and hashable, so a module keeps it as static structure and a jitted function closes
  over it. `spec(q, k, v, kv_mask_BxS, kv_lengths_B=..., causal=...)` is `attend` without
  re-checking the options at every trace.
  """
  kind: str = 'dense'
  window_size: int | None = None
  top_k: int | None = None
  block_size: int | None = None

  def __post_init__(self):
    _check_kind(self.kind)
    _check_options(self.kind, self.options())

  @classmethod
  def of(cls, kind: str, *, window_size=None, top_k=None, block_size=None) -> AttentionSpec:
    """The spec of `kind` with the options it takes (a config stores all three)."""
    return cls(kind, **kind_options(kind, window_size=window_size, top_k=top_k,
                                    block_size=block_size))

  def options(self) -> dict:
    return {'window_size': self.window_size, 'top_k': self.top_k, 'block_size': self.block_size}

  def bidirectional(self) -> AttentionSpec:
    """What the cross-attention and the patch encoder run: this kind when it takes key lengths
    (LENGTH_KINDS), else `dense` (the sparse kinds are causal self-attention only)."""
    return AttentionSpec(self.kind) if self.kind in LENGTH_KINDS else DENSE

  def __call__(self, q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS=None, *, kv_lengths_B=None,
               causal: bool = False):
    return _dispatch(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS, kv_lengths_B=kv_lengths_B,
                     causal=causal, kind=self.kind, **self.options())


DENSE = AttentionSpec()


def attend(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS=None, *, kv_lengths_B=None,
           causal: bool = False, kind: str = 'dense', window_size: int | None = None,
           top_k: int | None = None, block_size: int | None = None):
  """Multi-head attention of T queries over S keys; `kind` picks the implementation.

  kv_mask_BxS: True where a key may be attended; or kv_lengths_B: keys [0, length) may be
  attended. window_size: each query sees itself and the window_size - 1 keys before it.
  top_k (`window_topk`): earlier key blocks selected per query block. block_size (sparse
  kinds): default `sparse_attention.default_block_size(window_size)`.
  """
  _check_kind(kind)
  _check_options(kind, {'window_size': window_size, 'top_k': top_k, 'block_size': block_size})
  return _dispatch(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS, kv_lengths_B=kv_lengths_B,
                   causal=causal, kind=kind, window_size=window_size, top_k=top_k,
                   block_size=block_size)


def _dispatch(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS, *, kv_lengths_B, causal, kind,
              window_size, top_k, block_size):
  """`attend` past the option checks: masks, then the kind's implementation."""
  if kind in SPARSE_KINDS and not causal:
    raise ValueError(f'causal=False: attention kind {kind!r} is causal self-attention only; '
                     "use 'dense' or 'dot_product' for cross-attention")
  if kv_lengths_B is not None:
    if kv_mask_BxS is not None:
      raise ValueError('kv_mask_BxS and kv_lengths_B: give one of them, not both')
    if kv_lengths_B.shape != k_BxSxNxH.shape[:1]:
      raise ValueError(f'kv_lengths_B: shape {kv_lengths_B.shape}, expected '
                       f'({k_BxSxNxH.shape[0]},), one length per batch row')
    if kind == 'dense':   # the others take lengths (the sparse kinds: their Pallas kernels)
      kv_mask_BxS = prefix_mask(kv_lengths_B, k_BxSxNxH.shape[1])
      kv_lengths_B = None
  if kind == 'fused_cpu':
    if kv_mask_BxS is not None:
      raise ValueError("kv_mask_BxS: attention kind 'fused_cpu' masks keys by kv_lengths_B "
                       '(prefixes) only')
    if causal and q_BxTxNxH.shape[1] > k_BxSxNxH.shape[1]:
      raise ValueError(f"q_BxTxNxH: causal kind 'fused_cpu' needs T <= S, got "
                       f'T={q_BxTxNxH.shape[1]}, S={k_BxSxNxH.shape[1]}')
    fused = lambda q, k, v, *lengths: cpu_attention.fused_attention(q, k, v, *lengths,
                                                                    causal=causal)
    return sparse_dispatch.over_pages(fused, q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_lengths_B)
  args = (q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS)
  if kind == 'dense':
    return dense_attention(*args, causal=causal, window_size=window_size)
  if kind == 'dot_product':
    return dot_product_attention(*args, kv_lengths_B=kv_lengths_B, causal=causal,
                                 window_size=window_size)
  return _sparse(kind, *args, kv_lengths_B, window_size=window_size, top_k=top_k,
                 block_size=block_size)


def _sparse(kind, q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS, kv_lengths_B, *, window_size,
            top_k, block_size):
  """A causal sparse kind through the implementation sparse_dispatch picks for this call: its
  Pallas (GPU) or splash (TPU) kernel, the dense fused kernel with the same mask, or
  sparse_attention's (XLA)."""
  t, s = q_BxTxNxH.shape[1], k_BxSxNxH.shape[1]
  if t > s:
    raise ValueError(f'q_BxTxNxH: causal kind {kind!r} needs T <= S, got T={t}, S={s}')
  if block_size is None:
    block_size = sparse_attention.default_block_size(window_size)
  options = dict(window_size=window_size, top_k=top_k, block_size=block_size)
  chosen = sparse_dispatch.implementation(kind, t=t, s=s, head_dim=q_BxTxNxH.shape[-1],
                                          dtype=q_BxTxNxH.dtype,
                                          key_lengths=kv_mask_BxS is None, **options)
  qkv = (q_BxTxNxH, k_BxSxNxH, v_BxSxNxH)
  if chosen in ('pallas', 'splash'):
    return sparse_dispatch.kernel_attention(chosen, kind, *qkv, kv_lengths_B, **options)
  if chosen == 'cudnn':   # window_topk only where its mask is causal
    return dot_product_attention(*qkv, kv_mask_BxS, kv_lengths_B=kv_lengths_B, causal=True,
                                 window_size=window_size if kind == 'window' else None)
  if kv_lengths_B is not None:
    kv_mask_BxS = prefix_mask(kv_lengths_B, s)
  return sparse_dispatch.xla_attention(kind, *qkv, kv_mask_BxS, **options)
