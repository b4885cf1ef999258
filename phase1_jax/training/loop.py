"""train_and_evaluate(config, workdir): the whole training job, from config to files on disk: the
config read once into a specs.RunSpec, then a Trainer (setup and restore, then `fit`: the epochs
and the final evaluation)."""
from __future__ import annotations

import datetime
import logging
import math
import os
import signal
import time

import jax
from flax import nnx

from phase1_jax import specs
from phase1_jax.data import pipeline
from phase1_jax.inference import evaluation
from phase1_jax.model.phase1 import parameter_report
from phase1_jax.training import faults, parallel, reporting
from phase1_jax.training import run as run_lib
from phase1_jax.training import state as state_lib
from phase1_jax.training.checkpoint import Checkpointer, CheckpointError

log = logging.getLogger(__name__)


def default_workdir(exp_name: str) -> str:
  """experiments/<exp_name>_<YYYYmmdd_HHMMSS>, as in the seed."""
  stamp = datetime.datetime.now().strftime('%Y%m%d_%H%M%S')
  return os.path.join('experiments', f'{exp_name}_{stamp}')


def train_and_evaluate(config, workdir: str | None = None, *, validated: bool = False) -> dict:
  """Trains with per-epoch evaluation, early stopping and checkpoints; resumes from `workdir`'s
  latest good checkpoint if there is one, at the exact step and data position it was saved at.
  Ends by evaluating the best checkpoint into evaluation_results.json, whose content it returns.

  Raises faults.Preempted after SIGTERM/SIGINT (checkpoint of the current step committed),
  faults.NonFiniteError after train.max_consecutive_nonfinite skipped steps in a row,
  faults.WriterError when a log file cannot be written (the checkpoints committed before stay),
  KeyboardInterrupt on a second SIGINT outside a save. `config` (the config tree) is read once,
  by specs.run_spec (`validated`: the caller already validated it); nothing below reads it.
  """
  run = specs.run_spec(config, validated=validated, start_distributed=True)
  return Trainer(run, workdir).fit()


class Trainer:
  """One training job: everything is checked and restored when it is made (a bad config, layout,
  dataset, history or browser fails here, before anything compiles); `fit` runs the epochs. It
  owns the checkpointer, the reporter and the stop signals."""

  def __init__(self, spec: specs.RunSpec, workdir: str | None):
    self.spec = spec
    self.par = par = parallel.DataParallel(spec.mesh)   # the layout against the devices
    self.workdir = workdir = workdir or default_workdir(spec.exp_name)
    faults.prepare_workdir(workdir)
    self.main_process = jax.process_index() == 0
    if self.main_process:   # a garbled history fails now, not after restore and compile
      reporting.load_records(workdir)
    self.train_source = pipeline.make_source(spec.data, 'train')
    self.val_source = pipeline.make_source(spec.data, 'val')
    steps_per_epoch = pipeline.steps_per_epoch(self.train_source, spec.train.batch_size)
    self.tx, schedule = state_lib.make_optimizer(spec.optimizer, steps_per_epoch)
    self.graphdef, self.abstract_state = state_lib.create_train_state(
        spec.model, self.tx, seed=spec.seed, abstract=True)
    c = spec.checkpoint
    self.best_metric = c.best_metric
    self.ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=c.max_to_keep,
                             best_metric=c.best_metric, best_mode=c.best_mode,
                             async_save=c.async_save)
    self.state, extra, batches = self._restore()
    self.run = run_lib.Run(spec, par, extra, batches, steps_per_epoch, schedule, self.ckpt)
    # A run that stopped early stays stopped when its workdir is run again.
    self.start_epoch = (spec.train.num_epochs if extra.get('stopped') else
                        extra.get('epoch', 0))
    self.run.reporter = self.reporter = reporting.Reporter(
        workdir, start_step=run_lib.host_step(par, self.state),
        is_main_process=self.main_process)

  def _restore(self):
    """(placed state, the checkpoint's extra, the restored mid-epoch data iterator or None): the
    newest good checkpoint, or a fresh state."""
    made = {}

    def epoch_batches(extra):
      """The data iterator a mid-epoch checkpoint's position is restored into (None at epoch
      ends: the next epoch starts fresh)."""
      made['batches'] = None
      if extra.get('epoch_step', 0):
        made['batches'] = run_lib.train_iterator(self.spec.train, self.par, self.train_source,
                                                 extra['epoch'])
      return made['batches']

    restored = self.ckpt.restore_latest_good(
        self.par.restore_target(self.abstract_state), data_iterator=epoch_batches,
        expect_config=dict(self.spec.architecture))
    if restored is None:
      fresh = state_lib.create_train_state(self.spec.model, self.tx, seed=self.spec.seed)[1]
      return self.par.place_state(fresh), {}, None
    step, state, extra = restored
    log.info('Resumed from %s step %d (epoch %d, step %d in it).', self.ckpt.directory, step,
                 extra['epoch'], extra.get('epoch_step', 0))
    return self.par.place_state(state), extra, made.get('batches')

  def _announce(self) -> None:
    """config.json, model_parameters.json, and the device and model line."""
    par = self.par
    self.reporter.write_json('config.json', dict(self.spec.config))
    params_info = parameter_report(nnx.merge(self.graphdef, self.abstract_state.params['model']))
    self.reporter.write_json('model_parameters.json', params_info)
    if not self.main_process:
      return
    m = self.spec.model
    layers = 'scanned' if m.scan_layers else 'unrolled'
    print(f'Device: {jax.default_backend()} ({jax.device_count()} devices, {par.mode} over '
          f'{par.num_devices}, {jax.process_count()} processes; '
          f'{m.dtype} compute, layers {layers}, {m.attention.kind} attention)  '
          f'Model parameters: '
          f'{params_info["params"]:,} ({params_info["reduction_vs_two_decoders"]:.0%} fewer than '
          f'two separate decoders, {params_info["reduction_vs_no_sharing"]:.0%} fewer than no '
          f'sharing)')
    print(f'Workdir: {self.workdir}')

  def fit(self) -> dict:
    """The epochs from the restored one, then the best checkpoint's evaluation (returned)."""
    self._announce()
    train_step = self.par.train_step(graphdef=self.graphdef, tx=self.tx,
                                     loss_spec=self.spec.loss,
                                     abstract_state=self.abstract_state)
    evaluator = evaluation.Evaluator(
        self.spec.eval, self.graphdef, self.val_source, par=self.par,
        to_markup=pipeline.markup_decoder(self.spec.data, self.spec.model.vocab_size))
    try:
      # Several hosts: SIGTERM stays with jax.distributed's preemption notifier, which Orbax's
      # preemption sync (reached_preemption) reads; a Python handler would replace it.
      with faults.StopSignals(faults.STOP_SIGNALS if jax.process_count() == 1 else
                              (signal.SIGINT,)) as signals:
        self.run.signals = signals
        for epoch in range(self.start_epoch, self.spec.train.num_epochs):
          if self._epoch(epoch, train_step, evaluator):
            break
    except BaseException:
      # Commit the saves already started, so the last good checkpoint is whole; a failure to do
      # so is logged, not raised over the error that got us here.
      try:
        self.ckpt.close()
      except CheckpointError as e:
        log.error('%s', e)
      self.reporter.abandon()
      raise
    self.ckpt.close()
    self.reporter.close()
    report = evaluation.evaluate_checkpoint(self.spec, self.workdir, which='best')
    if self.main_process:
      print(evaluation.summary(report))
    return report

  def _epoch(self, epoch: int, train_step, evaluator) -> bool:
    """Trains one epoch, evaluates, logs and checkpoints it; True when training should stop."""
    run, par, t = self.run, self.par, self.spec.train
    epoch_start = time.perf_counter()
    self.state, train_loss = run.train_epoch(self.state, train_step, self.train_source, epoch)
    run.train_seconds += time.perf_counter() - epoch_start
    result = evaluation.with_targets(self.spec.eval.targets,
                                     evaluator(par.eval_params(self.state), self.val_source))
    step = run_lib.host_step(par, self.state)
    result.update(epoch=epoch + 1, step=step, train_loss=train_loss,
                  epoch_seconds=time.perf_counter() - epoch_start, train_seconds=run.train_seconds)
    self._log_epoch(epoch, step, result)
    value = result.get(self.best_metric, math.nan)
    run.stopper.update(value)
    stopped = None
    if run.stopper.should_stop:
      stopped = (f'Early stopping: {self.best_metric} did not improve for '
                 f'{run.stopper.patience} epochs.')
    elif t.stop_when_targets_met and result.get('targets_score') == 1.0:
      stopped = 'All Phase 1 targets met; stopping (train.stop_when_targets_met).'
    run.save(self.state, epoch + 1, 0, metrics={self.best_metric: value}, stopped=stopped)
    run.stop_if_signalled(self.state)
    if stopped and self.main_process:
      print(stopped)
    return stopped is not None

  def _log_epoch(self, epoch: int, step: int, result: dict) -> None:
    """The epoch's evaluation to TensorBoard (scalars, pictures, histograms), the history and
    the console."""
    reporter, t = self.reporter, self.spec.train
    pictures = result.pop('pictures', {})
    reporter.scalars(step, {k: v for k, v in result.items() if k not in ('epoch', 'step')},
                     prefix='val/')
    reporter.images(step, pictures, prefix='val/generated_')
    if (epoch + 1) % t.histogram_every_epochs == 0:
      # On every process: eval_params gathers across processes (the reporter writes on 0).
      reporter.histograms(step, self.par.eval_params(self.state))
    reporter.history({'kind': 'epoch', **result})
    reporter.write_history()
    if self.main_process:
      print(reporting.epoch_summary(epoch + 1, t.num_epochs, result), flush=True)
