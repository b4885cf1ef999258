"""Pure train and eval steps, functions of (state, batch); parallel.py wraps them (jit/pmap)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from phase1_jax import losses
from phase1_jax.data import vocab
from phase1_jax.training.state import TrainState

MODEL_INPUTS = ('features', 'feature_mask', 'inputs')


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """The static part of the loss: weighting kind, fixed weights, element open-tag token ids."""
  weighting: str
  weights: tuple[tuple[str, float], ...]   # ((task, weight), ...)
  element_token_ids: tuple[int, ...]
  vocab_chunk_size: int = 0   # > 0: detail CE over vocabulary chunks, no full logits in training

  @classmethod
  def from_config(cls, config) -> 'LossSpec':
    weights = tuple((task, config.loss[f'{task}_weight']) for task in losses.TASKS)
    return cls(config.loss.weighting, weights, vocab.ELEMENT_OPEN_TAG_IDS,
               config.loss.get('vocab_chunk_size', 0))

  def __call__(self, outputs, batch, log_vars_4):
    return losses.multitask_loss(
        outputs, batch, element_token_ids_E=jnp.asarray(self.element_token_ids),
        weighting=self.weighting, weights=dict(self.weights), log_vars_4=log_vars_4,
        vocab_chunk_size=self.vocab_chunk_size)


def forward(graphdef, model_params, batch, dropout_key=None, *, detail_logits: bool = True):
  model = nnx.merge(graphdef, model_params)
  return model(*(batch[k] for k in MODEL_INPUTS), dropout_key=dropout_key,
               detail_logits=detail_logits)


def train_step(state: TrainState, batch, *, graphdef, tx, loss_spec: LossSpec):
  """One micro-batch: forward, loss, backward, optimizer update. Returns (state, metrics)."""
  dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params):
    outputs = forward(graphdef, params['model'], batch, dropout_key,
                      detail_logits=loss_spec.vocab_chunk_size == 0)
    return loss_spec(outputs, batch, params['loss_log_vars'])

  (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  aux['grad_norm'] = optax.tree.norm(grads)
  aux['tokens'] = batch['target_mask'].sum()
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), aux


def eval_step(params, batch, *, graphdef, loss_spec: LossSpec):
  """Teacher-forced evaluation of one batch: losses plus the predictions metrics need.

  Returns scalars (losses) and arrays: element_probs_BxE, semantic_pred_BxT, detail_pred_BxT.
  """
  outputs = forward(graphdef, params['model'], batch)
  _, aux = loss_spec(outputs, batch, params['loss_log_vars'])
  aux['element_probs'] = jax.nn.sigmoid(outputs['element_logits'])
  aux['semantic_pred'] = jnp.argmax(outputs['semantic_logits'], axis=-1)
  aux['detail_pred'] = jnp.argmax(outputs['detail_logits'], axis=-1)
  return aux
