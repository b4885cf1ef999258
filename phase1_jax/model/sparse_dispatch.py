"""Which implementation runs a block-sparse kind (`window`, `window_topk`) for a call; the calls.

`implementation(...)` is the whole decision, one table, made at trace time from static shapes:
- 'pallas': the Pallas flash kernels (pallas_window, pallas_window_topk), which visit only the
  band's (and the selected) key blocks. On a GPU backend, self-attention (T == S) with keys
  masked by lengths or not at all, T > FUSED_DENSE_MAX_T, and shapes Triton takes.
- 'splash': on a TPU backend, self-attention (T == S) with keys masked by lengths or not at all,
  at any T, through JAX's splash attention kernel (splash_window): `window` in SPLASH_WINDOW_TILE
  blocks, `window_topk` where its block_size is a multiple of 128 (splash's blocks are its
  selection's), else 'xla'.
- 'cudnn': on a GPU at T <= FUSED_DENSE_MAX_T in half precision, the dense fused kernel
  (`attention.dot_product_attention`, cuDNN) with the same mask: the band for `window`; for
  `window_topk` only where its top_k selects every eligible block, so its mask is causal (no
  fused kernel expresses a top-k block selection).
- 'xla': sparse_attention's implementation (today's): everywhere else, e.g. a CPU, T != S
  (queries after a prefix), a key mask tensor, or shapes the kernels do not take.

Why the threshold: at short T the band covers most of the causal triangle, and cuDNN's fused
kernel should beat the Pallas one there (the issue's bar: nothing slower than before at
T <= 2k). Its value is a placeholder, to be measured on a GPU (benchmarks/attention.py).
No threshold on a TPU: there the dense fused kernel is splash itself (jax.nn.dot_product_attention
has no fused TPU implementation; XLA's materializes the T x S scores), and splash with the band
mask visits a subset of the blocks splash with a causal mask would, so nothing shorter runs
faster through another path (unmeasured: the per-call overhead at tiny T may favour XLA).
`force_implementation('pallas' | 'splash')` runs that kernel wherever it takes the call on any
backend (interpret mode off its device), so CPU tests reach the wired paths.

Several devices: under pmap each device calls the kernel on its own pages. Under a jit over a mesh
GSPMD cannot partition a kernel (a custom call): it would gather the whole batch onto every
device. `kernel_mesh(mesh)` (parallel.py enters it around its jitted steps) makes each kernel
call (and `fused_cpu`'s FFI call, attention.py) a shard_map over the mesh (over_pages), every
device attending over its own pages (the batch axis split over all mesh axes, as parallel.py
splits batches; a batch the mesh does not divide stays whole).
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from phase1_jax.model import pallas_window, pallas_window_topk, sparse_attention, splash_window

# T at or below which a GPU runs the dense fused kernel instead: to be measured on a GPU.
FUSED_DENSE_MAX_T = 2048
# Pallas `window` tiles (block_q = block_k; its result does not depend on them, nor on the XLA
# implementation's block_size): the tested default, to be tuned on a GPU.
WINDOW_TILE = 64
# Head dims the Pallas path takes: Triton's dot needs >= 16 columns (H is zero-padded to a power
# of two); above 128 the kernels are untested.
HEAD_DIMS = (16, 128)
# splash `window` blocks (block_q = block_k; the result does not depend on them): TPU lanes, the
# least padding of T and of the band's edges; to be tuned on a TPU (larger blocks mean fewer grid
# steps but more masked keys per query block).
SPLASH_WINDOW_TILE = splash_window.LANES
IMPLEMENTATIONS = ('pallas', 'splash', 'cudnn', 'xla')
FORCEABLE = ('pallas', 'splash')   # kernels with an interpret mode
_FORCED = contextvars.ContextVar('forced_implementation', default=None)
_MESH = contextvars.ContextVar('kernel_mesh', default=None)


@contextlib.contextmanager
def force_implementation(name: str):
  """Within: `name` (one of FORCEABLE) wherever its kernel takes the call, on any backend
  (interpret mode off its device), for tests. Read at trace time, so a function jitted inside
  keeps its choice."""
  if name not in FORCEABLE:
    raise ValueError(f'force_implementation({name!r}): one of {", ".join(FORCEABLE)}')
  token = _FORCED.set(name)
  try:
    yield
  finally:
    _FORCED.reset(token)


@contextlib.contextmanager
def kernel_mesh(mesh: jax.sharding.Mesh | None):
  """Within: kernel calls split their batch over `mesh`, a mesh of Auto axes as parallel.py's
  (shard_map reshards its inputs there; see the module docstring).
  Read at trace time, as force_implementation."""
  token = _MESH.set(mesh)
  try:
    yield
  finally:
    _MESH.reset(token)


def force_pallas():
  """force_implementation('pallas')."""
  return force_implementation('pallas')


def _pallas_takes(kind, head_dim, block_size):
  """Shapes the kernels take: a head dim Triton tiles; for `window_topk` a power-of-two block
  >= 16 (its blocks are the selection's, so they cannot be retiled)."""
  if not HEAD_DIMS[0] <= head_dim <= HEAD_DIMS[1]:
    return False
  return kind == 'window' or (block_size >= 16 and block_size & (block_size - 1) == 0)


def _splash_takes(kind, block_size):
  """Shapes splash takes: any head dim (a whole-dim block); for `window_topk` a block that is a
  multiple of 128 lanes (`window` tiles with its own SPLASH_WINDOW_TILE)."""
  return kind == 'window' or block_size % splash_window.LANES == 0


def selects_every_block(t, window_size, top_k, block_size) -> bool:
  """window_topk's top_k covers every block before the local ones: its mask is then causal."""
  num = -(-t // block_size)
  return top_k >= num - sparse_attention.local_blocks_before(num, window_size, block_size) - 1


def implementation(kind, *, t, s, head_dim, dtype, window_size, block_size, top_k=None,
                   key_lengths=True, backend=None) -> str:
  """One of IMPLEMENTATIONS for a causal `window`/`window_topk` call of T queries over S keys.
  key_lengths: keys masked by lengths or not at all (no mask tensor). backend: default
  jax.default_backend()."""
  backend = backend or jax.default_backend()
  if t != s:
    return 'xla'
  pallas = key_lengths and _pallas_takes(kind, head_dim, block_size)
  splash = key_lengths and _splash_takes(kind, block_size)
  forced = _FORCED.get()
  if forced is not None:
    return forced if {'pallas': pallas, 'splash': splash}[forced] else 'xla'
  if backend == 'tpu':   # at any T: see the module docstring
    return 'splash' if splash else 'xla'
  if backend != 'gpu':
    return 'xla'
  if t > FUSED_DENSE_MAX_T:
    return 'pallas' if pallas else 'xla'
  same_mask = kind == 'window' or selects_every_block(t, window_size, top_k, block_size)
  # What cuDNN takes (half precision; head dims <= 128, a multiple of 8, on every GPU it runs).
  cudnn = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0
  return 'cudnn' if same_mask and cudnn else 'xla'


# Each kernel implementation: (window module, window_topk module, its backend, window tiles).
_KERNELS = {'pallas': (pallas_window, pallas_window_topk, 'gpu', WINDOW_TILE),
            'splash': (splash_window, splash_window, 'tpu', SPLASH_WINDOW_TILE)}


def kernel_attention(chosen, kind, q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B, *,
                     window_size, top_k, block_size):
  """The `chosen` kernel ('pallas' or 'splash') of `kind`, keys [0, length) or all; interpret
  mode off the kernel's backend; a shard_map over the batch within kernel_mesh."""
  window, topk, backend, tile = _KERNELS[chosen]
  interpret = jax.default_backend() != backend

  def attend(q, k, v, *lengths):
    lengths_B = lengths[0] if lengths else None
    if kind == 'window':
      return window.window_attention(q, k, v, lengths_B, window_size=window_size, block_q=tile,
                                     block_k=tile, interpret=interpret)
    return topk.window_topk_attention(q, k, v, lengths_B, window_size=window_size, top_k=top_k,
                                      block_size=block_size, interpret=interpret)

  return over_pages(attend, q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kv_lengths_B)


def over_pages(attend, *arrays):
  """attend(*arrays) (None entries dropped), within kernel_mesh a shard_map splitting every
  array's leading (pages) axis over the mesh: for a kernel GSPMD cannot partition (a Pallas or
  FFI custom call). Without a mesh, or with a batch it does not divide, one call."""
  args = tuple(a for a in arrays if a is not None)
  mesh = _MESH.get()
  if mesh is None or mesh.size == 1 or args[0].shape[0] % mesh.size:
    return attend(*args)
  pages = PartitionSpec(tuple(mesh.axis_names))
  return jax.shard_map(attend, mesh=mesh, in_specs=(pages,) * len(args), out_specs=pages,
                       check_vma=False)(*args)


def xla_attention(kind, q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS, *, window_size, top_k,
                  block_size):
  """sparse_attention's implementation of `kind` (any backend, T <= S, any key mask)."""
  args = (q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_mask_BxS)
  if kind == 'window':
    return sparse_attention.window_attention(*args, window_size=window_size,
                                             block_size=block_size)
  return sparse_attention.window_topk_attention(*args, window_size=window_size, top_k=top_k,
                                                block_size=block_size)
