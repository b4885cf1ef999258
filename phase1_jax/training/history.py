"""The run's history: every train-log and epoch record, kept in two files.

``training_history.jsonl`` gets one line per record as it comes (O(1) per record; a write that
fails is cut back to whole lines); ``training_history.json``, the same records as one JSON list
(the PyTorch original's layout), is rewritten from them at epoch ends and when the run stops. A
resumed run drops the records after its checkpoint's step, and a last line a kill cut short.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

from phase1_jax.training import faults
from phase1_jax.training.files import (
  atomic_write_json,
  atomic_write_text,
  cannot_write,
  to_jsonable,
)

log = logging.getLogger(__name__)

HISTORY_FILE = 'training_history.json'
HISTORY_LOG = 'training_history.jsonl'


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


class History:
  """The records of the run in `workdir` up to `start_step` (later ones, logged after the
  checkpoint resumed from, are dropped from both files), and the appends after them."""

  def __init__(self, workdir: str, start_step: int):
    self.json_path = os.path.join(workdir, HISTORY_FILE)
    self.log_path = os.path.join(workdir, HISTORY_LOG)
    records = load_records(workdir)
    self.records = [r for r in records
                    if not isinstance(r.get('step'), (int, float)) or r['step'] <= start_step]
    if len(self.records) != len(records):
      log.info('%s: dropped %d records after step %d (resumed run).', self.log_path,
               len(records) - len(self.records), start_step)
      atomic_write_json(self.json_path, self.records)
    if self.records or os.path.exists(self.log_path):   # whole lines, none after start_step
      atomic_write_text(self.log_path, ''.join(json.dumps(r) + '\n' for r in self.records))

  def append(self, record: dict) -> None:
    """One line in the log; a record whose write failed is cut off again and not kept."""
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
    self.records.append(record)

  def write_json(self) -> None:
    """Every record so far into training_history.json (atomically), once there is one."""
    if self.records or os.path.exists(self.json_path):
      atomic_write_json(self.json_path, self.records)

  def sync(self) -> None:
    """The log on disk (fsync), e.g. before a checkpoint counts its records as done."""
    if not os.path.exists(self.log_path):
      return
    try:
      fd = os.open(self.log_path, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    except OSError as e:
      raise cannot_write(self.log_path, e) from None
