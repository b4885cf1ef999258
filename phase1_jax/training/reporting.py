"""Run reporting: the only module that writes logs.

* TensorBoard events under ``<workdir>/tensorboard`` (tensorboardX's protos and summaries).
* ``<workdir>/training_history.jsonl``: the run's records, one JSON object per line, appended as
  they come (O(1) per record); ``training_history.json``, the same records as one JSON list (the
  PyTorch original's layout), is rewritten from them at epoch ends and when the run stops.
* Other JSON files under ``<workdir>`` (``write_json``), written atomically.
* The console: ``epoch_summary`` lines and ``progress_bar``.

Every write happens in the calling thread and a failed one (full disk, file size limit) raises
faults.WriterError naming the file: tensorboardX's SummaryWriter writes from a background thread
through a bounded queue, and when that thread dies on a write error the error is only printed
and the next put blocks the trainer forever. Its other pitfalls:
event file names have 1-second resolution, so every file gets a unique suffix; a resumed run
marks ``purge_step`` so TensorBoard drops the stale events past the restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import struct
import time
from typing import Any

import jax
import numpy as np
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c
from tensorboardX.summary import histogram, image, scalar
from tqdm import tqdm

from phase1_jax.training import faults

log = logging.getLogger(__name__)

HISTORY_FILE = 'training_history.json'
HISTORY_LOG = 'training_history.jsonl'
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


def cannot_write(path: str, error: OSError, what: str = '') -> faults.WriterError:
  """The one-line error for a failed write: the file and the reason ('File too large')."""
  return faults.WriterError(f'{path}: cannot write{what} ({error.strerror or error})')


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` as JSON to a temp file, then renames it over ``path``."""
  atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + '\n')


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to a temp file, then renames it over ``path``: readers never see half. A
  failure (full disk...) raises faults.WriterError naming ``path`` and leaves the old file."""
  path = os.fspath(path)
  tmp = f'{path}.tmp.{os.getpid()}'
  try:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    raise cannot_write(path, e) from None
  finally:
    _remove_quietly(tmp)


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def read_history(path: str) -> list[dict]:
  """The records of a training_history.json ([] if there is none). An unreadable file raises
  faults.WorkdirError (one line naming it) and is left untouched: its records are not silently
  dropped, the user decides (repair it, or move it aside to resume without them)."""
  if not os.path.exists(path):
    return []
  problem = None
  try:
    with open(path, encoding='utf-8') as f:
      records = json.load(f)
  except OSError as e:
    problem = e.strerror or str(e)
  except ValueError as e:   # bad JSON, bad UTF-8
    problem = f'not valid JSON: {e}'
  else:
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
      problem = 'expected a JSON list of record objects'
  if problem:
    raise _unreadable(path, problem) from None
  return records


def read_log(path: str) -> list[dict]:
  """The records of a training_history.jsonl ([] if there is none). A last line without its
  newline was cut by a kill while being written: it is dropped (its step is past every
  checkpoint). Any other unreadable line raises faults.WorkdirError, as read_history."""
  if not os.path.exists(path):
    return []
  try:
    with open(path, 'rb') as f:
      lines = f.read().split(b'\n')
  except OSError as e:
    raise _unreadable(path, e.strerror or str(e)) from None
  records = []
  for number, line in enumerate(lines[:-1], start=1):   # lines[-1]: b'' or the cut line
    try:
      record = json.loads(line)
    except ValueError as e:
      raise _unreadable(path, f'line {number} is not valid JSON: {e}') from None
    if not isinstance(record, dict):
      raise _unreadable(path, f'line {number} is not a record object')
    records.append(record)
  if lines[-1]:
    log.info('%s: dropped its last line, cut short when the run was killed.', path)
  return records


def load_records(workdir: str) -> list[dict]:
  """The history of the run in `workdir`: its training_history.jsonl, or, for a run that has
  none, its training_history.json."""
  log_path = os.path.join(workdir, HISTORY_LOG)
  if os.path.exists(log_path):
    return read_log(log_path)
  return read_history(os.path.join(workdir, HISTORY_FILE))


def _unreadable(path: str, problem: str) -> faults.WorkdirError:
  return faults.WorkdirError(
      f'{path}: cannot read the training history ({problem}); the checkpoints are intact: '
      f'repair the file, or move it aside (e.g. to {os.path.basename(path)}.corrupt) to resume '
      'without its records')


def _histogram_bins() -> list[float]:
  """SummaryWriter's default ('tensorflow') histogram bucket limits: +-1e-12 * 1.1**k to 1e20."""
  v, buckets = 1e-12, []
  while v < 1e20:
    buckets.append(v)
    v *= 1.1
  return [-b for b in reversed(buckets)] + [0] + buckets


_HISTOGRAM_BINS = _histogram_bins()


def _record(data: bytes) -> bytes:
  """One TFRecord: [length u64][masked crc of length][data][masked crc of data], little-endian."""
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', masked_crc32c(header)) + data +
          struct.pack('<I', masked_crc32c(data)))


class EventFile:
  """One TensorBoard event file, written synchronously: a write error raises WriterError at the
  call that made it (no writer thread to die unseen). The file keeps whole calls only: after a
  failure it is cut back to the end of the last successful ``write``, so TensorBoard reads it to
  its end. A file is named like tensorboardX's, plus '.<pid>.<ns>' so names never collide.
  """

  def __init__(self, directory: str, *, purge_step: int | None = None):
    self.path = os.path.join(directory, f'events.out.tfevents.{int(time.time())}.'
                             f'{socket.gethostname()}.{os.getpid()}.{time.time_ns()}')
    self._size = 0   # bytes of the whole records written so far
    try:
      self._file = open(self.path, 'wb')
    except OSError as e:
      raise cannot_write(self.path, e, ' TensorBoard events') from None
    events = [Event(wall_time=time.time(), file_version='brain.Event:2')]
    if purge_step is not None:   # what SummaryWriter(purge_step=...) writes
      events += [Event(wall_time=time.time(), step=purge_step, file_version='brain.Event:2'),
                 Event(wall_time=time.time(), step=purge_step,
                       session_log=SessionLog(status=SessionLog.START))]
    self.write(events)

  def write(self, events: list[Event]) -> None:
    """Appends ``events`` and hands them to the OS (no fsync: see flush)."""
    data = b''.join(_record(e.SerializeToString()) for e in events)
    try:
      self._file.write(data)
      self._file.flush()
    except OSError as e:
      self._fail(e)
    self._size += len(data)

  def flush(self) -> None:
    """Puts everything written on disk (fsync) before returning."""
    try:
      self._file.flush()
      os.fsync(self._file.fileno())
    except OSError as e:
      self._fail(e)

  def close(self) -> None:
    self.flush()
    self._file.close()

  def _fail(self, error: OSError):
    """Closes the file, cuts off a partly written call, raises WriterError naming the file."""
    try:
      self._file.close()   # may retry the buffered bytes; the truncation removes them
    except OSError:
      pass
    try:
      os.truncate(self.path, self._size)
    except OSError:
      pass
    raise cannot_write(self.path, error, ' TensorBoard events') from None


def _leaf_tag(path) -> str:
  """Pytree path -> 'layers/0/kernel' (a trailing nnx Variable '.value' is dropped)."""
  names = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]
  if len(names) > 1 and names[-1] == 'value':
    names = names[:-1]
  return '/'.join(names)


class Reporter:
  """Writes everything a run logs: TensorBoard events under <workdir>/tensorboard,
  <workdir>/training_history.json, JSON files.
  Only the main process writes (is_main_process=False makes every method a no-op).

  ``start_step`` is the step training resumes from (0 for a fresh run): history
  records with a larger ``step`` and TensorBoard events after it are dropped,
  so a resumed run never logs a step twice. ``append_only`` (a later evaluation of a finished
  run) drops nothing and writes TensorBoard events only: no history.

  A write that fails raises faults.WriterError (an OSError: one line naming the file) from the
  call that made it; what was written before stays. An unreadable training_history.json raises
  faults.WorkdirError and is left untouched (read_history).
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
    self.history_path = os.path.join(self.workdir, HISTORY_FILE)
    self.log_path = os.path.join(self.workdir, HISTORY_LOG)
    self.tensorboard_dir = os.path.join(self.workdir, TENSORBOARD_DIR)
    self._events: EventFile | None = None
    # Also from step 0: a run killed before its first checkpoint left events that the new run
    # repeats.
    self._purge_pending = self.enabled and not append_only and (self.start_step > 0 or (
        os.path.isdir(self.tensorboard_dir) and bool(os.listdir(self.tensorboard_dir))))
    self._history: list[dict] = []
    if self.enabled:
      if not append_only:
        self._history = self._load_history()
      try:
        os.makedirs(self.tensorboard_dir, exist_ok=True)
      except OSError as e:
        raise cannot_write(self.tensorboard_dir, e) from None

  # -------------------------------------------------------------- history
  def _load_history(self) -> list[dict]:
    """The records up to start_step; later ones (logged after the checkpoint resumed from) are
    dropped from both files too, as is a line a kill cut short. A run with only a
    training_history.json gets its log here."""
    records = load_records(self.workdir)
    kept = [
        r for r in records
        if not isinstance(r.get('step'), (int, float)) or r['step'] <= self.start_step
    ]
    if len(kept) != len(records):
      log.info('%s: dropped %d records after step %d (resumed run).', self.log_path,
               len(records) - len(kept), self.start_step)
      atomic_write_json(self.history_path, kept)
    if kept or os.path.exists(self.log_path):   # once per start: whole lines, none after start_step
      atomic_write_text(self.log_path, ''.join(json.dumps(r) + '\n' for r in kept))
    return kept

  def history(self, record: dict) -> None:
    """Appends ``record`` to training_history.jsonl (one line; a record whose write failed is
    cut off again and not kept). write_history() puts the records into training_history.json."""
    if self.append_only:
      raise ValueError('an append_only Reporter writes no training history')
    if not self.enabled:
      return
    record = to_jsonable(record)
    line = (json.dumps(record) + '\n').encode('utf-8')
    try:
      fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
      raise cannot_write(self.log_path, e) from None
    try:
      size = os.fstat(fd).st_size
      try:
        written = 0
        while written < len(line):
          written += os.write(fd, line[written:])
      except OSError as e:
        with contextlib.suppress(OSError):
          os.ftruncate(fd, size)   # whole lines only
        raise cannot_write(self.log_path, e) from None
    finally:
      os.close(fd)
    self._history.append(record)

  def write_history(self) -> None:
    """Writes every record so far to training_history.json (atomically): at epoch ends, and
    when the reporter closes."""
    if self.enabled and not self.append_only and (
        self._history or os.path.exists(self.history_path)):
      atomic_write_json(self.history_path, self._history)

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
        summaries.append(histogram(f'{prefix}{_leaf_tag(path)}', values, _HISTOGRAM_BINS))
    self._write_events(step, summaries)

  def flush(self) -> None:
    """Puts every logged event and history record on disk (fsync) before returning. Call it
    before saving a checkpoint so a crash cannot lose what the checkpoint counts as done."""
    if self.enabled and os.path.exists(self.log_path):
      try:
        fd = os.open(self.log_path, os.O_RDONLY)
        try:
          os.fsync(fd)
        finally:
          os.close(fd)
      except OSError as e:
        raise cannot_write(self.log_path, e) from None
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
