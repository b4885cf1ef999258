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
from phase1_jax import config_validation
from phase1_jax.data import pipeline
from phase1_jax.inference import evaluation, visual_evaluation
from phase1_jax.model.phase1 import parameter_report
from phase1_jax.training import faults, parallel, reporting
from phase1_jax.training import run as run_lib
from phase1_jax.training import state as state_lib
from phase1_jax.training import step as step_lib
from phase1_jax.training.checkpoint import Checkpointer, CheckpointError


def default_workdir(config: ml_collections.ConfigDict) -> str:
  """experiments/<exp_name>_<YYYYmmdd_HHMMSS>, as in the seed."""
  stamp = datetime.datetime.now().strftime('%Y%m%d_%H%M%S')
  return os.path.join('experiments', f'{config.exp_name}_{stamp}')


def _model_report(config, graphdef, params) -> dict:
  model = nnx.merge(graphdef, params['model'])
  return parameter_report(model, config.model.num_layers, config.model.num_unique_layers)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """Trains with per-epoch evaluation, early stopping and checkpoints; resumes from `workdir`'s
  latest good checkpoint if there is one, at the exact step and data position it was saved at.
  Ends by evaluating the best checkpoint into evaluation_results.json, whose content it returns.

  Raises faults.Preempted after SIGTERM/SIGINT (checkpoint of the current step committed),
  faults.NonFiniteError after train.max_consecutive_nonfinite skipped steps in a row,
  faults.WriterError when a log file cannot be written (the checkpoints committed before stay),
  KeyboardInterrupt on a second SIGINT outside a save.
  """
  config_validation.validate(config)
  parallel.initialize_distributed(config)
  par = parallel.DataParallel(config)   # checks the layout against the devices: before compiling
  workdir = workdir or default_workdir(config)
  faults.prepare_workdir(workdir)
  if jax.process_index() == 0:   # a garbled history fails now, not after restore and compile
    reporting.load_records(workdir)
  train_source = pipeline.make_source(config, 'train')
  val_source = pipeline.make_source(config, 'val')
  visual_evaluation.RenderEvalSpec.from_config(config)   # no browser: one line, before compiling
  t = config.train
  steps_per_epoch = pipeline.steps_per_epoch(train_source, t.batch_size)
  tx, schedule = state_lib.make_optimizer(config, steps_per_epoch)
  graphdef, abstract_state = state_lib.create_train_state(config, tx, abstract=True)

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
      made['batches'] = run_lib.train_iterator(config, par, train_source, extra['epoch'])
    return made['batches']

  restored = ckpt.restore_latest_good(
      par.restore_target(abstract_state), data_iterator=epoch_batches,
      expect_config=config_lib.architecture(config))
  extra = {}
  if restored is not None:
    step, state, extra = restored
    logging.info('Resumed from %s step %d (epoch %d, step %d in it).', ckpt.directory, step,
                 extra['epoch'], extra.get('epoch_step', 0))
  else:
    _, state = state_lib.create_train_state(config, tx)
  state = par.place_state(state)
  run = run_lib.Run(config, par, extra, made.get('batches'), steps_per_epoch, schedule, ckpt)
  # A run that stopped early stays stopped when its workdir is run again.
  start_epoch = t.num_epochs if extra.get('stopped') else extra.get('epoch', 0)

  main_process = jax.process_index() == 0
  run.reporter = reporter = reporting.Reporter(workdir, start_step=run_lib.host_step(par, state),
                                               is_main_process=main_process)
  reporter.write_json('config.json', config.to_dict())
  params_info = _model_report(config, graphdef, abstract_state.params)
  reporter.write_json('model_parameters.json', params_info)
  if main_process:
    m = config.model
    layers = 'scanned' if state_lib.scan_layers(m.scan_layers, m.num_layers) else 'unrolled'
    print(f'Device: {jax.default_backend()} ({jax.device_count()} devices, {par.mode} over '
          f'{par.num_devices}, {jax.process_count()} processes; '
          f'{state_lib.compute_dtype(m.compute_dtype).name} compute, layers {layers}, '
          f'{state_lib.attention_kind(m.attention.kind)} attention)  '
          f'Model parameters: '
          f'{params_info["params"]:,} ({params_info["reduction_vs_two_decoders"]:.0%} fewer than '
          f'two separate decoders, {params_info["reduction_vs_no_sharing"]:.0%} fewer than no '
          f'sharing)')
    print(f'Workdir: {workdir}')

  train_step = par.train_step(graphdef=graphdef, tx=tx,
                              loss_spec=step_lib.LossSpec.from_config(config),
                              abstract_state=abstract_state)
  evaluator = evaluation.Evaluator(config, graphdef, val_source, par=par)

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
        step = run_lib.host_step(par, state)
        result.update(epoch=epoch + 1, step=step, train_loss=train_loss,
                      epoch_seconds=time.perf_counter() - epoch_start,
                      train_seconds=run.train_seconds)
        pictures = result.pop('pictures', {})
        reporter.scalars(step, {k: v for k, v in result.items() if k not in ('epoch', 'step')},
                         prefix='val/')
        reporter.images(step, pictures, prefix='val/generated_')
        if (epoch + 1) % t.histogram_every_epochs == 0:
          # On every process: eval_params gathers across processes (the reporter writes on 0).
          reporter.histograms(step, par.eval_params(state))
        reporter.history({'kind': 'epoch', **result})
        reporter.write_history()
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
    reporter.abandon()
    raise
  ckpt.close()
  reporter.close()
  report = evaluation.evaluate_checkpoint(config, workdir, which='best')
  if main_process:
    print(evaluation.summary(report))
  return report

