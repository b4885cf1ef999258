"""The one place where steps are compiled and placed on devices.

Single-program jit for now; data-parallel meshes and pmap come here too.
"""
from __future__ import annotations

import functools

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
