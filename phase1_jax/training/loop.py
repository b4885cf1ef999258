"""train_and_evaluate(config, workdir): the whole training job, from config to files on disk."""
from __future__ import annotations

import datetime
import math
import os
import time

import jax
import ml_collections
from absl import logging
from flax import nnx

from phase1_jax import config as config_lib
from phase1_jax.data import pipeline
from phase1_jax.model.phase1 import parameter_report
from phase1_jax.training import evaluation, parallel, reporting
from phase1_jax.training import state as state_lib
from phase1_jax.training import step as step_lib
from phase1_jax.training.checkpoint import Checkpointer


def default_workdir(config: ml_collections.ConfigDict) -> str:
  """experiments/<exp_name>_<YYYYmmdd_HHMMSS>, as in the seed."""
  stamp = datetime.datetime.now().strftime('%Y%m%d_%H%M%S')
  return os.path.join('experiments', f'{config.exp_name}_{stamp}')


class EarlyStopping:
  """Patience on one validation metric; its state is plain JSON for the checkpoint."""

  def __init__(self, mode: str, patience: int, best: float | None = None, bad_epochs: int = 0):
    self.mode, self.patience, self.best, self.bad_epochs = mode, patience, best, bad_epochs

  def update(self, value: float) -> bool:
    """Records an epoch's value; True when it is the best so far."""
    better = self.best is None or (value < self.best if self.mode == 'min' else value > self.best)
    if better:
      self.best, self.bad_epochs = value, 0
    else:
      self.bad_epochs += 1
    return better

  @property
  def should_stop(self) -> bool:
    return self.patience > 0 and self.bad_epochs >= self.patience

  def state(self) -> dict:
    return {'best': self.best, 'bad_epochs': self.bad_epochs}


def _model_report(config, graphdef, params) -> dict:
  model = nnx.merge(graphdef, params['model'])
  return parameter_report(model, config.model.num_layers, config.model.num_unique_layers)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """Trains with per-epoch evaluation, early stopping and checkpoints; resumes from `workdir`'s
  latest good checkpoint if there is one. Ends by evaluating the best checkpoint into
  evaluation_results.json, whose content it returns."""
  config_lib.validate(config)
  workdir = workdir or default_workdir(config)
  os.makedirs(workdir, exist_ok=True)
  train_source = pipeline.make_source(config, 'train')
  val_source = pipeline.make_source(config, 'val')
  t = config.train
  steps_per_epoch = pipeline.steps_per_epoch(train_source, t.batch_size)
  tx, schedule = state_lib.make_optimizer(config, steps_per_epoch)
  graphdef, state = state_lib.create_train_state(config, tx)

  best_metric = config.checkpoint.best_metric
  mode = config_lib.METRIC_MODES[best_metric]
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'),
                      max_to_keep=config.checkpoint.max_to_keep, best_metric=best_metric,
                      best_mode=mode, async_save=config.checkpoint.async_save)
  restored = ckpt.restore_latest_good(jax.eval_shape(lambda: state))
  extra = {}
  if restored is not None:
    step, state, extra = restored
    logging.info('Resumed from %s step %d (epoch %d).', ckpt.directory, step, extra['epoch'])
  stopper = EarlyStopping(mode, t.early_stopping_patience, **extra.get('early_stopping', {}))
  # A run that stopped early stays stopped when its workdir is run again.
  start_epoch = t.num_epochs if extra.get('stopped') else extra.get('epoch', 0)

  reporter = reporting.Reporter(workdir, start_step=int(state.step))
  reporter.write_json('config.json', config.to_dict())
  params_info = _model_report(config, graphdef, state.params)
  reporter.write_json('model_parameters.json', params_info)
  print(f'Device: {jax.default_backend()} ({jax.device_count()} devices)  Model parameters: '
        f'{params_info["params"]:,} ({params_info["reduction_vs_two_decoders"]:.0%} fewer than two '
        f'separate decoders, {params_info["reduction_vs_no_sharing"]:.0%} fewer than no sharing)')
  print(f'Workdir: {workdir}')

  train_step = parallel.jit_train_step(graphdef=graphdef, tx=tx,
                                       loss_spec=step_lib.LossSpec.from_config(config))
  evaluator = evaluation.Evaluator(config, graphdef)
  train_seconds = extra.get('train_seconds', 0.0)

  for epoch in range(start_epoch, t.num_epochs):
    epoch_start = time.perf_counter()
    state, train_loss = _train_epoch(config, state, train_step, train_source, epoch,
                                     steps_per_epoch, schedule, reporter)
    train_seconds += time.perf_counter() - epoch_start
    result = evaluation.with_targets(config, evaluator(state.params, val_source))
    result.update(epoch=epoch + 1, step=int(state.step), train_loss=train_loss,
                  epoch_seconds=time.perf_counter() - epoch_start, train_seconds=train_seconds)
    reporter.scalars(int(state.step), {k: v for k, v in result.items()
                                       if k not in ('epoch', 'step')}, prefix='val/')
    if (epoch + 1) % t.histogram_every_epochs == 0:
      reporter.histograms(int(state.step), state.params)
    reporter.history({'kind': 'epoch', **result})
    print(reporting.epoch_summary(epoch + 1, t.num_epochs, result), flush=True)

    value = result.get(best_metric, math.nan)
    stopper.update(value)
    stopped = None
    if stopper.should_stop:
      stopped = f'Early stopping: {best_metric} did not improve for {stopper.patience} epochs.'
    elif t.stop_when_targets_met and result.get('targets_score') == 1.0:
      stopped = 'All Phase 1 targets met; stopping (train.stop_when_targets_met).'
    reporter.flush()
    ckpt.save(int(state.step), state, metrics={best_metric: value}, extra={
        'epoch': epoch + 1, 'early_stopping': stopper.state(), 'train_seconds': train_seconds,
        'stopped': stopped})
    if stopped:
      print(stopped)
      break

  ckpt.wait_until_finished()
  ckpt.close()
  reporter.close()
  report = evaluation.evaluate_checkpoint(config, workdir, which='best')
  print(f'Best checkpoint (step {report["checkpoint_step"]}): {_targets_line(report)}')
  return report


def _targets_line(report: dict) -> str:
  targets = report['targets']
  if targets is None:
    return 'targets not scored (no BLEU: eval.bleu_samples=0)'
  return '  '.join(
      f'{k}={v["value"]:.4f} (target {v["target"]}, {"pass" if v["passed"] else "FAIL"})'
      for k, v in targets.items() if k != 'all_passed') + (
          '  -> all targets met' if targets['all_passed'] else '  -> targets not met')


def _train_epoch(config, state, train_step, source, epoch, steps_per_epoch, schedule, reporter):
  """One pass over the shuffled training split. Returns (state, mean train loss).

  The next step is dispatched before the previous step's metrics are pulled to the host, so the
  device never waits on Python logging; batches are put on the device two steps ahead.
  """
  t = config.train
  batches = pipeline.train_iterator(source, batch_size=t.batch_size, seed=config.data.seed,
                                    epoch=epoch)
  bar = reporting.progress_bar(steps_per_epoch, desc=f'Epoch {epoch + 1}/{t.num_epochs}')
  loss_sum, tokens, pending = 0.0, 0, None
  start = time.perf_counter()

  def pull(step, metrics):
    nonlocal loss_sum, tokens
    metrics = jax.device_get(metrics)
    loss_sum += float(metrics['loss'])
    tokens += int(metrics.pop('tokens'))
    rate = tokens / max(time.perf_counter() - start, 1e-9)
    bar.set_postfix(loss=f'{float(metrics["loss"]):.4f}', tok_s=f'{rate:,.0f}', refresh=False)
    bar.update(1)
    if step % t.log_every_steps == 0:
      opt_step = (step - 1) // t.accumulate_grad_batches
      metrics.update(learning_rate=float(schedule(opt_step)), tokens_per_second=rate)
      reporter.scalars(step, metrics, prefix='train/')
      reporter.history({'kind': 'train', 'step': step, 'epoch': epoch + 1, **metrics})

  step = int(state.step)
  for batch in parallel.prefetch_to_device(batches, size=2):
    state, metrics = train_step(state, batch)
    step += 1
    if pending is not None:
      pull(*pending)
    pending = (step, metrics)
  if pending is not None:
    pull(*pending)
  bar.close()
  del batches
  return state, loss_sum / max(steps_per_epoch, 1)
