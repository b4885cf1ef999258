"""Checkpointing: the only module that talks to Orbax.

One checkpoint step directory ``<directory>/<step>/`` holds up to three items:

* ``state``: any pytree of jax/numpy arrays (``ocp.args.StandardSave``).
* ``extra``: a JSON-serialisable dict (epoch, early-stopping counters...).
* ``data``:  a grain ``DatasetIterator`` position (only when one is given).

Retention keeps the newest ``max_to_keep`` steps AND the best step by
``metrics[best_metric]``. Orbax's own ``max_to_keep`` + ``best_fn`` can delete
the latest step, so an explicit ``AnyPreservationPolicy([LatestN, BestN])`` is
used instead (see jax-stack-notes.md, section 4).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

log = logging.getLogger(__name__)

_STATE, _EXTRA, _DATA = 'state', 'extra', 'data'


class CheckpointError(RuntimeError):
  """A checkpoint step exists but cannot be restored (corrupt or incompatible)."""


class CheckpointMismatchError(CheckpointError):
  """The saved state's tree, shapes or dtypes differ from the restore target."""


def _key_name(key) -> str:
  """One pytree path entry as a plain string ('params', '0', 'kernel'...)."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_by_path(tree) -> dict[str, Any]:
  """{'params/layers/0/kernel/value': leaf, ...}; None leaves are skipped."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _storage_shape_dtype(leaf) -> tuple[tuple[int, ...], np.dtype]:
  """Shape/dtype as stored on disk (typed PRNG keys are stored as key data)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
  return tuple(leaf.shape), np.dtype(leaf.dtype)


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
               async_save: bool = True):
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
    latest = self.latest_step()
    if latest is not None and step <= latest:
      log.info('Checkpoint step %d not saved: %s already holds step %d.', step, self.directory,
               latest)
      return False
    items = {_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(dict(extra or {}))}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    if metrics is not None:
      metrics = {str(k): float(v) for k, v in metrics.items()}
    saved = self._mgr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
    if saved:
      log.info('Saving checkpoint step %d to %s', step, self.directory)
    return saved

  # ----------------------------------------------------------------- restore
  def _check_matches(self, step: int, abstract_state) -> None:
    """Raises CheckpointMismatchError on the first differing leaf."""
    path = self.step_dir(step)
    state_meta = self._mgr.item_metadata(step)[_STATE]
    if getattr(state_meta, 'tree', None) is None:
      raise CheckpointError(f'{path}: state metadata is missing or unreadable')
    saved = _flat_by_path(state_meta.tree)
    wanted = _flat_by_path(abstract_state)
    for name, leaf in wanted.items():
      if name not in saved:
        raise CheckpointMismatchError(f'{path}: leaf {name!r} is missing from the checkpoint')
      meta = saved[name]
      if not hasattr(meta, 'shape') or not hasattr(meta, 'dtype'):
        continue
      want_shape, want_dtype = _storage_shape_dtype(leaf)
      got_shape, got_dtype = tuple(meta.shape), np.dtype(meta.dtype)
      if (want_shape, want_dtype) != (got_shape, got_dtype):
        raise CheckpointMismatchError(
            f'{path}: leaf {name!r} is {got_dtype}{list(got_shape)} in the checkpoint '
            f'but {want_dtype}{list(want_shape)} in the restore target')
    unexpected = [name for name in saved if name not in wanted]
    if unexpected:
      raise CheckpointMismatchError(
          f'{path}: checkpoint leaf {unexpected[0]!r} has no place in the restore target '
          f'({len(unexpected)} such leaves)')

  def restore(self, step: int, abstract_state, *, data_iterator=None) -> tuple[Any, dict]:
    """Returns ``(state, extra)``; restores ``data_iterator`` in place if given.

    ``abstract_state`` is the state's pytree of ``jax.ShapeDtypeStruct``
    (``jax.eval_shape``); the result has the same pytree type.
    """
    self.wait_until_finished()
    if step not in self._mgr.all_steps():
      have = self.all_steps()
      what = f'steps present: {have}' if have else 'it holds no checkpoints'
      raise FileNotFoundError(f'{self.directory}: no checkpoint for step {step} ({what})')
    path = self.step_dir(step)
    if data_iterator is not None and not os.path.isdir(os.path.join(path, _DATA)):
      raise CheckpointError(f'{path}: step {step} was saved without a data iterator position')
    try:
      self._check_matches(step, abstract_state)
      items = {_STATE: ocp.args.StandardRestore(abstract_state), _EXTRA: ocp.args.JsonRestore()}
      if data_iterator is not None:
        items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
      restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
    except CheckpointError:
      raise
    except Exception as e:  # Orbax raises assorted types for damaged files.
      detail = (str(e).strip().splitlines() or [''])[0][:300]
      raise CheckpointError(f'{path}: cannot restore step {step} '
                            f'({type(e).__name__}: {detail})') from e
    return restored[_STATE], dict(restored[_EXTRA] or {})

  def restore_latest_good(self, abstract_state, data_iterator=None):
    """Restores the newest step that loads, skipping corrupt ones.

    Returns ``(step, state, extra)``, or None when there are no checkpoints.
    A tree/shape mismatch is raised at once (older steps would mismatch too);
    if every step is corrupt, the newest step's CheckpointError is raised.
    """
    steps = sorted(self._mgr.all_steps(), reverse=True)
    first_error = None
    for step in steps:
      try:
        state, extra = self.restore(step, abstract_state, data_iterator=data_iterator)
      except CheckpointMismatchError:
        raise
      except CheckpointError as e:
        log.warning('Skipping unreadable checkpoint: %s', e)
        first_error = first_error or e
        continue
      if step != steps[0]:
        log.warning('Restored older checkpoint step %d (newest %d was unreadable).', step, steps[0])
      return step, state, extra
    if first_error is not None:
      raise CheckpointError(f'{self.directory}: no readable checkpoint among steps '
                            f'{sorted(steps)}; newest error: {first_error}')
    return None

  # --------------------------------------------------------------- lifecycle
  def wait_until_finished(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
