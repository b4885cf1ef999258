"""Checkpoint checksums: the record kept in a step's ``extra`` under CHECKSUMS_KEY (a digest of
every state array and of the rest of ``extra``, see checkpoint_compat), written at save and
checked at restore. Orbax's array files carry no checksum, so altered bytes would otherwise
restore silently; a difference is a CheckpointError, which restore_latest_good skips like an
unreadable step. No Orbax here: checkpoint.py reads the step and hands over what it read."""

from __future__ import annotations

import logging

from phase1_jax.training import checkpoint_compat as compat
from phase1_jax.training.checkpoint_errors import CheckpointError

# Logs under checkpoint.py's logger: one name controls what the checkpoint modules log.
log = logging.getLogger('phase1_jax.training.checkpoint')

# The checksums are saved in `extra` under this key (restore removes it).
CHECKSUMS_KEY = 'checksums'


class Checksums:
  """Writes and verifies the checksums record of one Checkpointer's steps; disabled
  (`enabled=False`, for measuring their cost) it neither writes nor verifies."""

  def __init__(self, enabled: bool):
    self.enabled = enabled
    self._warned_unverified = False

  def add(self, state, extra: dict) -> dict:
    """A copy of `extra` with the checksums of `state` (as this process holds it now: what the
    save will commit) and of `extra` itself under CHECKSUMS_KEY."""
    extra = dict(extra)
    if CHECKSUMS_KEY in extra:
      raise ValueError(f'extra[{CHECKSUMS_KEY!r}] is reserved for the checkpoint\'s checksums')
    if self.enabled:
      algorithm = compat.DIGEST_ALGORITHM
      extra[CHECKSUMS_KEY] = {'algorithm': algorithm,
                              'state': compat.tree_digests(state, algorithm),
                              'extra': compat.json_digest(extra, algorithm)}
    return extra

  def take(self, extra: dict, path: str, step: int) -> dict | None:
    """Removes the record from a restored `extra` and returns it: None when disabled or for a
    step saved without one (before checksummed checkpoints, or disabled), which restores
    unverified with one warning per Checkpointer. A malformed record is a CheckpointError."""
    sums = extra.pop(CHECKSUMS_KEY, None)
    if not self.enabled:
      return None
    if sums is None and not self._warned_unverified:
      self._warned_unverified = True
      log.warning('%s: saved without checksums (an older version); its data is not verified',
                  path)
    if sums is not None and not (isinstance(sums, dict) and isinstance(sums.get('state'), dict)
                                 and compat.known_algorithm(sums.get('algorithm'))):
      raise CheckpointError(f'{path}: step {step} has a malformed checksums record')
    return sums

  @staticmethod
  def check_extra(sums: dict | None, extra: dict, path: str, step: int) -> None:
    """Raises CheckpointError when the restored `extra` (record removed) differs from its
    digest; checked before the config in it is trusted."""
    want = (sums or {}).get('extra')
    if want is not None and compat.json_digest(extra, sums['algorithm']) != want:
      raise _corrupt(path, step, 'the extra JSON differs from the saved data')

  @staticmethod
  def check_state(sums: dict | None, state, path: str, step: int) -> None:
    """Raises CheckpointError naming the step and the first leaf whose restored data differs
    from its checksum."""
    problem = sums and compat.digest_mismatch(sums['state'], state, sums['algorithm'])
    if problem:
      raise _corrupt(path, step, problem)


def _corrupt(path: str, step: int, problem: str) -> CheckpointError:
  return CheckpointError(f'{path}: step {step} fails its checksum: {problem} (corrupt or altered)')
