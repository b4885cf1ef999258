"""Recovering from damaged checkpoint steps: the partial saves a kill left behind, the fallback
to the newest step that restores, and setting aside the unreadable steps newer than it. Works
on step directories and a restore function; Orbax stays in checkpoint.py."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from phase1_jax.training.checkpoint_errors import (
    TMP_STEP_DIR,
    CheckpointError,
    CheckpointMismatchError,
)

# Logs under checkpoint.py's logger: one name controls what the checkpoint modules log.
log = logging.getLogger('phase1_jax.training.checkpoint')


def remove_partial_saves(directory: str) -> None:
  """Deletes step directories a kill left uncommitted (``<step>.orbax-checkpoint-tmp``).

  Orbax ignores them, but removes them only at the next save (cleanup_tmp_directories), so a
  run killed again before saving would pile them up.
  """
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if TMP_STEP_DIR.fullmatch(name):
      log.warning('Removing uncommitted checkpoint %s', os.path.join(directory, name))
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def newest_readable(directory: str, steps: Sequence[int],
                    restore: Callable[[int], tuple[Any, dict]]):
  """``(step, state, extra)`` of the newest of `steps` (newest first) that `restore` reads,
  skipping CheckpointErrors; None when there are no steps.

  A CheckpointMismatchError is raised at once (older steps would mismatch too). If every step
  fails, one CheckpointError names the steps and the newest one's error; the skipped steps are
  logged only when an older one restores.
  """
  errors = []   # logged once a step restores; otherwise the one error raised says it all
  for step in steps:
    try:
      state, extra = restore(step)
    except CheckpointMismatchError:
      raise
    except CheckpointError as e:
      errors.append(e)
      continue
    for error in errors:
      log.warning('Skipping unreadable checkpoint: %s', error)
    if step != steps[0]:
      log.warning('Restored older checkpoint step %d (newest %d was unreadable).', step, steps[0])
    return step, state, extra
  if errors:
    raise CheckpointError(f'{directory}: no readable checkpoint among steps '
                          f'{sorted(steps)}; newest error: {errors[0]}')
  return None


def set_aside(directory: str, steps: Sequence[int]) -> None:
  """Renames each step's directory to ``<step>.unreadable`` (kept for inspection; process 0
  only): the resumed run saves those steps again, and Orbax refuses a step that exists, or
  could pick a corrupt one as "best". The caller reloads its manager afterwards."""
  if jax.process_index() != 0:
    return
  for step in steps:
    source = os.path.join(directory, str(step))
    target = f'{source}.unreadable'
    if os.path.exists(target):
      target = f'{target}.{time.time_ns()}'
    os.rename(source, target)
    log.warning('Moved unreadable checkpoint step %d to %s', step, target)
