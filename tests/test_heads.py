"""phase1_jax.model.heads: the generation heads and the element classifier (shapes, dtypes,
float32 accumulation, padding)."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import abstract_call, assert_params_float32, materialize, sds

from phase1_jax.model.heads import DualGenerationHeads, ElementTypeClassifier

D, V, C, E = 32, 64, 5, 4
B, T = 2, 8


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('tied', [True, False])
def test_generation_heads_shapes(dtype, tied):
  params, (detail, semantic) = abstract_call(
      lambda: DualGenerationHeads(D, V, C, tied=tied, dtype=dtype, rngs=nnx.Rngs(0)),
      sds((B, T, D), dtype), sds((V, D)) if tied else None)
  chex.assert_shape(detail, (B, T, V))
  chex.assert_shape(semantic, (B, T, C))
  chex.assert_type([detail, semantic], jnp.float32)
  assert_params_float32(params)
  assert ('detail' in params) == (not tied)


@pytest.mark.parametrize('tied', [True, False])
def test_bfloat16_detail_logits_accumulate_in_float32(tied):
  """In bfloat16 compute the detail logits are the float32 sum of bfloat16 products (what the
  training loss builds), not bfloat16-rounded, tied or not."""
  heads = DualGenerationHeads(D, V, C, tied=tied, dtype=jnp.bfloat16, rngs=nnx.Rngs(4))
  rng = np.random.default_rng(6)
  h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.bfloat16)
  embedding = jnp.asarray(rng.standard_normal((V, D)), jnp.float32) if tied else None
  detail, _ = heads(h, embedding)
  weight, bias = heads.detail_weights(embedding, jnp.bfloat16)
  expected = np.einsum('btd,vd->btv', np.asarray(h, np.float32), np.asarray(weight, np.float32))
  if bias is not None:
    expected = expected + np.asarray(bias)
  np.testing.assert_allclose(detail, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_element_classifier_shapes(dtype):
  params, out = abstract_call(lambda: ElementTypeClassifier(D, E, dtype=dtype, rngs=nnx.Rngs(0)),
                              sds((B, T, D), dtype), sds((B, T), bool))
  chex.assert_shape(out, (B, E))
  chex.assert_type(out, jnp.float32)
  assert_params_float32(params)


def test_element_classifier_ignores_padded_positions():
  """Whatever the pooling, only valid positions count: junk (huge values) at padded positions
  changes nothing, and dropping the padded positions altogether changes nothing; a change at a
  valid position does change the logits."""
  clf = materialize(lambda: ElementTypeClassifier(D, E, dtype=jnp.float32, rngs=nnx.Rngs(0)),
                    seed=4)
  rng = np.random.default_rng(4)
  h = rng.standard_normal((B, T, D)).astype(np.float32)
  lengths = np.array([T, 3])
  mask = np.arange(T)[None] < lengths[:, None]
  run = jax.jit(lambda m, h, mask: m(h, mask))
  out = run(clf, h, mask)
  chex.assert_shape(out, (B, E))
  chex.assert_tree_all_finite(out)
  junk = 100 * rng.standard_normal(h.shape).astype(np.float32)
  np.testing.assert_allclose(run(clf, np.where(mask[..., None], h, junk), mask), out, rtol=1e-5,
                             atol=1e-5)
  # Row 1 alone, cut to its 3 valid positions.
  np.testing.assert_allclose(run(clf, h[1:, :3], mask[1:, :3]), out[1:], rtol=1e-5, atol=1e-5)
  # Sanity: the logits do depend on the valid positions.
  h3 = h.copy()
  h3[1, 1] = junk[1, 1]
  assert np.abs(np.asarray(run(clf, h3, mask)[1] - out[1])).max() > 1e-3
