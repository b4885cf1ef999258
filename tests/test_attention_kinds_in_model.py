"""Every attention kind inside the model: training steps, and decoding equal to its definition."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phase1_jax import config as config_lib
from phase1_jax.data import pipeline
from phase1_jax.decoding import greedy_decode, greedy_decode_reference
from phase1_jax.model import attention
from phase1_jax.model.phase1 import Phase1Decoder
from phase1_jax.training import parallel
from phase1_jax.training import state as state_lib
from phase1_jax.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = attention.KINDS


@pytest.mark.parametrize('kind', KINDS)
def test_a_few_training_steps_with_each_kind(kind):
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py'))
  config.model.attention.kind = kind
  config.model.attention.window_size = 8     # the tiny pages are up to 48 tokens: several blocks
  config.model.attention.block_size = 4
  config.model.attention.top_k = 2
  config_lib.validate(config)
  tx, _ = state_lib.make_optimizer(config, steps_per_epoch=6)
  graphdef, state = state_lib.create_train_state(config, tx)
  step = parallel.jit_train_step(graphdef=graphdef, tx=tx,
                                 loss_spec=step_lib.LossSpec.from_config(config))
  source = pipeline.make_source(config, 'train')
  batches = list(pipeline.train_iterator(source, batch_size=8, seed=0, epoch=0))[:2]
  losses = []
  for i in range(6):
    state, metrics = step(state, batches[i % 2])
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0], losses


def _model(kind, **options):
  return Phase1Decoder(vocab_size=48, num_semantic_classes=5, num_element_types=6, feature_dim=8,
                       max_seq_len=20, d_model=32, num_heads=4, num_layers=3, num_unique_layers=2,
                       mlp_dim=64, attention_kind=kind,
                       attention_options=attention.kind_options(kind, **options),
                       rngs=nnx.Rngs(3))


@pytest.mark.parametrize('kind,options', [
    ('window', dict(window_size=5, block_size=4)),
    ('window_topk', dict(window_size=4, top_k=1, block_size=4)),
    ('dot_product', {}),
])
def test_greedy_decode_equals_reference_for_each_kind(kind, options):
  """Cached (window: a window mask over the cache) or recomputed (window_topk) decoding gives
  the tokens of the uncached definition. 20 positions, so the window and blocks are exceeded."""
  model = _model(kind, **options)
  key = jax.random.key(7)
  features = jax.random.normal(key, (3, 6, 8))
  feature_mask = jnp.ones((3, 6), bool).at[2, 4:].set(False)
  args = dict(max_len=20, bos_id=1, eos_id=-1, pad_id=0)   # eos -1: rows run to max_len
  cached = jax.jit(lambda m, f, fm: greedy_decode(m, f, fm, **args))(model, features,
                                                                      feature_mask)
  reference = greedy_decode_reference(model, features, feature_mask, **args)
  np.testing.assert_array_equal(cached, reference)
  assert model.kv_cache_decoding == (kind != 'window_topk')


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
