"""phase1_jax.model.phase1: the full model's shapes and dtypes, parameter counting, and its
masking, causality and dropout behaviour."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import (
  PATCHES,
  SEQ,
  TINY,
  JittedModel,
  abstract_call,
  assert_params_float32,
  make_tiny,
  materialize,
  sds,
)

from phase1_jax.model.attention import AttentionSpec
from phase1_jax.model.decoder import DecoderLayer
from phase1_jax.model.phase1 import count_params, parameter_report

D, N, MLP, V = 32, 4, 64, 64
B = 2
LAYER_KW = dict(d_model=D, num_heads=N, mlp_dim=MLP, dropout_rate=0.2, attention=AttentionSpec())


# ------------------------------------------------------------------------------ shapes / dtypes

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
