"""Model modules: shapes/dtypes, the shared backbone's fast paths against a hand-written loop,
parameter counting, and the full model's masking, causality and dropout behaviour."""
from __future__ import annotations

import functools

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import PATCHES, SEQ, TINY, JittedModel, make_tiny, materialize

from phase1_jax.model import layers
from phase1_jax.model.attention import AttentionSpec
from phase1_jax.model.decoder import DecoderLayer, MultiHeadAttention, SharedDecoderBackbone
from phase1_jax.model.heads import DualGenerationHeads, ElementTypeClassifier
from phase1_jax.model.phase1 import count_params, parameter_report

D, N, MLP, V, C, E = 32, 4, 64, 64, 5, 4
B, T, S = 2, 8, 6
LAYER_KW = dict(d_model=D, num_heads=N, mlp_dim=MLP, dropout_rate=0.2, attention=AttentionSpec())


def sds(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def abstract_call(make, *args, method='__call__', **kwargs):
  """(params state, output shapes) of make().method(*args), without allocating or compiling."""
  graphdef, state = nnx.split(nnx.eval_shape(make))

  def call(state, *args):
    return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

  return nnx.state(nnx.merge(graphdef, state), nnx.Param), jax.eval_shape(call, state, *args)


def assert_params_float32(state):
  leaves = jax.tree.leaves(state)
  assert leaves
  for leaf in leaves:
    assert leaf.dtype == jnp.float32, leaf


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


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_phase1_decoder_shapes_outputs_float32(dtype):
  make = lambda: make_tiny(dtype=dtype)
  params, out = abstract_call(make, sds((B, PATCHES, TINY['feature_dim'])),
                              sds((B, PATCHES), bool), sds((B, SEQ), jnp.int32))
  assert set(out) == {'detail_logits', 'semantic_logits', 'element_logits'}
  chex.assert_shape(out['detail_logits'], (B, SEQ, TINY['vocab_size']))
  chex.assert_shape(out['semantic_logits'], (B, SEQ, TINY['num_semantic_classes']))
  chex.assert_shape(out['element_logits'], (B, TINY['num_element_types']))
  chex.assert_type(list(out.values()), jnp.float32)
  assert_params_float32(params)
  # Decode state: memory K/V per unique layer, caches per application.
  _, state = abstract_call(make, sds((B, PATCHES, TINY['feature_dim'])), max_len=10,
                           method='init_decode_state')
  u, l, h = TINY['num_unique_layers'], TINY['num_layers'], TINY['d_model'] // TINY['num_heads']
  chex.assert_shape(list(state['memory_kv']), (u, B, PATCHES, TINY['num_heads'], h))
  chex.assert_shape([state['cache']['k'], state['cache']['v']], (l, B, 10, TINY['num_heads'], h))
  chex.assert_type([state['cache']['k'], state['cache']['v']], dtype)


def test_bfloat16_model_close_to_float32(tiny_model, tiny_forward, tiny_batch):
  """Same float32 params, bfloat16 compute: float32 outputs close to the float32 model's."""
  graphdef_bf16 = nnx.split(nnx.eval_shape(lambda: make_tiny(dtype=jnp.bfloat16)))[0]
  model_bf16 = nnx.merge(graphdef_bf16, nnx.state(tiny_model))
  assert_params_float32(nnx.state(model_bf16, nnx.Param))
  args = (tiny_batch['features'], tiny_batch['feature_mask'], tiny_batch['inputs'])
  out16, out32 = JittedModel(model_bf16)(*args), tiny_forward(*args)
  for k in out32:
    chex.assert_type(out16[k], jnp.float32)
    chex.assert_tree_all_finite(out16[k])
    rel = np.linalg.norm(out16[k] - out32[k]) / np.linalg.norm(out32[k])
    assert rel < 5e-2, (k, rel)
    assert rel > 0, k  # really computed in bfloat16


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


# ------------------------------------------------------------------------------- parameter counts

def abstract_count(**overrides):
  return count_params(nnx.eval_shape(lambda: make_tiny(**overrides)))


def test_param_count_is_the_stacked_count():
  layer = count_params(nnx.eval_shape(
      lambda: DecoderLayer(**{**LAYER_KW, 'mlp_dim': TINY['mlp_dim']}, dtype=jnp.float32,
                           rngs=nnx.Rngs(0))))
  model = nnx.eval_shape(make_tiny)
  backbone = count_params(model.backbone)
  assert backbone == TINY['num_unique_layers'] * layer
  outside = sum(count_params(getattr(model, name)) for name in (
      'token_embed', 'position_embed', 'feature_proj', 'memory_norm', 'final_norm', 'heads',
      'element_classifier'))
  assert count_params(model) == outside + backbone
  # The count depends on U, not on the number of applications L.
  assert abstract_count(num_layers=7) == count_params(model)
  assert abstract_count(num_unique_layers=3) == count_params(model) + layer
  # Untied detail head: + a D x V kernel and V biases.
  assert abstract_count(tie_detail_head=False) == count_params(model) + (D + 1) * V


def test_parameter_report_consistent():
  l, u = TINY['num_layers'], TINY['num_unique_layers']
  model = nnx.eval_shape(make_tiny)
  report = parameter_report(model)
  total, backbone = count_params(model), count_params(model.backbone)
  per_block = backbone // u
  assert report['params'] == total
  assert report['backbone_params'] == backbone
  assert report['params_no_sharing'] == total + per_block * (l - u)
  # 'No sharing' is the count of the same model with one block per application.
  assert report['params_no_sharing'] == abstract_count(num_unique_layers=l)
  heads = count_params(model.heads) + count_params(model.element_classifier)
  assert report['params_two_decoders'] == 2 * (report['params_no_sharing'] - heads) + heads
  np.testing.assert_allclose(report['reduction_vs_no_sharing'],
                             1 - total / report['params_no_sharing'])
  np.testing.assert_allclose(report['reduction_vs_two_decoders'],
                             1 - total / report['params_two_decoders'])
  assert 0 < report['reduction_vs_no_sharing'] < report['reduction_vs_two_decoders'] < 1


# ----------------------------------------------------------------- full model: masks and causality

def model_args(batch, **override):
  a = {k: batch[k] for k in ('features', 'feature_mask', 'inputs')}
  a.update(override)
  return a['features'], a['feature_mask'], a['inputs']


def valid_positions(batch):
  return np.asarray(batch['inputs']) != 0


def test_tokens_at_padded_positions_do_not_change_valid_logits(tiny_forward, tiny_batch):
  inputs = np.asarray(tiny_batch['inputs'])
  valid = valid_positions(tiny_batch)
  assert not valid.all()
  junk = np.random.default_rng(7).integers(3, TINY['vocab_size'], inputs.shape)
  changed = jnp.asarray(np.where(valid, inputs, junk).astype(np.int32))
  out = tiny_forward(*model_args(tiny_batch))
  out2 = tiny_forward(*model_args(tiny_batch, inputs=changed))
  for k in ('detail_logits', 'semantic_logits'):
    np.testing.assert_allclose(np.asarray(out2[k])[valid], np.asarray(out[k])[valid], atol=1e-5)
    assert not np.allclose(np.asarray(out2[k])[~valid], np.asarray(out[k])[~valid], atol=1e-3)


def test_a_page_ends_at_its_first_pad(tiny_forward, tiny_batch):
  """A pad inside row 0 ends that page (the masks are prefixes, what cuDNN's lengths take): what
  follows it changes no output before it and not the pooled element logits."""
  inputs = np.asarray(tiny_batch['inputs']).copy()
  inputs[0, 4] = 0
  changed = inputs.copy()
  changed[0, 5:] = np.random.default_rng(3).integers(3, TINY['vocab_size'], SEQ - 5)
  assert (changed[0, 5:] != inputs[0, 5:]).any()
  out = tiny_forward(*model_args(tiny_batch, inputs=jnp.asarray(inputs)))
  out2 = tiny_forward(*model_args(tiny_batch, inputs=jnp.asarray(changed)))
  np.testing.assert_allclose(out2['element_logits'], out['element_logits'], rtol=1e-6, atol=1e-6)
  for k in ('detail_logits', 'semantic_logits'):
    np.testing.assert_allclose(out2[k][:, :5], out[k][:, :5], rtol=1e-6, atol=1e-6)


def test_extra_padding_changes_nothing(tiny_forward, tiny_batch):
  """The same pages padded to a longer T: identical logits on the first T positions and identical
  element logits (pooling ignores padded positions)."""
  out = tiny_forward(*model_args(tiny_batch))
  longer = jnp.pad(tiny_batch['inputs'], ((0, 0), (0, TINY['max_seq_len'] - SEQ)))
  out_long = tiny_forward(*model_args(tiny_batch, inputs=longer))
  for k in ('detail_logits', 'semantic_logits'):
    np.testing.assert_allclose(out_long[k][:, :SEQ], out[k], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out_long['element_logits'], out['element_logits'], rtol=1e-5,
                             atol=1e-5)


def test_features_of_masked_patches_change_nothing(tiny_forward, tiny_batch):
  features, mask = np.asarray(tiny_batch['features']), np.asarray(tiny_batch['feature_mask'])
  assert not mask.all()
  junk = 10 * np.random.default_rng(8).standard_normal(features.shape).astype(np.float32)
  changed = jnp.asarray(np.where(mask[..., None], features, junk))
  out = tiny_forward(*model_args(tiny_batch))
  chex.assert_trees_all_close(tiny_forward(*model_args(tiny_batch, features=changed)), out,
                              atol=1e-6, rtol=1e-6)
  # The same change at a valid patch does change the outputs (the test can fail).
  valid_changed = jnp.asarray(np.where(mask[..., None], junk, features))
  out3 = tiny_forward(*model_args(tiny_batch, features=valid_changed))
  for k in out:
    assert np.abs(np.asarray(out3[k]) - np.asarray(out[k])).max() > 1e-3, k


@pytest.mark.parametrize('t', [1, 5, SEQ - 1])
def test_causal_in_input_tokens(tiny_forward, tiny_batch, t):
  inputs = np.asarray(tiny_batch['inputs']).copy()
  inputs[0, t] = 3 + (inputs[0, t] - 3 + 17) % (TINY['vocab_size'] - 3)  # another non-pad token
  assert inputs[0, t] != tiny_batch['inputs'][0, t]
  out = tiny_forward(*model_args(tiny_batch))
  out2 = tiny_forward(*model_args(tiny_batch, inputs=jnp.asarray(inputs)))
  for k in ('detail_logits', 'semantic_logits'):
    np.testing.assert_allclose(out2[k][0, :t], out[k][0, :t], atol=1e-6, rtol=1e-6)
    assert np.abs(np.asarray(out2[k][0, t:]) - np.asarray(out[k][0, t:])).max(axis=-1).min() > 1e-4
    np.testing.assert_allclose(out2[k][1:], out[k][1:], atol=1e-6, rtol=1e-6)  # other rows


def test_dropout_keys(tiny_forward, tiny_batch):
  args = model_args(tiny_batch)
  det, det2 = tiny_forward(*args), tiny_forward(*args)
  a, a2 = tiny_forward(*args, jax.random.key(1)), tiny_forward(*args, jax.random.key(1))
  b = tiny_forward(*args, jax.random.key(2))
  chex.assert_trees_all_equal(det, det2)
  chex.assert_trees_all_equal(a, a2)
  for k in det:
    assert np.abs(np.asarray(a[k]) - np.asarray(b[k])).max() > 1e-3, k
    assert np.abs(np.asarray(a[k]) - np.asarray(det[k])).max() > 1e-3, k


@pytest.mark.parametrize('tied', [True, False])
def test_detail_hidden_and_weight_give_the_logits(tiny_batch, tied):
  """detail_logits=False (for the chunked loss) returns h and the head's weights instead of the
  logits: h @ weight.T + bias equals the logits, and the other outputs are unchanged."""
  model = materialize(lambda: make_tiny(tie_detail_head=tied), seed=3)
  graphdef, state = nnx.split(model)
  args = model_args(tiny_batch)
  full = JittedModel(model)(*args)
  split = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, detail_logits=False))(state, *args)
  assert 'detail_logits' not in split and ('detail_bias' in split) == (not tied)
  logits = jnp.einsum('btd,vd->btv', split['detail_hidden'], split['detail_weight'])
  if 'detail_bias' in split:
    logits = logits + split['detail_bias'][None, None, :]
  np.testing.assert_allclose(logits, full['detail_logits'], rtol=1e-5, atol=1e-5)
  for k in ('semantic_logits', 'element_logits'):
    np.testing.assert_allclose(split[k], full[k], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- element classifier

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

