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


def jit_generate(*, graphdef, settings: decoding.DecodeSettings, ids: decoding.TokenIds):
  """(params, features_BxPxF, feature_mask_BxP, rng) -> decoding.generate's dict, jitted (one
  while_loop with a KV cache, then one annotating forward pass)."""

  def fn(params, features, feature_mask, rng):
    model = nnx.merge(graphdef, params['model'])
    return decoding.generate(model, features, feature_mask, settings=settings, ids=ids, rng=rng)
  return jax.jit(fn)
