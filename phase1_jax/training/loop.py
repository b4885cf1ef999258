"""train_and_evaluate(config, workdir): the whole training job, from config to files on disk."""
from __future__ import annotations

import datetime
import math
import os
import signal
import time

import jax
import ml_collections
from absl import logging
from flax import nnx

from phase1_jax import config as config_lib
from phase1_jax.data import pipeline
from phase1_jax.model.phase1 import parameter_report
from phase1_jax.training import evaluation, faults, parallel, reporting
from phase1_jax.training import state as state_lib
from phase1_jax.training import step as step_lib
from phase1_jax.training.checkpoint import CONFIG_KEY, Checkpointer, CheckpointError


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
  latest good checkpoint if there is one, at the exact step and data position it was saved at.
  Ends by evaluating the best checkpoint into evaluation_results.json, whose content it returns.

  Raises faults.Preempted after SIGTERM/SIGINT (checkpoint of the current step committed),
  faults.NonFiniteError after train.max_consecutive_nonfinite skipped steps in a row.
  """
  config_lib.validate(config)
  parallel.initialize_distributed(config)
  par = parallel.DataParallel(config)   # checks the layout against the devices: before compiling
  workdir = workdir or default_workdir(config)
  faults.prepare_workdir(workdir)
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
  made = {}

  def epoch_batches(extra):
    """The data iterator a mid-epoch checkpoint's position is restored into (None at epoch ends:
    the next epoch starts fresh)."""
    made['batches'] = None
    if extra.get('epoch_step', 0):
      made['batches'] = _train_iterator(config, par, train_source, extra['epoch'])
    return made['batches']

  abstract_state = jax.eval_shape(lambda: state)
  restored = ckpt.restore_latest_good(
      par.restore_target(abstract_state), data_iterator=epoch_batches,
      expect_config={f: _get(config, f) for f in config_lib.ARCHITECTURE_FIELDS})
  extra = {}
  if restored is not None:
    step, state, extra = restored
    logging.info('Resumed from %s step %d (epoch %d, step %d in it).', ckpt.directory, step,
                 extra['epoch'], extra.get('epoch_step', 0))
  state = par.place_state(state)
  run = _Run(config, par, extra, made.get('batches'), steps_per_epoch, schedule, ckpt)
  # A run that stopped early stays stopped when its workdir is run again.
  start_epoch = t.num_epochs if extra.get('stopped') else extra.get('epoch', 0)

  main_process = jax.process_index() == 0
  run.reporter = reporter = reporting.Reporter(workdir, start_step=_host_step(par, state),
                                               is_main_process=main_process)
  reporter.write_json('config.json', config.to_dict())
  params_info = _model_report(config, graphdef, abstract_state.params)
  reporter.write_json('model_parameters.json', params_info)
  if main_process:
    print(f'Device: {jax.default_backend()} ({jax.device_count()} devices, {par.mode} over '
          f'{par.num_devices}, {jax.process_count()} processes)  Model parameters: '
          f'{params_info["params"]:,} ({params_info["reduction_vs_two_decoders"]:.0%} fewer than '
          f'two separate decoders, {params_info["reduction_vs_no_sharing"]:.0%} fewer than no '
          f'sharing)')
    print(f'Workdir: {workdir}')

  train_step = par.train_step(graphdef=graphdef, tx=tx,
                              loss_spec=step_lib.LossSpec.from_config(config),
                              abstract_state=abstract_state)
  evaluator = evaluation.Evaluator(config, graphdef)

  try:
    # Several hosts: SIGTERM stays with jax.distributed's preemption notifier, which Orbax's
    # preemption sync (reached_preemption) reads; a Python handler would replace it.
    with faults.StopSignals(faults.STOP_SIGNALS if jax.process_count() == 1 else
                            (signal.SIGINT,)) as signals:
      run.signals = signals
      for epoch in range(start_epoch, t.num_epochs):
        epoch_start = time.perf_counter()
        state, train_loss = run.train_epoch(state, train_step, train_source, epoch)
        run.train_seconds += time.perf_counter() - epoch_start
        result = evaluation.with_targets(config, evaluator(par.eval_params(state), val_source))
        step = _host_step(par, state)
        result.update(epoch=epoch + 1, step=step, train_loss=train_loss,
                      epoch_seconds=time.perf_counter() - epoch_start,
                      train_seconds=run.train_seconds)
        reporter.scalars(step, {k: v for k, v in result.items() if k not in ('epoch', 'step')},
                         prefix='val/')
        if main_process and (epoch + 1) % t.histogram_every_epochs == 0:
          reporter.histograms(step, par.eval_params(state))
        reporter.history({'kind': 'epoch', **result})
        if main_process:
          print(reporting.epoch_summary(epoch + 1, t.num_epochs, result), flush=True)

        value = result.get(best_metric, math.nan)
        run.stopper.update(value)
        stopped = None
        if run.stopper.should_stop:
          stopped = (f'Early stopping: {best_metric} did not improve for '
                     f'{run.stopper.patience} epochs.')
        elif t.stop_when_targets_met and result.get('targets_score') == 1.0:
          stopped = 'All Phase 1 targets met; stopping (train.stop_when_targets_met).'
        run.save(state, epoch + 1, 0, metrics={best_metric: value}, stopped=stopped)
        run.stop_if_signalled(state)
        if stopped:
          if main_process:
            print(stopped)
          break
  except BaseException:
    # Commit the saves already started, so the last good checkpoint is whole; a failure to do so
    # is logged, not raised over the error that got us here.
    try:
      ckpt.close()
    except CheckpointError as e:
      logging.error('%s', e)
    reporter.close()
    raise
  ckpt.close()
  reporter.close()
  report = evaluation.evaluate_checkpoint(config, workdir, which='best')
  if main_process:
    print(f'Best checkpoint (step {report["checkpoint_step"]}): {_targets_line(report)}')
  return report


def _host_step(par, state) -> int:
  return int(jax.device_get(par.unreplicate(state.step)))


def _get(config, path):
  for part in path.split('.'):
    config = config[part]
  return config


def _train_iterator(config, par, source, epoch):
  """This process's slice of every global batch of the epoch."""
  return pipeline.train_iterator(source, batch_size=config.train.batch_size,
                                 seed=config.data.seed, epoch=epoch,
                                 shard_index=par.process_index, shard_count=par.process_count)


def _targets_line(report: dict) -> str:
  targets = report['targets']
  if targets is None:
    return 'targets not scored (no BLEU: eval.bleu_samples=0)'
  return '  '.join(
      f'{k}={v["value"]:.4f} (target {v["target"]}, {"pass" if v["passed"] else "FAIL"})'
      for k, v in targets.items() if k != 'all_passed') + (
          '  -> all targets met' if targets['all_passed'] else '  -> targets not met')


class _Run:
  """The loop's host-side state that a checkpoint must carry besides the TrainState: the epoch
  and position in it, the epoch's running loss, early stopping, non-finite counters, time."""

  def __init__(self, config, par, extra, resumed_batches, steps_per_epoch, schedule, ckpt):
    t = config.train
    self.config, self.par, self.steps_per_epoch, self.schedule, self.ckpt = (
        config, par, steps_per_epoch, schedule, ckpt)
    self.stopper = EarlyStopping(config_lib.METRIC_MODES[config.checkpoint.best_metric],
                                 t.early_stopping_patience, **extra.get('early_stopping', {}))
    self.nonfinite = faults.NonFiniteCounter(t.max_consecutive_nonfinite,
                                             **extra.get('nonfinite', {}))
    self.train_seconds = extra.get('train_seconds', 0.0)
    # A mid-epoch resume: the restored iterator, the steps done and the loss summed so far.
    self.resumed_batches = resumed_batches
    self.epoch_step = extra.get('epoch_step', 0)
    self.loss_sum, self.loss_count = extra.get('loss_sum', 0.0), extra.get('loss_count', 0)
    self.reporter = self.signals = self.stop_reason = None

  def save(self, state, epoch, epoch_step, *, metrics=None, stopped=None, data_iterator=None,
           seconds=0.0):
    """Checkpoints `state` with everything needed to continue from it; logs are made durable
    first, so a kill after the commit cannot lose a step the checkpoint counts as done."""
    self.reporter.flush()
    extra = {'epoch': epoch, 'epoch_step': epoch_step, 'loss_sum': self.loss_sum,
             'loss_count': self.loss_count, 'early_stopping': self.stopper.state(),
             'nonfinite': self.nonfinite.state(), 'train_seconds': self.train_seconds + seconds,
             'stopped': stopped, CONFIG_KEY: self.config.to_dict()}
    # The unreplicated state: a checkpoint restores in any parallel mode or mesh.
    self.ckpt.save(_host_step(self.par, state), self.par.unreplicate(state), metrics=metrics,
                   data_iterator=data_iterator, extra=extra)

  def should_stop(self, step: int) -> str | None:
    """Why to stop after `step` (a signal's name), or None; called after every step. On several
    hosts only Orbax's preemption sync counts: it names the same step on every host, where one
    host acting on its own signal would save alone and hang the others."""
    if jax.process_count() > 1:
      if self.ckpt.reached_preemption(step):
        self.stop_reason = 'preemption'
    elif self.signals.requested:
      self.stop_reason = self.signals.requested
    return self.stop_reason

  def stop_if_signalled(self, state) -> None:
    """After a checkpoint: waits for its commit and raises Preempted if a stop was asked for."""
    if jax.process_count() == 1 and self.signals.requested:
      self.stop_reason = self.signals.requested
    if self.stop_reason:
      self.ckpt.wait_until_finished()
      raise faults.Preempted(self.stop_reason, _host_step(self.par, state), self.ckpt.directory)

  def train_epoch(self, state, train_step, source, epoch):
    """One pass over the shuffled training split (the rest of it, after a mid-epoch resume).
    Returns (state, mean train loss over the epoch's finite steps).

    The next step is dispatched before the previous step's metrics are pulled to the host, so the
    device never waits on Python logging.
    """
    t, every = self.config.train, self.config.checkpoint.every_steps
    batches = self.resumed_batches or _train_iterator(self.config, self.par, source, epoch)
    if self.resumed_batches is None:
      self.epoch_step, self.loss_sum, self.loss_count = 0, 0.0, 0
    self.resumed_batches = None
    bar = reporting.progress_bar(self.steps_per_epoch, desc=f'Epoch {epoch + 1}/{t.num_epochs}',
                                 disable=self.par.process_index != 0)
    bar.update(self.epoch_step)
    tokens, pending = 0, None
    start = time.perf_counter()

    def pull(step, metrics):
      nonlocal tokens
      metrics = self.par.metrics_to_host(metrics)
      nonfinite = bool(metrics.pop('nonfinite'))
      self.nonfinite.update(step, nonfinite)
      if not nonfinite:
        self.loss_sum += float(metrics['loss'])
        self.loss_count += 1
      tokens += int(metrics.pop('tokens'))
      rate = tokens / max(time.perf_counter() - start, 1e-9)
      bar.set_postfix(loss=f'{float(metrics["loss"]):.4f}', tok_s=f'{rate:,.0f}', refresh=False)
      bar.update(1)
      if nonfinite:
        logging.warning('Step %d skipped: non-finite loss or gradient (%d in a row, %d in all).',
                        step, self.nonfinite.consecutive, self.nonfinite.total)
      if step % t.log_every_steps == 0 or nonfinite:
        opt_step = (step - 1) // t.accumulate_grad_batches
        metrics.update(learning_rate=float(self.schedule(opt_step)), tokens_per_second=rate,
                       nonfinite_steps=self.nonfinite.total)
        self.reporter.scalars(step, metrics, prefix='train/')
        self.reporter.history({'kind': 'train', 'step': step, 'epoch': epoch + 1, **metrics})

    step = _host_step(self.par, state)
    for batch in batches:
      state, metrics = train_step(state, self.par.place_batch(batch))
      step += 1
      self.epoch_step += 1
      if pending is not None:
        pull(*pending)
      pending = (step, metrics)
      # The epoch's last step is checkpointed after evaluation, with the metrics.
      mid_epoch = self.epoch_step < self.steps_per_epoch
      signalled = self.should_stop(step) and mid_epoch
      if mid_epoch and (signalled or (every and step % every == 0)):
        pull(*pending)
        pending = None
        self.save(state, epoch, self.epoch_step, data_iterator=batches,
                  seconds=time.perf_counter() - start)
        if signalled:
          bar.close()
          self.stop_if_signalled(state)
    if pending is not None:
      pull(*pending)
    bar.close()
    del batches
    return state, self.loss_sum / max(self.loss_count, 1)
