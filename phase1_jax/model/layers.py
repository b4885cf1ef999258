"""Small building blocks shared by the model's modules."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Dense(nnx.Linear):
  """nnx.Linear that applies its matmul to a 2-D [tokens, features] view of the input.

  Same parameters as nnx.Linear (kernel [in, out], bias [out]); only the matmul's shape changes.
  Why: XLA:CPU (jax 0.10) runs the weight gradient x^T @ dy of a 2-D matmul directly (transposed
  operands are native), but for a [B, T, D] input it contracts over two dims (B, T) and first
  copies dy into a transposed [D, B, T] layout, element by element. Measured on 2 CPU cores: an
  MLP block's forward+backward at B, T, D, M = 16, 256, 256, 1024 ran 1.48x faster (min of 15)
  on the 2-D view, and the whole train step of configs/bench_cpu.py 1.16x. The reshapes are
  free (bitcasts).
  """

  def __call__(self, x, **kwargs):
    if x.ndim <= 2:
      return super().__call__(x, **kwargs)
    y = super().__call__(x.reshape(-1, x.shape[-1]), **kwargs)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def logits_matmul(x_NxD, w_VxD):
  """x @ w.T as float32 logits [N, V] (accumulated in float32) from operands of one dtype.

  In half precision the backward runs in that precision too: the float32 cotangent is cast to
  the operands' dtype before the two gradient matmuls, as PyTorch autocast does. Plain autodiff
  would multiply the float32 cotangent with the half-precision operands, which promotes both
  gradient matmuls to float32 (tf32 on a GPU): for a 50000-token vocabulary head, the step's
  largest matmuls. float32 operands take plain autodiff.
  """
  if x_NxD.dtype == jnp.float32:
    return _float32_logits(x_NxD, w_VxD)
  return _half_logits_matmul(x_NxD, w_VxD)


def _float32_logits(x_NxD, w_VxD):
  return jnp.einsum('nd,vd->nv', x_NxD, w_VxD, preferred_element_type=jnp.float32)


_half_logits_matmul = jax.custom_vjp(_float32_logits)


def _half_logits_matmul_fwd(x_NxD, w_VxD):
  return _half_logits_matmul(x_NxD, w_VxD), (x_NxD, w_VxD)


def _half_logits_matmul_bwd(residuals, g_NxV):
  x_NxD, w_VxD = residuals
  g_NxV = g_NxV.astype(x_NxD.dtype)
  return jnp.einsum('nv,vd->nd', g_NxV, w_VxD), jnp.einsum('nv,nd->vd', g_NxV, x_NxD)


_half_logits_matmul.defvjp(_half_logits_matmul_fwd, _half_logits_matmul_bwd)
