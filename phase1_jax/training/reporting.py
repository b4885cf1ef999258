"""Run reporting: the only module that writes logs.

* TensorBoard events (tensorboardX) under ``<workdir>/tensorboard``.
* ``<workdir>/training_history.json``: a JSON list of per-epoch/eval records.
* Other JSON files under ``<workdir>`` (``write_json``), written atomically.
* The console: ``epoch_summary`` lines and ``progress_bar``.

tensorboardX pitfalls handled here (jax-stack-notes.md, section 6): event file
names have 1-second resolution, so every writer gets a unique
``filename_suffix``; a resumed run passes ``purge_step`` so TensorBoard drops the
stale events past the restart; ``SummaryWriter.flush()`` does not wait for
queued events, so ``Reporter.flush()`` closes the current event file instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

log = logging.getLogger(__name__)

HISTORY_FILE = 'training_history.json'
TENSORBOARD_DIR = 'tensorboard'

# Keys epoch_summary prints, in order, with their labels.
_SUMMARY_FIELDS = (
    ('train_loss', 'Train Loss'),
    ('val_loss', 'Val Loss'),
    ('element_f1', 'Element F1'),
    ('semantic_accuracy', 'Semantic Acc'),
    ('bleu', 'BLEU'),
)


def to_jsonable(obj: Any) -> Any:
  """Converts numpy/jax scalars and arrays (and tuples, paths) to plain JSON types.

  Non-finite floats (nan, inf) become None so the file stays standard JSON.
  """
  if obj is None or isinstance(obj, (str, bool)):
    return obj
  if isinstance(obj, int):
    return int(obj)
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
    array = np.asarray(obj)
    return to_jsonable(array.item() if array.ndim == 0 else array.tolist())
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  raise TypeError(f'cannot convert {type(obj).__name__} to JSON')


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` as JSON to a temp file, then renames it over ``path``."""
  atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + '\n')


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to a temp file, then renames it over ``path``: readers never see half."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _leaf_tag(path) -> str:
  """Pytree path -> 'layers/0/kernel' (a trailing nnx Variable '.value' is dropped)."""
  names = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]
  if len(names) > 1 and names[-1] == 'value':
    names = names[:-1]
  return '/'.join(names)


class Reporter:
  """Writes everything a run logs: TensorBoard (tensorboardX) under
  <workdir>/tensorboard, <workdir>/training_history.json, JSON files.
  Only the main process writes (is_main_process=False makes every method a no-op).

  ``start_step`` is the step training resumes from (0 for a fresh run): history
  records with a larger ``step`` and TensorBoard events after it are dropped,
  so a resumed run never logs a step twice.
  """

  def __init__(self,
               workdir: str | os.PathLike,
               *,
               start_step: int = 0,
               is_main_process: bool = True):
    self.workdir = os.fspath(workdir)
    self.start_step = int(start_step)
    self.enabled = bool(is_main_process)
    self.history_path = os.path.join(self.workdir, HISTORY_FILE)
    self.tensorboard_dir = os.path.join(self.workdir, TENSORBOARD_DIR)
    self._writer: SummaryWriter | None = None
    # Also from step 0: a run killed before its first checkpoint left events that the new run
    # repeats.
    self._purge_pending = self.enabled and (self.start_step > 0 or (
        os.path.isdir(self.tensorboard_dir) and bool(os.listdir(self.tensorboard_dir))))
    self._history: list[dict] = []
    if self.enabled:
      os.makedirs(self.tensorboard_dir, exist_ok=True)
      self._history = self._load_history()

  # -------------------------------------------------------------- history
  def _load_history(self) -> list[dict]:
    if not os.path.exists(self.history_path):
      return []
    try:
      with open(self.history_path, encoding='utf-8') as f:
        records = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f'{self.history_path}: cannot read training history ({e})') from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
      raise ValueError(f'{self.history_path}: expected a JSON list of record objects')
    kept = [
        r for r in records
        if not isinstance(r.get('step'), (int, float)) or r['step'] <= self.start_step
    ]
    if len(kept) != len(records):
      log.info('%s: dropped %d records after step %d (resumed run).', self.history_path,
               len(records) - len(kept), self.start_step)
      atomic_write_json(self.history_path, kept)
    return kept

  def history(self, record: dict) -> None:
    """Appends ``record`` to training_history.json (whole file rewritten atomically)."""
    if not self.enabled:
      return
    self._history.append(to_jsonable(record))
    atomic_write_json(self.history_path, self._history)

  def write_json(self, name: str, obj: Any) -> None:
    """Atomically writes ``obj`` to ``<workdir>/<name>`` (numpy/jax values converted)."""
    if not self.enabled:
      return
    if os.path.isabs(name) or '..' in name.replace('\\', '/').split('/'):
      raise ValueError(f'{name}: write_json needs a path relative to {self.workdir}')
    atomic_write_json(os.path.join(self.workdir, name), obj)

  # ---------------------------------------------------------- tensorboard
  def _tb(self) -> SummaryWriter:
    """The current event writer, opened on first use (each with a unique file)."""
    if self._writer is None:
      # TensorBoard drops events at steps >= purge_step; the restored step's own events were
      # written (and flushed) before its checkpoint, so only later ones are stale.
      purge = self.start_step + 1 if self._purge_pending else None
      self._purge_pending = False
      self._writer = SummaryWriter(self.tensorboard_dir,
                                   purge_step=purge,
                                   filename_suffix=f'.{os.getpid()}.{time.time_ns()}')
    return self._writer

  def scalars(self, step: int, values: dict[str, float], prefix: str = '') -> None:
    """One scalar per key, tagged ``prefix + key`` (e.g. prefix 'train/' -> 'train/loss')."""
    if not self.enabled:
      return
    writer = self._tb()
    for name, value in values.items():
      writer.add_scalar(f'{prefix}{name}', float(value), int(step))

  def histograms(self, step: int, params, prefix: str = 'params/') -> None:
    """One histogram per array leaf of ``params``, tagged by its pytree path."""
    if not self.enabled:
      return
    writer = self._tb()
    host_params = jax.device_get(params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(host_params)[0]:
      if not hasattr(leaf, 'dtype') or not np.issubdtype(leaf.dtype, np.number):
        continue  # PRNG keys, strings...
      values = np.asarray(leaf, np.float64).ravel()
      values = values[np.isfinite(values)]
      if values.size:
        writer.add_histogram(f'{prefix}{_leaf_tag(path)}', values, int(step))

  def flush(self) -> None:
    """Puts every logged event on disk before returning.

    tensorboardX's flush() does not wait for its queue, so the current event
    file is closed; the next write opens a new file (unique name, no purge).
    Call it before saving a checkpoint so a crash cannot lose older events.
    """
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def close(self) -> None:
    self.flush()

  def __enter__(self) -> 'Reporter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def epoch_summary(epoch: int, num_epochs: int, metrics: dict) -> str:
  """'Epoch 1/2  Train Loss: 3.4567  Val Loss: 3.2134  ...' (only keys present)."""
  parts = [f'Epoch {epoch}/{num_epochs}']
  for key, label in _SUMMARY_FIELDS:
    if metrics.get(key) is not None:
      parts.append(f'{label}: {float(metrics[key]):.4f}')
  return '  '.join(parts)


def progress_bar(total: int, *, desc: str, disable: bool = False) -> tqdm:
  """A tqdm bar for one epoch; pass disable=not is_main_process.

  Update it with a dynamic postfix (refresh=False avoids one redraw per call)::

    with progress_bar(steps_per_epoch, desc=f'Epoch {epoch}') as bar:
      for batch in batches:
        loss = train_step(batch)
        bar.set_postfix(loss=f'{float(loss):.4f}', refresh=False)
        bar.update(1)
  """
  return tqdm(total=total,
              desc=desc,
              disable=disable,
              dynamic_ncols=True,
              leave=False,
              mininterval=0.5)
