"""Pure train and eval steps, functions of (state, batch); parallel.py wraps them (jit/pmap)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from phase1_jax import detail_loss, losses
from phase1_jax.training.state import TrainState

MODEL_INPUTS = ('features', 'feature_mask', 'inputs')


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """The static part of the loss: weighting kind, fixed weights, element open-tag token ids."""
  weighting: str
  weights: tuple[tuple[str, float], ...]   # ((task, weight), ...)
  element_token_ids: tuple[int, ...]
  logits_chunk_pages: int = 0   # > 0: detail logits that many pages at a time (fused_head_loss)
  patch_weight: float = 0.0     # > 0: + this times the patch-label loss (pixel input)
  num_semantic_classes: int = 0
  patch_words_weight: float = 0.0   # > 0: + this times the patch-word loss (pixel input)
  patch_words_form: str = 'sigmoid'   # losses.patch_word_loss's form

  def __call__(self, outputs, batch, log_vars_4, axis_name=None):
    total, aux = losses.multitask_loss(
        outputs, batch, element_token_ids_E=jnp.asarray(self.element_token_ids),
        weighting=self.weighting, weights=dict(self.weights), log_vars_4=log_vars_4,
        logits_chunk_pages=self.logits_chunk_pages, axis_name=axis_name)
    if self.patch_weight and 'patch_logits' in outputs:
      aux['loss_patch'] = losses.patch_label_loss(
          outputs['patch_logits'], batch['patch_labels'], batch['feature_mask'],
          losses.page_mask(batch), self.num_semantic_classes, axis_name)
      total = aux['loss'] = total + self.patch_weight * aux['loss_patch']
    if self.patch_words_weight and 'patch_word_logits' in outputs:
      aux['loss_patch_words'] = losses.patch_word_loss(
          outputs['patch_word_logits'], batch['patch_words'], batch['feature_mask'],
          losses.page_mask(batch), axis_name, form=self.patch_words_form)
      total = aux['loss'] = total + self.patch_words_weight * aux['loss_patch_words']
    return total, aux


def forward(graphdef, model_params, batch, dropout_key=None, *, detail_logits: bool = True):
  model = nnx.merge(graphdef, model_params)
  return model(*(batch[k] for k in MODEL_INPUTS), dropout_key=dropout_key,
               detail_logits=detail_logits)


def train_step(state: TrainState, batch, *, graphdef, tx, loss_spec: LossSpec, axis_name=None,
               gather_params=None):
  """One micro-batch: forward, loss, backward, optimizer update. Returns (state, metrics).

  metrics['nonfinite'] is 1 when the step was skipped (non-finite loss or gradient norm).
  `axis_name`: run per device under pmap/shard_map with the batch split over that axis and the
  state replicated; gradients and metrics are summed over it (losses.py makes each device's
  loss its share of the global one), so every replica applies the whole batch's update.
  `gather_params` (FSDP): applied to the model params before the forward pass, e.g. a sharding
  constraint that all-gathers them, so the activations stay sharded by batch only.
  """
  dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if axis_name is not None:   # different masks on different devices
    dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))

  def loss_fn(params):
    model_params = params['model'] if gather_params is None else gather_params(params['model'])
    # The states and head weights, not the logits: the loss builds them (whole, or a few pages
    # at a time) so that their gradient fuses into one pass (detail_loss.detail_terms).
    outputs = forward(graphdef, model_params, batch, dropout_key, detail_logits=False)
    return loss_spec(outputs, batch, params['loss_log_vars'], axis_name)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  aux['tokens'] = batch['target_mask'].sum()
  if axis_name is not None:
    shares = {k: v for k, v in aux.items() if not k.startswith('weight_')}
    aux.update(jax.lax.psum(shares, axis_name))
    loss, grads = aux['loss'], jax.lax.psum(grads, axis_name)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # NaN guard: a step with a non-finite loss or gradient keeps the old params AND the whole old
  # optimizer state, so Adam's moments and a MultiSteps accumulator never see it. (Not
  # optax.apply_if_finite: it ignores the loss and applies the NaN update after N skips.) The step
  # counter still advances: the batch was consumed and the next dropout key must differ.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  aux['grad_norm'] = grad_norm
  aux['nonfinite'] = jnp.logical_not(finite).astype(jnp.int32)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), aux


def eval_step(params, batch, *, graphdef, loss_spec: LossSpec):
  """Teacher-forced evaluation of one batch: losses plus the predictions metrics need.

  Returns scalars (losses) and arrays: element_probs_BxE, semantic_pred_BxT, detail_pred_BxT.
  With loss.logits_chunk_pages > 0 the detail logits are built that many pages at a time here
  too, so no B x T x V array exists in evaluation either.
  """
  pages = loss_spec.logits_chunk_pages
  outputs = forward(graphdef, params['model'], batch, detail_logits=not pages)
  if pages:
    head = [outputs.pop(k, None) for k in ('detail_hidden', 'detail_weight', 'detail_bias')]
    outputs['detail_nll'], outputs['detail_tag_logprobs'], detail_pred = (
        detail_loss.chunked_detail_terms(*head, batch['targets'],
                                         jnp.asarray(loss_spec.element_token_ids), pages))
  else:
    detail_pred = jnp.argmax(outputs['detail_logits'], axis=-1)
  _, aux = loss_spec(outputs, batch, params['loss_log_vars'])
  aux['element_probs'] = jax.nn.sigmoid(outputs['element_logits'])
  aux['semantic_pred'] = jnp.argmax(outputs['semantic_logits'], axis=-1)
  aux['detail_pred'] = detail_pred
  return aux
