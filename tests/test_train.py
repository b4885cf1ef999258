"""End-to-end: the training job on the tiny config, resume, evaluate, checkpoint round trip."""
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import optax
import pytest

from phase1_jax import config as config_lib
from phase1_jax import specs
from phase1_jax.data import pipeline
from phase1_jax.training import loop, parallel
from phase1_jax.training import state as state_lib
from phase1_jax.training import step as step_lib
from phase1_jax.training.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name):
  return config_lib.load_file(os.path.join(REPO, 'configs', f'{name}.py'))


def tiny_setup(config, steps_per_epoch):
  """(tx, graphdef, fresh state, jitted train step, first training batches) for `config`."""
  tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), steps_per_epoch=steps_per_epoch)
  graphdef, state = state_lib.create_train_state(specs.model_spec(config), tx, seed=config.seed)
  step = parallel.jit_train_step(graphdef=graphdef, tx=tx,
                                 loss_spec=specs.loss_spec(config))
  source = pipeline.make_source(specs.data_spec(config), 'train')
  batches = list(pipeline.train_iterator(source, batch_size=8, seed=0, epoch=0))[:4]
  return tx, graphdef, state, step, batches


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One epoch, then a second invocation that resumes and runs epoch 2."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = load_config('tiny')
  config.train.num_epochs = 1
  first = loop.train_and_evaluate(config, workdir)
  config.train.num_epochs = 2
  second = loop.train_and_evaluate(config, workdir)
  return config, workdir, first, second


def test_experiment_directory_layout(trained):
  _, workdir, _, _ = trained
  for name in ('config.json', 'training_history.json', 'evaluation_results.json',
               'model_parameters.json', 'checkpoints', 'tensorboard'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(workdir,
                                                                                  'tensorboard')))


def test_resume_continues_without_duplicates(trained):
  config, workdir, _, _ = trained
  history = json.load(open(os.path.join(workdir, 'training_history.json')))
  epochs = [r['epoch'] for r in history if r['kind'] == 'epoch']
  assert epochs == [1, 2]
  steps = [r['step'] for r in history if r['kind'] == 'train']
  assert steps == sorted(set(steps))
  steps_per_epoch = config.data.train_samples // config.train.batch_size
  assert history[-1]['step'] == 2 * steps_per_epoch


def test_evaluation_results_report_targets(trained):
  config, workdir, _, second = trained
  results = json.load(open(os.path.join(workdir, 'evaluation_results.json')))
  assert results == json.loads(json.dumps(second, default=float))
  for name in ('bleu', 'element_f1', 'semantic_accuracy'):
    entry = results['targets'][name]
    assert 0.0 <= entry['value'] <= 1.0
    assert entry['passed'] == (entry['value'] >= entry['target'])
  assert isinstance(results['targets']['all_passed'], bool)
  for name in ('element_f1', 'element_f1_generated', 'element_f1_macro', 'token_accuracy'):
    assert 0.0 <= results['metrics'][name] <= 1.0, name
  m = results['metrics']
  assert m['generated_pages'] == min(config.eval.bleu_samples, config.data.val_samples)
  assert 0 <= m['generated_unfinished'] <= m['generated_pages']
  assert results['checkpoint_step'] in (8, 16)


def test_loss_falls():
  """40 steps on 4 fixed batches: the training loss must fall by a wide margin."""
  _, _, state, step, batches = tiny_setup(load_config('tiny'), steps_per_epoch=40)
  losses = []
  for i in range(40):
    state, metrics = step(state, batches[i % 4])
    losses.append(float(metrics['loss']))
  chex.assert_tree_all_finite(state.params)
  assert np.mean(losses[-4:]) < 0.75 * np.mean(losses[:4]), losses


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


def test_checkpoint_round_trip_is_exact(tmp_path):
  config = load_config('tiny')
  tx, _, state, step, batches = tiny_setup(config, steps_per_epoch=8)
  for batch in batches[:3]:
    state, _ = step(state, batch)
  expected = jax.device_get(state)
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(3, state, extra={'epoch': 0})
    restored, extra = ckpt.restore(3, state_lib.abstract_train_state(specs.model_spec(config), tx))
  assert extra == {'epoch': 0}
  chex.assert_trees_all_equal(jax.device_get(restored), expected)
  chex.assert_trees_all_equal_structs(restored, expected)


def run_cli(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True,
                        cwd=REPO, timeout=300)


def test_cli_bad_override_is_one_line_naming_the_field(tmp_path):
  proc = run_cli('phase1_jax.train', '--config', 'configs/tiny.py', '--config.model.num_heads=3',
                 '--workdir', str(tmp_path / 'run'))
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert lines[-1] == 'error: config.model.num_heads=3: must divide model.d_model (32)', proc.stderr
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_cli_override_of_a_missing_field_is_one_line(tmp_path):
  """--config.a.b for a field the config lacks: one line naming it (with what replaced a retired
  one), not a traceback; nothing written."""
  for arg, want in (('--config.loss.vocab_chunk_size=2048',
                     'error: config.loss.vocab_chunk_size: no longer exists: use '
                     'loss.logits_chunk_pages'),
                    ('--config.model.attention.kindd=dense',
                     'error: config.model.attention.kindd: unknown field (did you mean '
                     'model.attention.kind?)')):
    proc = run_cli('phase1_jax.train', '--config', 'configs/tiny.py', arg,
                   '--workdir', str(tmp_path / 'run'))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(want), proc.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_cli_evaluate_without_checkpoints_is_one_line(tmp_path):
  proc = run_cli('phase1_jax.evaluate', '--config', 'configs/tiny.py', '--workdir', str(tmp_path))
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and str(tmp_path) in last and 'checkpoints' in last, proc.stderr


def test_cli_evaluate_reads_the_runs_config_and_prints_the_targets(tiny_run, tmp_path):
  """evaluate --workdir alone: the run's config.json, a flag override, the targets line printed
  and evaluation_results.json written."""
  import shutil
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run, workdir)
  os.remove(os.path.join(workdir, 'evaluation_results.json'))
  proc = run_cli('phase1_jax.evaluate', '--workdir', workdir, '--bleu_samples', '4')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith('Best checkpoint (step '), proc.stdout
  assert 'bleu=' in proc.stdout and 'target 0.3' in proc.stdout
  with open(os.path.join(workdir, 'evaluation_results.json')) as f:
    assert json.load(f)['metrics']['generated_pages'] == 4


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

  def grads(batch):
    def loss(params):
      out = step_lib.forward(graphdef, params['model'], batch)
      return spec(out, batch, params['loss_log_vars'])[0]
    return jax.grad(loss)(start)

  state, _ = step(state, b1)
  chex.assert_trees_all_equal(jax.device_get(state.params), start)
  state, _ = step(state, b2)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), jax.device_get(state.params), start)
  assert max(jax.tree.leaves(moved)) > 1e-3
  config.train.accumulate_grad_batches = 1
  inner, _ = state_lib.make_optimizer(specs.optimizer_spec(config), steps_per_epoch=8)
  mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, grads(b1), grads(b2))
  _, want_state = inner.update(mean_grads, inner.init(start), start)
  mu = lambda s: optax.tree_utils.tree_get(s, 'mu')
  chex.assert_trees_all_close(jax.device_get(mu(state.opt_state)), mu(want_state), atol=1e-8,
                              rtol=1e-5)


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
