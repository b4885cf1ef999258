"""The training loop's host-side run state: what a checkpoint must carry besides the TrainState
(epoch and position in it, the epoch's running loss, early stopping, non-finite counters, time),
and one epoch of steps with its logging, mid-epoch checkpoints and stop signals."""
from __future__ import annotations

import dataclasses
import logging
import time

import jax

from phase1_jax.data import pipeline
from phase1_jax.training import faults, reporting
from phase1_jax.training.checkpoint import CONFIG_KEY

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """config.train's loop fields (data_seed: the epochs' shuffling seed, config.data.seed)."""
  batch_size: int
  num_epochs: int
  data_seed: int = 0
  log_every_steps: int = 20
  histogram_every_epochs: int = 1
  early_stopping_patience: int = 0
  stop_when_targets_met: bool = False
  max_consecutive_nonfinite: int = 0
  accumulate_grad_batches: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  """config.checkpoint: the metric that picks the best checkpoint and its direction ('min' or
  'max'), how many to keep, a mid-epoch save every `every_steps` (0: epoch ends only)."""
  best_metric: str
  best_mode: str
  max_to_keep: int = 3
  every_steps: int = 0
  async_save: bool = True


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


def host_step(par, state) -> int:
  """The step counter as a Python int (one replica's under pmap)."""
  return int(jax.device_get(par.unreplicate(state.step)))


def train_iterator(train: TrainSpec, par, source, epoch):
  """This process's slice of every global batch of the epoch."""
  return pipeline.train_iterator(source, batch_size=train.batch_size, seed=train.data_seed,
                                 epoch=epoch,
                                 shard_index=par.process_index, shard_count=par.process_count)


class Run:
  """The loop's host-side state that a checkpoint must carry besides the TrainState: the epoch
  and position in it, the epoch's running loss, early stopping, non-finite counters, time."""

  def __init__(self, spec, par, extra, resumed_batches, steps_per_epoch, schedule, ckpt):
    """spec: the run's specs.RunSpec (train, checkpoint and the config it saves)."""
    t = spec.train
    self.spec, self.par, self.steps_per_epoch, self.schedule, self.ckpt = (
        spec, par, steps_per_epoch, schedule, ckpt)
    self.stopper = EarlyStopping(spec.checkpoint.best_mode, t.early_stopping_patience,
                                 **extra.get('early_stopping', {}))
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
    first, so a kill after the commit cannot lose a step the checkpoint counts as done. A second
    SIGINT meanwhile waits for the save (StopSignals.saving)."""
    extra = {'epoch': epoch, 'epoch_step': epoch_step, 'loss_sum': self.loss_sum,
             'loss_count': self.loss_count, 'early_stopping': self.stopper.state(),
             'nonfinite': self.nonfinite.state(), 'train_seconds': self.train_seconds + seconds,
             'stopped': stopped, CONFIG_KEY: dict(self.spec.config)}
    with self.signals.saving():
      self.reporter.flush()
      # The unreplicated state: a checkpoint restores in any parallel mode or mesh.
      self.ckpt.save(host_step(self.par, state), self.par.unreplicate(state), metrics=metrics,
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
      with self.signals.saving():
        self.ckpt.wait_until_finished()
      raise faults.Preempted(self.stop_reason, host_step(self.par, state), self.ckpt.directory)

  def _pull(self, step: int, metrics, epoch: int, bar, meter: dict) -> None:
    """A finished step's metrics to the host: the non-finite counter, the epoch's loss, the
    progress bar, and every train.log_every_steps (or on a skipped step) the logs."""
    t = self.spec.train
    metrics = self.par.metrics_to_host(metrics)
    nonfinite = bool(metrics.pop('nonfinite'))
    self.nonfinite.update(step, nonfinite)
    if not nonfinite:
      self.loss_sum += float(metrics['loss'])
      self.loss_count += 1
    meter['tokens'] += int(metrics.pop('tokens'))
    rate = meter['tokens'] / max(time.perf_counter() - meter['start'], 1e-9)
    bar.set_postfix(loss=f'{float(metrics["loss"]):.4f}', tok_s=f'{rate:,.0f}', refresh=False)
    bar.update(1)
    if nonfinite:
      log.warning('Step %d skipped: non-finite loss or gradient (%d in a row, %d in all).',
                      step, self.nonfinite.consecutive, self.nonfinite.total)
    if step % t.log_every_steps == 0 or nonfinite:
      opt_step = (step - 1) // t.accumulate_grad_batches
      metrics.update(learning_rate=float(self.schedule(opt_step)), tokens_per_second=rate,
                     nonfinite_steps=self.nonfinite.total)
      self.reporter.scalars(step, metrics, prefix='train/')
      self.reporter.history({'kind': 'train', 'step': step, 'epoch': epoch + 1, **metrics})

  def train_epoch(self, state, train_step, source, epoch):
    """One pass over the shuffled training split (the rest of it, after a mid-epoch resume).
    Returns (state, mean train loss over the epoch's finite steps).

    The next step is dispatched before the previous step's metrics are pulled to the host, so the
    device never waits on Python logging.
    """
    t, every = self.spec.train, self.spec.checkpoint.every_steps
    batches = self.resumed_batches or train_iterator(t, self.par, source, epoch)
    if self.resumed_batches is None:
      self.epoch_step, self.loss_sum, self.loss_count = 0, 0.0, 0
    self.resumed_batches = None
    bar = reporting.progress_bar(self.steps_per_epoch, desc=f'Epoch {epoch + 1}/{t.num_epochs}',
                                 disable=self.par.process_index != 0)
    bar.update(self.epoch_step)
    pending, start = None, time.perf_counter()
    meter = {'tokens': 0, 'start': start}
    pull = lambda step, metrics: self._pull(step, metrics, epoch, bar, meter)

    step = host_step(self.par, state)
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
        # Also a signal that came during a periodic save: the checkpoint is this step's.
        try:
          self.stop_if_signalled(state)
        except faults.Preempted:
          bar.close()
          raise
    if pending is not None:
      pull(*pending)
    bar.close()
    del batches
    return state, self.loss_sum / max(self.loss_count, 1)
