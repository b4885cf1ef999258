"""Files a run writes whole: JSON-safe values, atomic writes, and the one-line write error.

Every writer of the package goes through here, so a full disk or a file size limit is always
reported the same way: faults.WriterError naming the file, and the old file left as it was.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np

from phase1_jax.training import faults


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
