"""How a failed checkpoint operation is reported: the CheckpointError types, Orbax's and
tensorstore's messages cut to one line, and the filter that drops the background logs repeating
a failure the Checkpointer already raises (no Orbax import: it recognises them by file path)."""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback

# An uncommitted step: '<step>.orbax-checkpoint-tmp', some Orbax paths add '-<timestamp>'.
TMP_STEP_DIR = re.compile(r'\d+\.orbax-checkpoint-tmp(-\d+)?')


class CheckpointError(RuntimeError):
  """A checkpoint step exists but cannot be restored (corrupt or incompatible)."""


class CheckpointMismatchError(CheckpointError):
  """The saved state's tree, shapes or dtypes differ from the restore target."""


# tensorstore appends the spec of the array it failed to open (~1 kB of JSON) after the cause.
_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec='[^']*'\]")


def one_line(e: Exception, limit: int = 300) -> str:
  """'Type: first line' of an error, less tensorstore's spec, its middle elided past `limit`
  chars: tensorstore puts the cause (e.g. 'No space left on device') at the end of long
  messages."""
  text = _TENSORSTORE_SPEC.sub('', (str(e).strip().splitlines() or [''])[0])
  if len(text) > limit:
    text = f'{text[:limit // 2]} ... {text[-limit // 2:]}'
  return f'{type(e).__name__}: {text}'


class _QuietBackgroundFailures(logging.Filter):
  """Drops Orbax's ERROR logs (each with a traceback, one per background thread: ~500 lines for a
  full disk) and asyncio's "Task exception was never retrieved" for Orbax's aborted writes. Every
  such failure also reaches the main thread as an exception from an Orbax call, which the
  Checkpointer raises as one CheckpointError line; `dropped` counts them so a Checkpointer that
  raised none can still warn (one line) at close()."""

  def __init__(self):
    super().__init__()
    self.dropped, self.first_lines = 0, []

  @staticmethod
  def _from_orbax(record: logging.LogRecord) -> bool:
    """Logged by Orbax, or by asyncio about a task whose code or traceback is Orbax's, or a
    future whose error names an uncommitted Orbax step (tensorstore's write errors: "Future
    exception was never retrieved", no Python frames)."""
    orbax = f'{os.sep}orbax{os.sep}'
    if orbax in record.pathname:
      return True
    if record.name != 'asyncio':
      return False
    tb = record.exc_info[2] if record.exc_info else None
    files = [frame.filename for frame in traceback.extract_tb(tb)] if tb else []
    return any(orbax in text for text in [str(record.msg), *files]) or bool(
        TMP_STEP_DIR.search(str(record.msg)))

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or not self._from_orbax(record):
      return True
    self.dropped += 1
    if len(self.first_lines) < 100:
      self.first_lines.append((str(record.getMessage()).splitlines() or [''])[0][:300])
    return False


# One filter for the process: Checkpointers compare its `dropped` before and after their life.
QUIET = _QuietBackgroundFailures()


def _is_closed_loop_callback(unraisable) -> bool:
  """tensorstore's callbacks for writes still in flight when Orbax closed the event loop of a
  failed save: 'Event loop is closed' from asyncio's call_soon_threadsafe, reported as
  unraisable (a bare traceback each)."""
  tb = unraisable.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return (unraisable.exc_type is RuntimeError
          and str(unraisable.exc_value) == 'Event loop is closed'
          and tb is not None and tb.tb_frame.f_code.co_name == '_check_closed')


def quiet_background_failures() -> None:
  """Installs QUIET on the loggers Orbax and asyncio use, and an unraisable hook that drops
  closed-loop callbacks (everything else goes to the hook it wraps). Idempotent."""
  for name in ('absl', 'asyncio'):
    if QUIET not in logging.getLogger(name).filters:
      logging.getLogger(name).addFilter(QUIET)
  previous = sys.unraisablehook
  if getattr(previous, 'quiets_closed_loops', False):
    return

  def hook(unraisable):
    if not _is_closed_loop_callback(unraisable):
      previous(unraisable)
  hook.quiets_closed_loops = True
  sys.unraisablehook = hook
