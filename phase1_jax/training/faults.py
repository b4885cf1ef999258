"""What the training loop does when something goes wrong: stop signals, non-finite steps, an
unusable workdir, a log file that cannot be written. The loop (loop.py) decides when to check;
this module holds the mechanisms."""
from __future__ import annotations

import contextlib
import os
import signal
import threading

# Exit status of a run stopped by SIGTERM/SIGINT after saving its checkpoint: EX_TEMPFAIL
# ("temporary failure, try again"), so a scheduler can tell "resubmit me" from success (0),
# errors (1) and an outright kill (128 + signal number, e.g. 137 for SIGKILL).
PREEMPTED_EXIT_CODE = 75
# A second SIGINT stops without saving: 128 + SIGINT, as a shell reports a process Ctrl-C ended.
INTERRUPTED_EXIT_CODE = 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped on a signal after its checkpoint at `step` was committed."""

  def __init__(self, signal_name: str, step: int, directory: str):
    super().__init__(f'{signal_name}: stopped after step {step}; checkpoint saved in {directory}. '
                     'Run the same command again to resume.')
    self.signal_name, self.step, self.directory = signal_name, step, directory


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class WorkdirError(OSError):
  """The workdir cannot be used: it cannot be created or written, or a file the run resumes from
  (training_history.json) is unreadable. The message names the path."""


class WriterError(OSError):
  """A log or results file (TensorBoard events, training_history.json, ...) could not be written:
  a full disk, a file size limit. Raised by the call that wrote, never left in a background
  thread; the message names the file and the reason."""


class StopSignals:
  """While active, SIGTERM and SIGINT set `requested` (the signal's name) instead of killing the
  process, so the loop can finish its step and save. A second SIGINT raises KeyboardInterrupt at
  once (a user pressing Ctrl-C twice means it), except inside `saving()`: a checkpoint being
  written is finished first (the loop then stops as for the first signal), and only a third SIGINT
  abandons it. Only the main thread can own signal handlers; elsewhere (a thread running
  training) this is inert.
  """

  def __init__(self, signals=STOP_SIGNALS):
    self.signals = tuple(signals)
    self.requested: str | None = None
    self._previous = {}
    self._saving = 0          # depth of saving() blocks
    self._deferred = False    # a second SIGINT arrived during a save

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      if self._saving and not self._deferred:
        self._deferred = True
        return
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name

  @contextlib.contextmanager
  def saving(self):
    """Marks a checkpoint save (until its commit): a second SIGINT here does not interrupt it."""
    self._saving += 1
    try:
      yield
    finally:
      self._saving -= 1

  def __enter__(self) -> 'StopSignals':
    if threading.current_thread() is threading.main_thread():
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()


class NonFiniteCounter:
  """Counts skipped (non-finite) steps; raises NonFiniteError at `limit` in a row."""

  def __init__(self, limit: int, consecutive: int = 0, total: int = 0):
    self.limit, self.consecutive, self.total = limit, consecutive, total

  def update(self, step: int, nonfinite: bool) -> None:
    if not nonfinite:
      self.consecutive = 0
      return
    self.consecutive += 1
    self.total += 1
    if self.consecutive >= self.limit:
      raise NonFiniteError(
          f'step {step}: {self.consecutive} consecutive steps had a non-finite loss or gradient '
          f'(train.max_consecutive_nonfinite={self.limit}); stopped, the last checkpoint is kept. '
          'Lower train.learning_rate or check the data.')

  def state(self) -> dict:
    return {'consecutive': self.consecutive, 'total': self.total}


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and proves it writable, so a bad path fails before any compile."""
  probe = os.path.join(workdir, f'.write_test.{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'{workdir}: workdir is not writable ({e.strerror or e})') from None
