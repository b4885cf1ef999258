"""Run reporting: the only module family that writes logs.

* TensorBoard events under ``<workdir>/tensorboard`` (event_file.EventFile: tensorboardX's protos
  and summaries, written in the calling thread).
* The history: ``training_history.jsonl``, appended per record, and ``training_history.json``
  (history.History).
* Other JSON files under ``<workdir>`` (``write_json``), written atomically (files.py).
* The console: ``epoch_summary`` lines and ``progress_bar``.

A write that fails (full disk, file size limit) raises faults.WriterError naming the file from
the call that made it. A resumed run marks ``purge_step`` so TensorBoard drops the stale events
past the restart.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import numpy as np
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import histogram, image, scalar
from tqdm import tqdm

from phase1_jax.training import faults, history
from phase1_jax.training.event_file import HISTOGRAM_BINS, EventFile
from phase1_jax.training.files import (  # noqa: F401 - the package's writers import them from here
  atomic_write_json,
  atomic_write_text,
  cannot_write,
  to_jsonable,
)
from phase1_jax.training.history import (  # noqa: F401
  HISTORY_FILE,
  HISTORY_LOG,
  load_records,
  read_history,
  read_log,
)

log = logging.getLogger(__name__)

TENSORBOARD_DIR = 'tensorboard'

# Keys epoch_summary prints, in order, with their labels.
_SUMMARY_FIELDS = (
    ('train_loss', 'Train Loss'),
    ('val_loss', 'Val Loss'),
    ('element_f1', 'Element F1'),
    ('semantic_accuracy', 'Semantic Acc'),
    ('bleu', 'BLEU'),
)


def _leaf_tag(path) -> str:
  """Pytree path -> 'layers/0/kernel' (a trailing nnx Variable '.value' is dropped)."""
  names = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]
  if len(names) > 1 and names[-1] == 'value':
    names = names[:-1]
  return '/'.join(names)


class Reporter:
  """Writes everything a run logs: TensorBoard events under <workdir>/tensorboard, the
  history (history.History), JSON files.
  Only the main process writes (is_main_process=False makes every method a no-op).

  ``start_step`` is the step training resumes from (0 for a fresh run): history
  records with a larger ``step`` and TensorBoard events after it are dropped,
  so a resumed run never logs a step twice. ``append_only`` (a later evaluation of a finished
  run) drops nothing and writes TensorBoard events only: no history.

  A write that fails raises faults.WriterError (an OSError: one line naming the file) from the
  call that made it; what was written before stays. An unreadable history raises
  faults.WorkdirError and is left untouched (history.load_records).
  """

  def __init__(self,
               workdir: str | os.PathLike,
               *,
               start_step: int = 0,
               is_main_process: bool = True,
               append_only: bool = False):
    self.workdir = os.fspath(workdir)
    self.start_step = int(start_step)
    self.enabled = bool(is_main_process)
    self.append_only = append_only
    self.tensorboard_dir = os.path.join(self.workdir, TENSORBOARD_DIR)
    self._events: EventFile | None = None
    # Also from step 0: a run killed before its first checkpoint left events that the new run
    # repeats.
    self._purge_pending = self.enabled and not append_only and (self.start_step > 0 or (
        os.path.isdir(self.tensorboard_dir) and bool(os.listdir(self.tensorboard_dir))))
    self._history = None
    if self.enabled:
      if not append_only:
        self._history = history.History(self.workdir, self.start_step)
      try:
        os.makedirs(self.tensorboard_dir, exist_ok=True)
      except OSError as e:
        raise cannot_write(self.tensorboard_dir, e) from None

  # -------------------------------------------------------------- history
  def history(self, record: dict) -> None:
    """Appends ``record`` to the run's history (history.History: one line of
    training_history.jsonl)."""
    if self.append_only:
      raise ValueError('an append_only Reporter writes no training history')
    if self.enabled:
      self._history.append(record)

  def write_history(self) -> None:
    """Writes every record so far to training_history.json: at epoch ends, and at close."""
    if self._history is not None:
      self._history.write_json()

  def write_json(self, name: str, obj: Any) -> None:
    """Atomically writes ``obj`` to ``<workdir>/<name>`` (numpy/jax values converted)."""
    if not self.enabled:
      return
    if os.path.isabs(name) or '..' in name.replace('\\', '/').split('/'):
      raise ValueError(f'{name}: write_json needs a path relative to {self.workdir}')
    atomic_write_json(os.path.join(self.workdir, name), obj)

  # ---------------------------------------------------------- tensorboard
  def _write_events(self, step: int, summaries: list) -> None:
    """One event per summary at ``step``, in the current event file (opened on first use).
    After a failure the file is dropped: the next call starts a new one."""
    try:
      if self._events is None:
        # TensorBoard drops events at steps >= purge_step; the restored step's own events were
        # written (and flushed) before its checkpoint, so only later ones are stale.
        purge = self.start_step + 1 if self._purge_pending else None
        self._events = EventFile(self.tensorboard_dir, purge_step=purge)
        self._purge_pending = False
      now = time.time()
      self._events.write([Event(wall_time=now, step=int(step), summary=s) for s in summaries])
    except faults.WriterError:
      self._events = None
      raise

  def scalars(self, step: int, values: dict[str, float], prefix: str = '') -> None:
    """One scalar per key, tagged ``prefix + key`` (e.g. prefix 'train/' -> 'train/loss')."""
    if not self.enabled:
      return
    self._write_events(step, [scalar(f'{prefix}{name}', float(value))
                              for name, value in values.items()])

  def images(self, step: int, pictures: dict[str, np.ndarray], prefix: str = '') -> None:
    """One image per key (HxWx3 uint8), tagged ``prefix + key``."""
    if not self.enabled or not pictures:
      return
    self._write_events(step, [image(f'{prefix}{name}', np.asarray(picture, np.uint8),
                                    dataformats='HWC') for name, picture in pictures.items()])

  def histograms(self, step: int, params, prefix: str = 'params/') -> None:
    """One histogram per array leaf of ``params``, tagged by its pytree path."""
    if not self.enabled:
      return
    host_params = jax.device_get(params)
    summaries = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(host_params)[0]:
      if not hasattr(leaf, 'dtype') or not np.issubdtype(leaf.dtype, np.number):
        continue  # PRNG keys, strings...
      values = np.asarray(leaf, np.float64).ravel()
      values = values[np.isfinite(values)]
      if values.size:
        summaries.append(histogram(f'{prefix}{_leaf_tag(path)}', values, HISTOGRAM_BINS))
    self._write_events(step, summaries)

  def flush(self) -> None:
    """Puts every logged event and history record on disk (fsync) before returning. Call it
    before saving a checkpoint so a crash cannot lose what the checkpoint counts as done."""
    if self._history is not None:
      self._history.sync()
    if self._events is not None:
      try:
        self._events.flush()
      except faults.WriterError:
        self._events = None
        raise

  def close(self) -> None:
    """Writes training_history.json, flushes and closes the event file (a later call opens a
    new one)."""
    events, self._events = self._events, None
    try:
      self.write_history()
    finally:
      if events is not None:
        events.close()

  def abandon(self) -> None:
    """close() on an error path: a failure here is logged, not raised, so the error that
    stopped the run is the one reported."""
    try:
      self.close()
    except OSError as e:
      log.warning('%s', e)

  def __enter__(self) -> 'Reporter':
    return self

  def __exit__(self, *exc) -> None:
    if exc[0] is None:
      self.close()
    else:
      self.abandon()


def epoch_summary(epoch: int, num_epochs: int, metrics: dict) -> str:
  """'Epoch 1/2  Train Loss: 3.4567  Val Loss: 3.2134  ...' (only keys present)."""
  parts = [f'Epoch {epoch}/{num_epochs}']
  for key, label in _SUMMARY_FIELDS:
    if metrics.get(key) is not None:
      parts.append(f'{label}: {float(metrics[key]):.4f}')
  return '  '.join(parts)


def progress_bar(total: int, *, desc: str, disable: bool = False) -> tqdm:
  """A tqdm bar for one epoch on stderr; pass disable=not is_main_process. Shown only when stderr
  is a terminal (tqdm's disable=None): in a log or a pipe its carriage-return redraws would glue
  the next line (an `error: ...`) onto the bar's residue; the epoch summary lines are on stdout.

  Update it with a dynamic postfix (refresh=False avoids one redraw per call)::

    with progress_bar(steps_per_epoch, desc=f'Epoch {epoch}') as bar:
      for batch in batches:
        loss = train_step(batch)
        bar.set_postfix(loss=f'{float(loss):.4f}', refresh=False)
        bar.update(1)
  """
  return tqdm(total=total,
              desc=desc,
              disable=True if disable else None,
              dynamic_ncols=True,
              leave=False,
              mininterval=0.5)
