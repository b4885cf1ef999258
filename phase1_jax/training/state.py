"""TrainState (params + optimizer state + step + RNG) and the optimizer, built from specs."""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from phase1_jax.losses import TASKS
from phase1_jax.model.phase1 import Phase1Decoder
from phase1_jax.model.spec import ModelSpec


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes; a pytree of arrays (checkpointed whole).

  step: micro-batches consumed (int32). params: {'model': nnx.State of the decoder's Params,
  'loss_log_vars': float32[4] (uncertainty weighting; unused with fixed weights)}.
  rng: raw uint32 key data; the dropout key of step s is fold_in(rng, s), so a resumed run
  draws the same masks as an uninterrupted one.
  """
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


def _decay_mask(params):
  """Weight decay on matrices (kernels, embeddings) only: not on biases, norms, loss weights."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """AdamW with global-norm clipping on a warmup-cosine schedule (config.train's fields)."""
  learning_rate: float
  num_epochs: int
  warmup_steps: int = 0
  end_learning_rate_ratio: float = 0.1
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  grad_clip_norm: float = 1.0
  accumulate_grad_batches: int = 1


def make_optimizer(spec: OptimizerSpec, steps_per_epoch: int):
  """(tx, schedule): clip -> AdamW on a warmup-cosine schedule, accumulated over
  `accumulate_grad_batches` micro-batches. The schedule counts optimizer updates."""
  total = max(1, steps_per_epoch * spec.num_epochs // spec.accumulate_grad_batches)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=spec.learning_rate, warmup_steps=min(spec.warmup_steps, total - 1),
      decay_steps=total, end_value=spec.learning_rate * spec.end_learning_rate_ratio)
  tx = optax.chain(
      optax.clip_by_global_norm(spec.grad_clip_norm),
      optax.adamw(schedule, b1=spec.adam_b1, b2=spec.adam_b2, weight_decay=spec.weight_decay,
                  mask=_decay_mask))
  if spec.accumulate_grad_batches > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=spec.accumulate_grad_batches)
  return tx, schedule


def create_train_state(model: ModelSpec, tx, *, seed: int,
                       abstract: bool = False) -> tuple[nnx.GraphDef, TrainState]:
  """A fresh state of the model `model` describes, from `seed`. Returns the model's graphdef
  (static) and the state.

  With `abstract`, the state's shapes and dtypes only (jax.ShapeDtypeStruct leaves): nothing is
  initialized or allocated. A run that resumes, or an evaluation, needs only that (the restore
  target), and a concrete fresh state would hold a second copy of the parameters and moments in
  device memory while the checkpoint's are read.
  """
  def fresh():
    graphdef, model_params = nnx.split(Phase1Decoder(model, rngs=nnx.Rngs(seed)), nnx.Param)
    params = {'model': model_params, 'loss_log_vars': jnp.zeros((len(TASKS),), jnp.float32)}
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return graphdef, TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                                rng=rng)

  # A GraphDef is a pytree without leaves: eval_shape hands it back as it is.
  return jax.eval_shape(fresh) if abstract else fresh()


def abstract_train_state(model: ModelSpec, tx, *, seed: int = 0) -> TrainState:
  """Shapes and dtypes of the state, without allocating it (the restore target)."""
  return create_train_state(model, tx, seed=seed, abstract=True)[1]
