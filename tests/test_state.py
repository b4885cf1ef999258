"""phase1_jax.training.state: the abstract train state, and gradient accumulation by the optimizer
make_optimizer builds."""
import chex
import jax
import numpy as np
import optax
from support import load_config, tiny_setup

from phase1_jax import specs
from phase1_jax.training import state as state_lib
from phase1_jax.training import step as step_lib


def test_abstract_train_state_is_the_fresh_states_shapes_without_computing_it():
  """What a resuming run and an evaluation build instead of a fresh state: the same graphdef
  (the train step's static argument) and every leaf's shape and dtype, and no array at all."""
  config = load_config('tiny')
  tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), steps_per_epoch=8)
  model = specs.model_spec(config)
  graphdef, state = state_lib.create_train_state(model, tx, seed=config.seed)
  abstract_graphdef, abstract = state_lib.create_train_state(model, tx, seed=config.seed,
                                                             abstract=True)
  assert abstract_graphdef == graphdef
  assert all(type(x) is jax.ShapeDtypeStruct for x in jax.tree.leaves(abstract))
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, state)
  assert (jax.tree.structure(state_lib.abstract_train_state(model, tx))
          == jax.tree.structure(state))


def test_gradient_accumulation_updates_every_k_micro_batches():
  """accumulate_grad_batches=2: the first micro-batch leaves the params alone, the second applies
  one AdamW update whose gradient is the mean of both micro-batches' gradients. (Compared through
  Adam's first moment, which is linear in the gradient: the updates themselves amplify float noise
  on parameters with ~zero gradient, such as key biases, whose effect softmax cancels.)"""

  config = load_config('tiny')
  config.train.accumulate_grad_batches = 2
  config.train.warmup_steps = 0   # the first update has the peak learning rate, not 0
  config.model.dropout_rate = 0.0
  tx, graphdef, state, step, (b1, b2, *_) = tiny_setup(config, steps_per_epoch=8)
  assert isinstance(tx, optax.MultiSteps)
  spec = specs.loss_spec(config)
  start = jax.device_get(state.params)

  @jax.jit   # compiled once for both batches: eager, the tiny model's backward took minutes
  def grads(params, batch):
    def loss(params):
      out = step_lib.forward(graphdef, params['model'], batch)
      return spec(out, batch, params['loss_log_vars'])[0]
    return jax.grad(loss)(params)

  state, _ = step(state, b1)
  chex.assert_trees_all_equal(jax.device_get(state.params), start)
  state, _ = step(state, b2)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), jax.device_get(state.params), start)
  assert max(jax.tree.leaves(moved)) > 1e-3
  config.train.accumulate_grad_batches = 1
  inner, _ = state_lib.make_optimizer(specs.optimizer_spec(config), steps_per_epoch=8)
  mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, grads(start, b1), grads(start, b2))
  _, want_state = inner.update(mean_grads, inner.init(start), start)
  mu = lambda s: optax.tree_utils.tree_get(s, 'mu')
  chex.assert_trees_all_close(jax.device_get(mu(state.opt_state)), mu(want_state), atol=1e-8,
                              rtol=1e-5)
