"""Every attention kind inside the model: training steps, and decoding equal to its definition."""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phase1_jax import config as config_lib
from phase1_jax import config_validation, specs
from phase1_jax.data import pipeline
from phase1_jax.inference.decoding import greedy_decode, greedy_decode_reference
from phase1_jax.model import attention
from phase1_jax.model.phase1 import Phase1Decoder
from phase1_jax.model.spec import ModelSpec
from phase1_jax.training import parallel
from phase1_jax.training import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = attention.KINDS


@pytest.mark.parametrize('kind', KINDS)
def test_a_few_training_steps_with_each_kind(kind):
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py'))
  config.model.attention.kind = kind
  config.model.attention.window_size = 8     # the tiny pages are up to 48 tokens: several blocks
  config.model.attention.block_size = 4
  config.model.attention.top_k = 2
  config_validation.validate(config)
  tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), steps_per_epoch=6)
  graphdef, state = state_lib.create_train_state(specs.model_spec(config), tx, seed=config.seed)
  step = parallel.jit_train_step(graphdef=graphdef, tx=tx,
                                 loss_spec=specs.loss_spec(config))
  source = pipeline.make_source(specs.data_spec(config), 'train')
  batches = list(pipeline.train_iterator(source, batch_size=8, seed=0, epoch=0))[:2]
  losses = []
  for i in range(6):
    state, metrics = step(state, batches[i % 2])
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0], losses


def _model(kind, **options):
  return Phase1Decoder(ModelSpec(
      vocab_size=48, num_semantic_classes=5, num_element_types=6, feature_dim=8, max_seq_len=20,
      d_model=32, num_heads=4, num_layers=3, num_unique_layers=2, mlp_dim=64,
      attention=attention.AttentionSpec.of(kind, **options)), rngs=nnx.Rngs(3))


DECODE_CASES = [
    ('dense', {}),
    ('dot_product', {}),
    ('fused_cpu', {}),
    ('window', dict(window_size=5, block_size=4)),
    # 5 blocks of 4, local blocks i-1..i: blocks 0..i-2 are selectable from block 2 on.
    ('window_topk', dict(window_size=4, top_k=1, block_size=4)),
    ('window_topk', dict(window_size=3, top_k=2, block_size=2)),
]


@pytest.mark.parametrize('kind,options', DECODE_CASES)
def test_greedy_decode_equals_reference_for_each_kind(kind, options):
  """KV-cached decoding (window: a ring buffer; window_topk: block selection at each block's
  first position) gives the tokens of the uncached definition, and so does the jitted
  recomputing loop. 20 positions, so the window and blocks are exceeded."""
  model = _model(kind, **options)
  key = jax.random.key(7)
  features = jax.random.normal(key, (3, 6, 8))
  feature_mask = jnp.ones((3, 6), bool).at[2, 4:].set(False)
  args = dict(max_len=20, bos_id=1, eos_id=-1, pad_id=0)   # eos -1: rows run to max_len
  decode = jax.jit(lambda m, f, fm, use_cache: greedy_decode(m, f, fm, use_cache=use_cache,
                                                             **args), static_argnums=3)
  reference = greedy_decode_reference(model, features, feature_mask, **args)
  np.testing.assert_array_equal(decode(model, features, feature_mask, True), reference)
  np.testing.assert_array_equal(decode(model, features, feature_mask, False), reference)


@pytest.mark.parametrize('kind,options', DECODE_CASES)
def test_decode_step_logits_equal_forward_for_each_kind(kind, options):
  """Stronger than equal tokens: at every position the cached step's logits are the full
  forward pass's on the same (random) tokens, float32."""
  model = _model(kind, **options)
  rng = np.random.default_rng(5)
  features = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
  # A masked patch between valid ones: the forward pass moves it behind them, decoding masks it.
  feature_mask = jnp.ones((2, 6), bool).at[1, 5:].set(False).at[0, 2].set(False)
  tokens = jnp.asarray(rng.integers(3, 48, (2, 20)), jnp.int32).at[:, 0].set(1)

  @jax.jit
  def stepped(model, features, feature_mask, tokens):
    state = model.init_decode_state(features, 20)

    def body(state, xs):
      detail, _, state = model.decode_step(xs[1], xs[0], state, feature_mask)
      return state, detail
    return jnp.swapaxes(jax.lax.scan(body, state, (jnp.arange(20), tokens.T))[1], 0, 1)

  full = model(features, feature_mask, tokens)['detail_logits']
  np.testing.assert_allclose(stepped(model, features, feature_mask, tokens), full, rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize('kind', ['dot_product', 'fused_cpu'])
def test_length_masked_kinds_model_equals_dense_model(kind):
  """The model with `dot_product` or `fused_cpu` attention (key lengths, self and cross) gives
  the `dense` model's outputs and parameter gradients on the same weights: pages of different
  lengths and feature masks with holes."""
  rng = np.random.default_rng(9)
  features = jnp.asarray(rng.normal(size=(3, 6, 8)), jnp.float32)
  feature_mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 1]], bool)
  tokens = rng.integers(3, 48, (3, 20)).astype(np.int32)
  tokens[:, 0] = 1
  tokens[1, 12:], tokens[2, 5:] = 0, 0
  weights = jnp.asarray(rng.normal(size=(3, 20, 48)), jnp.float32)

  @jax.jit
  def outputs_and_grads(model):
    def loss(model):
      out = model(features, feature_mask, jnp.asarray(tokens))
      total = jnp.sum(out['detail_logits'] * weights) + jnp.sum(out['element_logits'] ** 2)
      return total + jnp.sum(out['semantic_logits'] ** 2), out
    grads, out = nnx.grad(loss, has_aux=True)(model)
    return out, nnx.state(grads)

  out, grads = outputs_and_grads(_model(kind))   # full float32 matmuls: conftest.py
  ref_out, ref_grads = outputs_and_grads(_model('dense'))
  chex.assert_trees_all_close(out, ref_out, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-4)


def test_window_cache_is_a_ring_of_window_size():
  """The window kind's cache holds window_size positions whatever max_len is (memory O(w))."""
  model = _model('window', window_size=5, block_size=4)
  features = jnp.zeros((2, 6, 8))
  for max_len in (8, 20):
    state = jax.eval_shape(lambda m, f, n=max_len: m.init_decode_state(f, n), model, features)
    assert state['cache']['k'].shape == (3, 2, 5, 4, 8)
  dense = jax.eval_shape(lambda m, f: m.init_decode_state(f, 20), _model('dense'), features)
  assert dense['cache']['k'].shape == (3, 2, 20, 4, 8)


def test_topk_decode_uses_its_selected_blocks():
  """Decoding with top_k=1 differs from the window alone (top_k=0) on the same weights, and with
  top_k covering every block it equals dense causal decoding: the selection is live in the
  cached path, and the local + selected blocks hold every earlier key."""
  features = jax.random.normal(jax.random.key(2), (4, 6, 8))
  feature_mask = jnp.ones((4, 6), bool)
  args = dict(max_len=20, bos_id=1, eos_id=-1, pad_id=0)
  decode = lambda **o: np.asarray(greedy_decode(_model('window_topk', **o), features,
                                                feature_mask, **args))
  some, none = decode(window_size=2, top_k=1, block_size=2), decode(window_size=2, top_k=0,
                                                                    block_size=2)
  assert (some != none).any()
  every = decode(window_size=2, top_k=10, block_size=2)
  np.testing.assert_array_equal(every, np.asarray(greedy_decode(_model('dense'), features,
                                                                feature_mask, **args)))


def test_window_decode_differs_from_dense_past_the_window():
  """The window mask in the cached path matters: past the window, the tokens differ from those
  of the same weights with dense attention (guards against a cache that ignores the window)."""
  dense, window = _model('dense'), _model('window', window_size=2, block_size=2)
  key = jax.random.key(11)
  features = jax.random.normal(key, (4, 6, 8))
  feature_mask = jnp.ones((4, 6), bool)
  args = dict(max_len=20, bos_id=1, eos_id=-1, pad_id=0)
  a = greedy_decode(dense, features, feature_mask, **args)
  b = greedy_decode(window, features, feature_mask, **args)
  assert (np.asarray(a) != np.asarray(b)).any()
