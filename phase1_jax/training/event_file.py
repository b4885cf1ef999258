"""TensorBoard event files written synchronously, with tensorboardX's protos.

tensorboardX's SummaryWriter writes from a background thread through a bounded queue; when that
thread dies on a write error (full disk, file size limit) the error is only printed and the next
put blocks the trainer forever. EventFile writes in the calling thread instead and raises
faults.WriterError at the call that failed.
"""
from __future__ import annotations

import os
import socket
import struct
import time

from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c

from phase1_jax.training.files import cannot_write


def _histogram_bins() -> list[float]:
  """SummaryWriter's default ('tensorflow') histogram bucket limits: +-1e-12 * 1.1**k to 1e20."""
  v, buckets = 1e-12, []
  while v < 1e20:
    buckets.append(v)
    v *= 1.1
  return [-b for b in reversed(buckets)] + [0] + buckets


HISTOGRAM_BINS = _histogram_bins()


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
