"""The one place where steps are compiled and placed on devices.

Single-program jit for now; data-parallel meshes and pmap come here too.
"""
from __future__ import annotations

import collections
import functools
import itertools

import jax
from flax import nnx

from phase1_jax import decoding
from phase1_jax.training import step as step_lib


def jit_train_step(*, graphdef, tx, loss_spec):
  """(state, batch) -> (state, metrics), jitted; the input state's buffers are donated."""
  fn = functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx, loss_spec=loss_spec)
  return jax.jit(fn, donate_argnums=0)


def jit_eval_step(*, graphdef, loss_spec):
  """(params, batch) -> metrics, jitted."""
  return jax.jit(functools.partial(step_lib.eval_step, graphdef=graphdef, loss_spec=loss_spec))


def jit_greedy_decode(*, graphdef, max_len: int, bos_id: int, eos_id: int, pad_id: int):
  """(params, features_BxPxF, feature_mask_BxP) -> tokens_BxT, jitted (KV-cached loop)."""

  def fn(params, features, feature_mask):
    model = nnx.merge(graphdef, params['model'])
    return decoding.greedy_decode(model, features, feature_mask, max_len=max_len, bos_id=bos_id,
                                  eos_id=eos_id, pad_id=pad_id)
  return jax.jit(fn)


def prefetch_to_device(batches, size: int = 2, sharding=None):
  """Yields the batches of `batches` as device arrays, `size` batches ahead of the consumer.

  `jax.device_put` only dispatches the copy, so the next batches travel to the device while the
  current step runs, and the step never waits on a host-to-device transfer. No thread: the
  iterator is advanced in the consumer's thread (grain reads ahead on its own workers). Note it
  reads `size` batches ahead of what has been yielded.
  """
  queue = collections.deque()

  def put(n):
    for batch in itertools.islice(batches, n):
      queue.append(jax.device_put(batch, sharding))

  put(size)
  while queue:
    yield queue.popleft()
    put(1)
