"""Checkpointing: the only module that talks to Orbax.

One checkpoint step directory ``<directory>/<step>/`` holds up to three items:

* ``state``: any pytree of jax/numpy arrays (``ocp.args.StandardSave``).
* ``extra``: a JSON-serialisable dict (epoch, early-stopping counters...), and under
  ``checksums`` a CRC-32 of every array of ``state`` and of the rest of ``extra``, verified at
  restore (checkpoint_integrity). Kept in ``extra``, which is read first anyway, rather than in
  an item of their own.
* ``data``:  a grain ``DatasetIterator`` position (only when one is given).

The fallback past damaged steps is checkpoint_recovery; the errors raised, and Orbax's
background logs dropped, are checkpoint_errors. Every public name is importable from here.

Retention keeps the newest ``max_to_keep`` steps AND the best step by
``metrics[best_metric]``. Orbax's own ``max_to_keep`` + ``best_fn`` can delete
the latest step, so an explicit ``AnyPreservationPolicy([LatestN, BestN])`` is
used instead.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from phase1_jax.training import checkpoint_compat as compat
from phase1_jax.training import checkpoint_recovery as recovery
from phase1_jax.training.checkpoint_errors import QUIET as _QUIET
from phase1_jax.training.checkpoint_errors import (
  CheckpointError,
  CheckpointMismatchError,
  quiet_background_failures,
)
from phase1_jax.training.checkpoint_errors import one_line as _one_line
from phase1_jax.training.checkpoint_integrity import CHECKSUMS_KEY, Checksums

__all__ = ['CHECKSUMS_KEY', 'CONFIG_KEY', 'CheckpointError', 'CheckpointMismatchError',
           'Checkpointer']

log = logging.getLogger(__name__)

_STATE, _EXTRA, _DATA = 'state', 'extra', 'data'
# The run's config is saved in `extra` under this key; restore(expect_config=) compares it.
CONFIG_KEY = 'config'


class Checkpointer:
  """Saves/restores training state, an extra JSON dict and a grain iterator.

  Usage::

    with Checkpointer(workdir / 'checkpoints', max_to_keep=3) as ckpt:
      ckpt.save(step, state, metrics={'val_loss': 1.2}, extra={'epoch': 3})
      state, extra = ckpt.restore(ckpt.latest_step(), jax.eval_shape(lambda: state))
  """

  def __init__(self,
               directory: str | os.PathLike,
               *,
               max_to_keep: int = 3,
               best_metric: str = 'val_loss',
               best_mode: str = 'min',
               async_save: bool = True,
               checksums: bool = True):
    """`checksums=False` neither writes nor verifies checksums (for measuring their cost)."""
    if best_mode not in ('min', 'max'):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    if max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}')
    self.directory = os.path.abspath(os.fspath(directory))
    self.best_metric, self.best_mode = best_metric, best_mode
    # A missing or non-finite metric ranks worst, so it never wins "best".
    self._worst = math.inf if best_mode == 'min' else -math.inf

    preservation = ocp_policies.AnyPreservationPolicy([
        ocp_policies.LatestN(n=max_to_keep),
        # reverse=True sorts descending, so the kept tail is the LOWEST metric.
        ocp_policies.BestN(get_metric_fn=self._metric_value,
                           reverse=(best_mode == 'min'),
                           n=1,
                           keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation,
        best_fn=self._metric_value,
        best_mode=best_mode,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    # Registering handlers up front lets a fresh manager read metadata and
    # restore items it has not saved itself in this process.
    handlers = {
        _STATE: ocp.StandardCheckpointHandler(),
        _EXTRA: ocp.JsonCheckpointHandler(),
        _DATA: grain.checkpoint.CheckpointHandler(),
    }
    self.checksums = checksums
    self._checksums = Checksums(checksums)
    self._last_saved = None
    self._write_failed = False   # raised already: close() does not raise it again
    self._raised_orbax_error = False   # Orbax's own (dropped) error logs were explained
    quiet_background_failures()
    self._quiet_dropped = _QUIET.dropped
    recovery.remove_partial_saves(self.directory)
    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  # ----------------------------------------------------------------- queries
  def _metric_value(self, metrics) -> float:
    value = (metrics or {}).get(self.best_metric)
    try:
      value = float(value)
    except (TypeError, ValueError):
      return self._worst
    return value if math.isfinite(value) else self._worst

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def best_step(self) -> int | None:
    """Best step by ``best_metric``; None if no step has that metric."""
    step = self._mgr.best_step()
    if step is None or self._metric_value(self._mgr.metrics(step)) == self._worst:
      return None
    return step

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # -------------------------------------------------------------------- save
  def save(self,
           step: int,
           state,
           *,
           metrics: dict[str, float] | None = None,
           extra: dict | None = None,
           data_iterator=None,
           force: bool = False) -> bool:
    """Starts saving ``step`` (async unless async_save=False).

    Returns False without writing when ``step`` already exists or is not
    newer than the latest step (e.g. re-saving the step just restored).
    """
    # Orbax's save waits for the previous async save anyway; waiting here first names the step
    # whose write failed, not this one.
    self.wait_until_finished()
    latest = self.latest_step()
    if latest is not None and step <= latest:
      log.info('Checkpoint step %d not saved: %s already holds step %d.', step, self.directory,
               latest)
      return False
    extra = self._checksums.add(state, extra or {})
    items = {_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(extra)}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    # {} rather than None: Orbax warns on every metric-less save once best_fn is set; an empty
    # dict ranks worst, like a missing metric.
    metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
    try:
      saved = self._mgr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
    except Exception as e:  # a full disk or a lost directory surfaces as assorted types
      raise self._write_error(step, e) from e
    if saved:
      self._last_saved, self._write_failed = step, False
      log.info('Saving checkpoint step %d to %s', step, self.directory)
    return saved

  # ----------------------------------------------------------------- restore
  def _read_extra(self, step: int) -> tuple[dict, dict | None]:
    """(extra, its checksums record or None: see Checksums.take) of a step."""
    extra = dict(self._mgr.restore(
        step, args=ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()}))[_EXTRA] or {})
    return extra, self._checksums.take(extra, self.step_dir(step), step)

  def _check_matches(self, step: int, abstract_state) -> None:
    """Raises CheckpointMismatchError naming the first leaf whose tree place, shape or dtype
    differs from the restore target."""
    state_meta = self._mgr.item_metadata(step)[_STATE]
    if getattr(state_meta, 'tree', None) is None:
      raise CheckpointError(f'{self.step_dir(step)}: state metadata is missing or unreadable')
    problem = compat.tree_mismatch(state_meta.tree, abstract_state)
    if problem:
      raise CheckpointMismatchError(f'{self.step_dir(step)}: {problem}')

  def _check_config(self, step: int, extra: dict, expect_config: dict | None) -> None:
    problem = compat.config_mismatch(extra.get(CONFIG_KEY), expect_config or {})
    if problem:
      raise CheckpointMismatchError(f'{self.step_dir(step)}: {problem}')

  def restore(self, step: int, abstract_state, *, data_iterator=None,
              expect_config: dict | None = None) -> tuple[Any, dict]:
    """Returns ``(state, extra)``; restores ``data_iterator`` in place if given.

    ``abstract_state`` is the state's pytree of ``jax.ShapeDtypeStruct``
    (``jax.eval_shape``); the result has the same pytree type. ``data_iterator`` may also be a
    function of the step's ``extra`` returning the iterator to fill (or None: no data restore),
    for iterators that depend on where the step was (its epoch). ``expect_config`` maps dotted
    config fields to the values this run needs (see _check_config).
    """
    self.wait_until_finished()
    if step not in self._mgr.all_steps():
      have = self.all_steps()
      what = f'steps present: {have}' if have else 'it holds no checkpoints'
      raise FileNotFoundError(f'{self.directory}: no checkpoint for step {step} ({what})')
    path = self.step_dir(step)
    try:
      # Three reads, cheapest first: a config mismatch is named before any array is touched.
      extra, sums = self._read_extra(step)
      self._checksums.check_extra(sums, extra, path, step)   # before the config in it is trusted
      self._check_config(step, extra, expect_config)
      self._check_matches(step, abstract_state)
      state = self._mgr.restore(
          step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state)}))
      self._checksums.check_state(sums, state[_STATE], path, step)
      iterator = data_iterator(extra) if callable(data_iterator) else data_iterator
      if iterator is not None:
        if not os.path.isdir(os.path.join(path, _DATA)):
          raise CheckpointError(f'{path}: step {step} was saved without a data iterator position')
        self._mgr.restore(step, args=ocp.args.Composite(
            **{_DATA: grain.checkpoint.CheckpointRestore(iterator)}))
    except CheckpointError:
      raise
    except Exception as e:  # Orbax raises assorted types for damaged files.
      self._raised_orbax_error = True
      raise CheckpointError(f'{path}: cannot restore step {step} ({_one_line(e)})') from e
    return state[_STATE], extra

  def restore_latest_good(self, abstract_state, data_iterator=None,
                          expect_config: dict | None = None):
    """Restores the newest step that loads, skipping corrupt ones.

    Returns ``(step, state, extra)``, or None when there are no checkpoints.
    A tree/shape/config mismatch is raised at once (older steps would mismatch too);
    if every step is corrupt, one CheckpointError names the steps and the newest one's error
    (the skipped steps are logged only when an older one restores).
    The unreadable steps newer than the restored one are renamed ``<step>.unreadable`` (kept
    for inspection): the resumed run saves those steps again, and Orbax refuses a step that
    exists, or could pick a corrupt one as "best".
    """
    steps = sorted(self._mgr.all_steps(), reverse=True)
    found = recovery.newest_readable(self.directory, steps, lambda step: self.restore(
        step, abstract_state, data_iterator=data_iterator, expect_config=expect_config))
    if found is not None and found[0] != steps[0]:
      recovery.set_aside(self.directory, [step for step in steps if step > found[0]])
      self._mgr.reload()
    return found

  # --------------------------------------------------------------- lifecycle
  def _write_error(self, step, e: Exception) -> CheckpointError:
    self._write_failed = self._raised_orbax_error = True
    return CheckpointError(f'{self.directory}: cannot write checkpoint step {step} '
                           f'({_one_line(e)}); older checkpoints are intact')

  def wait_until_finished(self) -> None:
    """Blocks until async saves are committed; a failed one raises CheckpointError (once)."""
    try:
      self._mgr.wait_until_finished()
    except Exception as e:
      if self._write_failed:   # the same failure again: already raised
        log.debug('Checkpoint write failed again: %s', _one_line(e))
        return
      raise self._write_error(self._last_saved, e) from e

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: True on every host once any got a preemption notice, at a common step
    (Orbax's preemption sync; needs jax.distributed). Single-process runs check their own
    signal handler instead."""
    return jax.process_count() > 1 and bool(self._mgr.reached_preemption(step))

  def close(self) -> None:
    try:
      self.wait_until_finished()
    finally:
      self._mgr.close()
    if _QUIET.dropped > self._quiet_dropped and not self._raised_orbax_error:
      # Errors Orbax logged in the background that never reached this Checkpointer as an
      # exception: one line rather than silence.
      lines = _QUIET.first_lines[self._quiet_dropped:] or ['(not kept)']
      log.warning('%s: Orbax reported %d background errors, first: %s', self.directory,
                  _QUIET.dropped - self._quiet_dropped, lines[0])

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
