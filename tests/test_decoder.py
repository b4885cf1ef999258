"""phase1_jax.model.decoder: attention, layer and backbone shapes/dtypes, self-attention against
numpy, and the shared backbone's fast paths (scan, remat) against a hand-written loop."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import abstract_call, assert_params_float32, materialize, sds

from phase1_jax.model.attention import AttentionSpec
from phase1_jax.model.decoder import DecoderLayer, MultiHeadAttention, SharedDecoderBackbone

D, N, MLP = 32, 4, 64
B, T, S = 2, 8, 6
LAYER_KW = dict(d_model=D, num_heads=N, mlp_dim=MLP, dropout_rate=0.2, attention=AttentionSpec())


# ------------------------------------------------------------------------------ shapes / dtypes

@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_attention_module_shapes(dtype):
  rngs = lambda: nnx.Rngs(0)
  params, out = abstract_call(lambda: MultiHeadAttention(D, N, cross=False, dtype=dtype,
                                                         rngs=rngs()),
                              sds((B, T, D)), None, sds((B, T), bool), causal=True)
  chex.assert_shape(out, (B, T, D))
  chex.assert_type(out, dtype)
  assert_params_float32(params)
  params, out = abstract_call(lambda: MultiHeadAttention(D, N, cross=True, dtype=dtype,
                                                         rngs=rngs()),
                              sds((B, T, D)), sds((B, S, D)), sds((B, S), bool))
  chex.assert_shape(out, (B, T, D))
  chex.assert_type(out, dtype)
  assert_params_float32(params)
  assert set(params) == {'q', 'kv', 'out'}


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_decoder_layer_and_backbone_shapes(dtype):
  lengths = sds((B,), jnp.int32)
  args = (sds((B, T, D), dtype), lengths, sds((B, S, D), dtype), lengths)
  params, out = abstract_call(lambda: DecoderLayer(**LAYER_KW, dtype=dtype, rngs=nnx.Rngs(0)),
                              *args)
  chex.assert_shape(out, (B, T, D))
  chex.assert_type(out, dtype)
  assert_params_float32(params)
  layer_shapes = [p.shape for p in jax.tree.leaves(params)]

  params, out = abstract_call(
      lambda: SharedDecoderBackbone(num_layers=5, num_unique_layers=3, rngs=nnx.Rngs(0),
                                    dtype=dtype, **LAYER_KW), *args)
  chex.assert_shape(out, (B, T, D))
  chex.assert_type(out, dtype)
  assert_params_float32(params)
  # Every parameter is the layer's, stacked U = 3 times.
  assert [p.shape for p in jax.tree.leaves(params)] == [(3, *s) for s in layer_shapes]


def test_self_attention_module_matches_numpy():
  """MultiHeadAttention(cross=False): fused QKV split into q | k | v, heads of D/N, causal +
  key mask, output projection."""
  mha = materialize(lambda: MultiHeadAttention(D, N, cross=False, dtype=jnp.float32,
                                               rngs=nnx.Rngs(0)), seed=3)
  rng = np.random.default_rng(3)
  x = rng.standard_normal((B, T, D)).astype(np.float32)
  mask = np.arange(T)[None] < np.array([[T], [5]])
  out = jax.jit(lambda m, x, k: m(x, kv_mask_BxS=k, causal=True))(mha, x, mask)
  w, b = np.asarray(mha.qkv.kernel[...]), np.asarray(mha.qkv.bias[...])
  q, k, v = np.split(x @ w + b, 3, axis=-1)
  split = lambda y: y.reshape(B, T, N, D // N)
  q, k, v = split(q), split(k), split(v)
  scores = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(D // N)
  allowed = (np.arange(T)[None, :] <= np.arange(T)[:, None])[None, None] & mask[:, None, None]
  scores = np.where(allowed, scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum('bnts,bsnh->btnh', p, v).reshape(B, T, D)
  ref = o @ np.asarray(mha.out.kernel[...]) + np.asarray(mha.out.bias[...])
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- shared backbone fast paths

L, U = 3, 2


def make_backbone(scan=True, remat=False, remat_policy='nothing_saveable'):
  return SharedDecoderBackbone(num_layers=L, num_unique_layers=U, scan=scan, remat=remat,
                               remat_policy=remat_policy, rngs=nnx.Rngs(0), dtype=jnp.float32,
                               **LAYER_KW)


@functools.partial(jax.jit, static_argnums=0)
def _backbone_forward(graphdef, state, x, token_lengths, memory, memory_lengths, key):
  """(deterministic output, output with dropout key)."""
  model = nnx.merge(graphdef, state)
  args = (x, token_lengths, memory, memory_lengths)
  return model(*args), model(*args, key)


@functools.partial(jax.jit, static_argnums=0)
def _backbone_grads(graphdef, state, x, token_lengths, memory, memory_lengths, key, weights):
  """Gradients (with dropout) of a weighted sum of the output, w.r.t. params and the input."""
  def loss(state, x):
    out = nnx.merge(graphdef, state)(x, token_lengths, memory, memory_lengths, key)
    return jnp.sum(out * weights)

  return jax.grad(loss, argnums=(0, 1))(state, x)


@jax.jit
def _hand_loop(state, x, token_lengths, memory, memory_lengths, key):
  """Application i applies unique layer i % U, sliced out of the stacked params by hand."""
  layer_graphdef = nnx.split(nnx.eval_shape(
      lambda: DecoderLayer(**LAYER_KW, dtype=jnp.float32, rngs=nnx.Rngs(0))))[0]
  keys = jax.random.split(key, L)
  outs = []
  for k in (None, keys):
    h = x
    for i in range(L):
      layer = nnx.merge(layer_graphdef, jax.tree.map(lambda p, i=i: p[i % U], state['layers']))
      h = layer(h, token_lengths, memory, memory_lengths, None if k is None else k[i])
    outs.append(h)
  return outs


def backbone_graphdef(scan, remat, remat_policy='nothing_saveable'):
  return nnx.split(nnx.eval_shape(lambda: make_backbone(scan, remat, remat_policy)))[0]


@pytest.fixture(scope='module')
def backbone_case():
  state = nnx.state(materialize(make_backbone, seed=1))
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
  token_lengths = jnp.asarray([T, 5])
  memory = jnp.asarray(rng.standard_normal((B, S, D)), jnp.float32)
  memory_lengths = jnp.asarray([4, 1])
  args = (x, token_lengths, memory, memory_lengths, jax.random.key(5))
  outputs = {(scan, remat): _backbone_forward(backbone_graphdef(scan, remat), state, *args)
             for scan in (True, False) for remat in (False, True)}
  return state, args, outputs


def test_backbone_unique_layers_differ(backbone_case):
  state, _, _ = backbone_case
  kernel = state['layers']['mlp_in']['kernel'][...]
  chex.assert_shape(kernel, (U, D, MLP))
  assert not np.allclose(kernel[0], kernel[1])


@pytest.mark.parametrize('variant', [(False, False), (True, True), (False, True)],
                         ids=['unrolled', 'scan_remat', 'unrolled_remat'])
def test_backbone_variants_equal_scan(backbone_case, variant):
  _, _, outputs = backbone_case
  chex.assert_trees_all_close(outputs[variant], outputs[True, False], rtol=1e-5, atol=1e-5)


def test_backbone_scan_equals_hand_loop(backbone_case):
  state, args, outputs = backbone_case
  det, drop = outputs[True, False]
  ref_det, ref_drop = _hand_loop(state, *args)
  np.testing.assert_allclose(det, ref_det, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(drop, ref_drop, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(det) - np.asarray(drop)).max() > 1e-2  # dropout really applied


def test_backbone_remat_same_gradients(backbone_case):
  state, args, _ = backbone_case
  weights = jnp.asarray(np.random.default_rng(6).standard_normal((B, T, D)), jnp.float32)
  plain = _backbone_grads(backbone_graphdef(True, False), state, *args, weights)
  remat = _backbone_grads(backbone_graphdef(True, True), state, *args, weights)
  chex.assert_trees_all_close(remat, plain, rtol=1e-5, atol=1e-5)
  # Both unique layers get gradient (both are applied), and so does the input.
  g = np.asarray(remat[0]['layers']['mlp_in']['kernel'][...])
  assert np.abs(g[0]).max() > 0 and np.abs(g[1]).max() > 0
  assert np.abs(np.asarray(remat[1])).max() > 0


@pytest.mark.parametrize('policy', ['dots_saveable', 'dots_with_no_batch_dims_saveable'])
def test_backbone_remat_policies_same_gradients(backbone_case, policy):
  state, args, _ = backbone_case
  weights = jnp.asarray(np.random.default_rng(6).standard_normal((B, T, D)), jnp.float32)
  plain = _backbone_grads(backbone_graphdef(False, False), state, *args, weights)
  remat = _backbone_grads(backbone_graphdef(False, True, policy), state, *args, weights)
  chex.assert_trees_all_close(remat, plain, rtol=1e-5, atol=1e-5)


def test_backbone_unknown_remat_policy():
  with pytest.raises(ValueError, match='remat_policy'):
    make_backbone(remat=True, remat_policy='dots')
