"""Host arrays onto a mesh as global arrays, on one process or several (parallel.py's helpers)."""
from __future__ import annotations

import jax
import numpy as np


def replicate(x, replicated: jax.sharding.Sharding, process_count: int):
  """An array (a PRNG key too) copied onto every device of the mesh."""
  if process_count == 1 or not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return to_global(x, replicated, process_count)
  # Several processes: device_put refuses a key for devices of other processes; its raw data
  # (the same on every process) becomes a global array and is wrapped again.
  return jax.random.wrap_key_data(to_global(jax.random.key_data(x), replicated, process_count),
                                  impl=jax.random.key_impl(x))


def to_global(tree, shardings, process_count: int):
  """A tree (host arrays, or device arrays) as global arrays with `shardings` (a tree, or one
  for all leaves); arrays already so placed are kept. On several processes every process
  holds the whole of each host array (each reads every eval batch; eval_params gathers)."""
  if process_count == 1:
    return jax.device_put(tree, shardings)
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def one(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, tree, shardings)
