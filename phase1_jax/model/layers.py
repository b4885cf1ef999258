"""Small building blocks shared by the model's modules."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Dense(nnx.Linear):
  """nnx.Linear that applies its matmul to a 2-D [tokens, features] view of the input, and takes
  its bias gradient with `column_sum`.

  Same parameters as nnx.Linear (kernel [in, out], bias [out]); only how the step computes changes.
  Why the 2-D view: XLA:CPU (jax 0.10) runs the weight gradient x^T @ dy of a 2-D matmul directly
  (transposed operands are native), but for a [B, T, D] input it contracts over two dims (B, T) and
  first copies dy into a transposed [D, B, T] layout, element by element. The 2-D view avoids
  that copy (measurements: docs/performance.md). The reshapes are free (bitcasts).
  """

  def __call__(self, x):
    x_NxI = x.reshape(-1, x.shape[-1])
    bias = None if self.bias is None else self.bias[...]
    x_NxI, kernel_IxO, bias = self.promote_dtype((x_NxI, self.kernel[...], bias), dtype=self.dtype)
    y_NxO = self.dot_general(x_NxI, kernel_IxO, (((1,), (0,)), ((), ())), precision=self.precision)
    if bias is not None:
      y_NxO = add_bias(y_NxO, bias)
    return y_NxO.reshape(*x.shape[:-1], y_NxO.shape[-1])


def column_sum(x_NxO, num_parts: int = 32):
  """Sum over the rows, accumulated in float32. [O]

  In two stages: `num_parts` partial sums over N / num_parts rows each, then their sum (an
  optimization barrier keeps XLA from merging the stages back into one reduction). For a bias
  gradient on a GPU, XLA's one-kernel column reduction is slow at these shapes; this form is
  faster there and neutral on CPU (measurements: docs/performance.md).
  """
  n, o = x_NxO.shape
  if n % num_parts or n < 4 * num_parts:
    return jnp.sum(x_NxO, axis=0, dtype=jnp.float32)
  partial_PxO = jnp.sum(x_NxO.reshape(num_parts, n // num_parts, o), axis=1, dtype=jnp.float32)
  return jax.lax.optimization_barrier(partial_PxO).sum(axis=0)


@jax.custom_vjp
def add_bias(y_NxO, bias_O):
  """y + bias, with the bias gradient taken by column_sum."""
  return y_NxO + bias_O[None, :]


def _add_bias_fwd(y_NxO, bias_O):
  return y_NxO + bias_O[None, :], None


def _add_bias_bwd(_, g_NxO):
  return g_NxO, column_sum(g_NxO).astype(g_NxO.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def scale_and_shift(x_NxD, scale_D, shift_D):
  """x * scale + shift, with the scale and shift gradients taken by column_sum."""
  return x_NxD * scale_D[None, :] + shift_D[None, :]


def _scale_and_shift_fwd(x_NxD, scale_D, shift_D):
  return x_NxD * scale_D[None, :] + shift_D[None, :], (x_NxD, scale_D)


def _scale_and_shift_bwd(residuals, g_NxD):
  x_NxD, scale_D = residuals
  return (g_NxD * scale_D[None, :], column_sum(g_NxD * x_NxD).astype(scale_D.dtype),
          column_sum(g_NxD).astype(scale_D.dtype))


scale_and_shift.defvjp(_scale_and_shift_fwd, _scale_and_shift_bwd)


class LayerNorm(nnx.LayerNorm):
  """nnx.LayerNorm over the last axis (same parameters: scale, bias) computed in float32 with
  the two-pass variance mean((x - mean)^2) (nnx's default takes mean(x^2) - mean^2), its scale and
  offset gradients taken by `column_sum`; output in the compute dtype. Why: the train step ran
  faster than with nnx.LayerNorm on CPU and on a GPU, where nnx's one-kernel column reductions of
  these gradients are slow like the Dense biases' (measurements: docs/performance.md)."""

  def __call__(self, x):
    if self.scale is None or self.bias is None:
      return super().__call__(x)
    x_NxD = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    centered_NxD = x_NxD - x_NxD.mean(axis=-1, keepdims=True)
    variance_Nx1 = jnp.square(centered_NxD).mean(axis=-1, keepdims=True)
    normed_NxD = centered_NxD * jax.lax.rsqrt(variance_Nx1 + self.epsilon)
    y_NxD = scale_and_shift(normed_NxD, self.scale[...].astype(jnp.float32),
                            self.bias[...].astype(jnp.float32))
    return y_NxD.astype(self.dtype or x.dtype).reshape(x.shape)


class Embed(nnx.Embed):
  """nnx.Embed that gathers rows of the float32 table and then casts them to the compute dtype,
  where nnx.Embed casts the whole table first. Why: the gradient's scatter-add then sums in
  float32 (a frequent token's rows add up over many positions; in bfloat16 every add rounds), and
  no V x D cast of the table runs each step (measurements: docs/performance.md).
  """

  def __call__(self, inputs):
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError('Embed: inputs must be integer ids')
    rows = jnp.take(self.embedding[...], inputs, axis=0)
    return rows if self.dtype is None else rows.astype(self.dtype)


def logits_matmul(x_NxD, w_VxD, bias_V=None):
  """x @ w.T (+ bias) as float32 logits [N, V] (accumulated in float32) from operands of one
  dtype; the bias is added in float32.

  In half precision the backward runs in that precision too: the float32 cotangent is cast to
  the operands' dtype before the two gradient matmuls, as PyTorch autocast does. Plain autodiff
  would multiply the float32 cotangent with the half-precision operands, which promotes both
  gradient matmuls to float32 (tf32 on a GPU): for a 50000-token vocabulary head, the step's
  largest matmuls. float32 operands take plain autodiff.
  """
  if x_NxD.dtype == jnp.float32:
    logits_NxV = _float32_logits(x_NxD, w_VxD)
  else:
    logits_NxV = _half_logits_matmul(x_NxD, w_VxD)
  return logits_NxV if bias_V is None else logits_NxV + bias_V.astype(jnp.float32)[None, :]


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
