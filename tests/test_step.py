"""phase1_jax.training.step: the jitted train step lowers the loss, and the chunked-loss train and
eval steps match the plain ones."""
import chex
import jax
import numpy as np
from support import load_config, tiny_setup

from phase1_jax import specs
from phase1_jax.training import parallel


def test_loss_falls():
  """40 steps on 4 fixed batches: the training loss must fall by a wide margin."""
  _, _, state, step, batches = tiny_setup(load_config('tiny'), steps_per_epoch=40)
  losses = []
  for i in range(40):
    state, metrics = step(state, batches[i % 4])
    losses.append(float(metrics['loss']))
  chex.assert_tree_all_finite(state.params)
  assert np.mean(losses[-4:]) < 0.75 * np.mean(losses[:4]), losses


def test_chunked_loss_train_step_matches_plain():
  """loss.logits_chunk_pages > 0: the train step never builds full logits, with the same task
  losses and gradient norm as the plain step; the eval step (full logits, for the argmax) runs
  under that config too."""
  results, evals = [], []
  for pages in (0, 2):
    config = load_config('tiny')
    config.model.dropout_rate = 0.0
    config.loss.logits_chunk_pages = pages
    _, graphdef, state, step, (batch, *_) = tiny_setup(config, steps_per_epoch=8)
    state, metrics = step(state, batch)   # the step donates its input state
    results.append(jax.device_get(metrics))
    evaluate = parallel.jit_eval_step(graphdef=graphdef,
                                      loss_spec=specs.loss_spec(config))
    evals.append(jax.device_get(evaluate(state.params, batch)))
  chex.assert_trees_all_close(results[1], results[0], rtol=1e-5, atol=1e-6)
  assert results[0]['grad_norm'] > 0
  # Evaluation builds the logits a few pages at a time too: the same losses and predictions.
  chex.assert_trees_all_equal(evals[1]['detail_pred'], evals[0]['detail_pred'])
  chex.assert_trees_all_close(evals[1], evals[0], rtol=1e-5, atol=1e-6)
