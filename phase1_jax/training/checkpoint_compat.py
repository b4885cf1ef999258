"""Is a saved checkpoint usable by this run? Pure comparisons of a saved state tree (Orbax
metadata) and a saved config against what the run needs; checkpoint.py reads the metadata and
raises. Each function returns a one-line description of the first difference, or None."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

_MISSING = object()


def _key_name(key) -> str:
  """One pytree path entry as a plain string ('params', '0', 'kernel'...)."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_by_path(tree) -> dict[str, Any]:
  """{'params/layers/0/kernel/value': leaf, ...}; None leaves are skipped."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _storage_shape_dtype(leaf) -> tuple[tuple[int, ...], np.dtype]:
  """Shape/dtype as stored on disk (typed PRNG keys are stored as key data)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
  return tuple(leaf.shape), np.dtype(leaf.dtype)


def tree_mismatch(saved_tree, abstract_state) -> str | None:
  """The first leaf whose place, shape or dtype differs between the saved metadata tree and the
  restore target (a pytree of jax.ShapeDtypeStruct)."""
  saved = _flat_by_path(saved_tree)
  wanted = _flat_by_path(abstract_state)
  for name, leaf in wanted.items():
    if name not in saved:
      return f'leaf {name!r} is missing from the checkpoint'
    meta = saved[name]
    if not hasattr(meta, 'shape') or not hasattr(meta, 'dtype'):
      continue
    want_shape, want_dtype = _storage_shape_dtype(leaf)
    got_shape, got_dtype = tuple(meta.shape), np.dtype(meta.dtype)
    if (want_shape, want_dtype) != (got_shape, got_dtype):
      return (f'leaf {name!r} is {got_dtype}{list(got_shape)} in the checkpoint '
              f'but {want_dtype}{list(want_shape)} in the restore target')
  unexpected = [name for name in saved if name not in wanted]
  if unexpected:
    return (f'checkpoint leaf {unexpected[0]!r} has no place in the restore target '
            f'({len(unexpected)} such leaves)')
  return None


def config_mismatch(saved_config, expect: dict[str, Any]) -> str | None:
  """The first dotted field of `expect` ({'model.d_model': 32}) whose value differs in the saved
  config (a nested dict). Fields the saved config lacks, and checkpoints saved without a config,
  are not compared."""
  if not isinstance(saved_config, dict):
    return None
  for path, want in expect.items():
    node = saved_config
    for part in path.split('.'):
      node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
    if node is not _MISSING and node != want:
      return f'checkpoint was trained with {path}={node!r} but the config has {path}={want!r}'
  return None
