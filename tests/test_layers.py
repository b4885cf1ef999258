"""phase1_jax.model.layers: logits_matmul, column_sum, Dense, Embed and LayerNorm against plain
autodiff and the nnx modules, in float32 and bfloat16."""
from __future__ import annotations

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phase1_jax.model import layers


def _dot_operand_dtypes(jaxpr):
  """Operand dtypes of every dot_general in a jaxpr, sub-jaxprs (custom_vjp, pjit) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _dot_operand_dtypes(sub)
  return found


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_logits_matmul_backward_stays_in_operand_dtype(dtype):
  """Float32 logits either way; in bfloat16 both gradient matmuls take bfloat16 operands (plain
  autodiff would promote them to float32) and the gradients match the float32 ones within
  bfloat16 rounding; in float32 they equal plain autodiff."""
  rng = np.random.default_rng(3)
  x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((12, 16), (40, 16)))
  g = jnp.asarray(rng.standard_normal((12, 40)), jnp.float32)
  plain = lambda x, w: jnp.einsum('nd,vd->nv', x, w, preferred_element_type=jnp.float32)

  def pull(f, x, w):
    out, vjp = jax.vjp(f, x, w)
    return out, vjp(g)

  xd, wd = x.astype(dtype), w.astype(dtype)
  out, grads = pull(layers.logits_matmul, xd, wd)
  chex.assert_type(out, jnp.float32)
  chex.assert_trees_all_equal_dtypes(grads, (xd, wd))
  closed = jax.make_jaxpr(lambda x, w: pull(layers.logits_matmul, x, w))(xd, wd)
  assert set(_dot_operand_dtypes(closed.jaxpr)) == {(str(jnp.dtype(dtype)),) * 2}
  ref_out, ref_grads = pull(plain, x, w)
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  for got, ref in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((ref_out, ref_grads))):
    got, ref = np.asarray(got, np.float32), np.asarray(ref)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol


@pytest.mark.parametrize('n', [256, 250, 8])   # two stages; rows not divisible; too few rows
def test_column_sum_matches_sum(n):
  x = jnp.asarray(np.random.default_rng(n).standard_normal((n, 24)), jnp.bfloat16)
  got = jax.jit(layers.column_sum)(x)
  chex.assert_shape(got, (24,))
  chex.assert_type(got, jnp.float32)
  np.testing.assert_allclose(got, np.asarray(x, np.float64).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dense_matches_nnx_linear_with_gradients(dtype):
  """Dense (2-D view, column_sum bias gradient) against a float32 nnx.Linear with the same
  parameters: outputs and gradients w.r.t. kernel, bias and input, on a [B, T, D] input (in
  bfloat16 within its rounding)."""
  rng = np.random.default_rng(5)
  ref = nnx.Linear(16, 24, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  ref.bias[...] = jnp.asarray(rng.standard_normal(24), jnp.float32)
  ours = layers.Dense(16, 24, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
  nnx.update(ours, nnx.state(ref))
  x = jnp.asarray(rng.standard_normal((4, 64, 16)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((4, 64, 24)), jnp.float32)
  grads = assert_matches_float32_reference(ours, ref, x, g, 1e-6 if dtype == jnp.float32 else 1e-2)
  assert float(jnp.abs(grads[0]['bias'][...]).min()) > 0


def assert_matches_float32_reference(ours, ref, x, g, tol):
  """Output and vjp(g) w.r.t. (params, x) of module `ours` against `ref`, each leaf within
  relative norm `tol`, all float32. Returns ours' gradients."""
  def pull(model):
    graphdef, params = nnx.split(model)
    out, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x).astype(jnp.float32), params, x)
    return out, vjp(g)

  (out, grads), (ref_out, ref_grads) = pull(ours), pull(ref)
  for got, want in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((ref_out, ref_grads))):
    chex.assert_type(got, jnp.float32)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol
  return grads


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_embed_gathers_float32_rows_and_sums_gradients_in_float32(dtype):
  """Embed equals nnx.Embed's lookup, and its table gradient is the float32 sum of the rows'
  cotangents over repeated ids (checked against a float64 one-hot product)."""
  rng = np.random.default_rng(6)
  table = jnp.asarray(rng.standard_normal((11, 8)), jnp.float32)
  ids = jnp.asarray(np.r_[np.full(40, 3), rng.integers(0, 11, 24)].reshape(4, 16), jnp.int32)
  g = jnp.asarray(rng.standard_normal((4, 16, 8)), jnp.float32).astype(dtype)
  ours = layers.Embed(11, 8, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  ref = nnx.Embed(11, 8, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  ours.embedding[...] = ref.embedding[...] = table
  np.testing.assert_array_equal(ours(ids), ref(ids))
  chex.assert_type(ours(ids), dtype)
  graphdef, params = nnx.split(ours)
  _, vjp = jax.vjp(lambda p: nnx.merge(graphdef, p)(ids), params)
  got = vjp(g)[0]['embedding'][...]
  want = np.eye(11)[np.asarray(ids).ravel()].T @ np.asarray(g, np.float64).reshape(-1, 8)
  chex.assert_type(got, jnp.float32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_nnx_with_gradients(dtype):
  """LayerNorm (two-pass variance, column_sum gradients) against a float32 nnx.LayerNorm with
  the same random scale and offset: output and gradients w.r.t. scale, bias and input."""
  rng = np.random.default_rng(9)
  ref = nnx.LayerNorm(32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  ref.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(32), jnp.float32)
  ref.bias[...] = jnp.asarray(rng.standard_normal(32), jnp.float32)
  ours = layers.LayerNorm(32, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
  nnx.update(ours, nnx.state(ref))
  x = jnp.asarray(3 + 2 * rng.standard_normal((4, 64, 32)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((4, 64, 32)), jnp.float32)
  assert_matches_float32_reference(ours, ref, x, g, 1e-5 if dtype == jnp.float32 else 1e-2)
  chex.assert_type(ours(x), dtype)
