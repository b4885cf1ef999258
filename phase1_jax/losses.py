"""MultiTaskLoss: detail CE, semantic CE, element BCE and a cross-head consistency term.

Pure functions of arrays, all in float32. Shapes: B batch, T positions, V vocab, C semantic
classes, E element types.

`axis_name` (inside pmap/shard_map over a data axis): each device holds part of the global
batch. Every mean then divides the device's local sum by the *global* count (a psum of the
counts, which carry no gradient), and terms that do not depend on the batch are split evenly,
so the psum over devices of the returned values, and of their gradients, is exactly the loss
(and gradient) of the whole batch on one device, however the tokens are spread.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

TASKS = ('detail', 'semantic', 'element', 'consistency')


def masked_mean(x, mask, axis_name=None):
  mask = mask.astype(jnp.float32)
  count = mask.sum() if axis_name is None else jax.lax.psum(mask.sum(), axis_name)
  return (x * mask).sum() / jnp.maximum(count, 1.0)


def implied_element_probs(detail_logprobs_BxTxV, target_mask_BxT, element_token_ids_E):
  """P(element type e appears in the markup) as the detail head sees it: the largest probability
  it puts on e's open-tag token at any valid position. [B, E]

  Max, not a noisy-or: a noisy-or of many small probabilities tends to 1 for every plausible type
  (60 positions at p = 0.05 give 0.95), which would teach the classifier false positives.
  """
  p_BxTxE = jnp.exp(detail_logprobs_BxTxV[..., element_token_ids_E])
  return jnp.max(jnp.where(target_mask_BxT[..., None], p_BxTxE, 0.0), axis=1)


def task_losses(outputs, batch, element_token_ids_E, axis_name=None):
  """The four unweighted task losses, float32 scalars.

  outputs: detail_logits_BxTxV, semantic_logits_BxTxC, element_logits_BxE.
  batch: targets_BxT, target_mask_BxT, semantic_labels_BxT, semantic_mask_BxT, element_labels_BxE,
    and optionally page_mask_B (False for padding pages of a short eval batch: they count nowhere).
  """
  page_mask_B = batch.get('page_mask', jnp.ones(batch['targets'].shape[:1], bool))
  logprobs_BxTxV = jax.nn.log_softmax(outputs['detail_logits'].astype(jnp.float32))
  target_mask = batch['target_mask'] & page_mask_B[:, None]
  nll_BxT = -jnp.take_along_axis(logprobs_BxTxV, batch['targets'][..., None], axis=-1)[..., 0]
  semantic_nll_BxT = optax.softmax_cross_entropy_with_integer_labels(
      outputs['semantic_logits'].astype(jnp.float32), batch['semantic_labels'])
  element_logits_BxE = outputs['element_logits'].astype(jnp.float32)
  element_bce_BxE = optax.sigmoid_binary_cross_entropy(element_logits_BxE, batch['element_labels'])
  implied_BxE = implied_element_probs(logprobs_BxTxV, target_mask, element_token_ids_E)
  consistency_BxE = jnp.square(implied_BxE - jax.nn.sigmoid(element_logits_BxE))
  mean = lambda x, mask: masked_mean(x, mask, axis_name)
  return {
      'detail': mean(nll_BxT, target_mask),
      'semantic': mean(semantic_nll_BxT, batch['semantic_mask'] & page_mask_B[:, None]),
      'element': mean(element_bce_BxE.mean(axis=-1), page_mask_B),
      'consistency': mean(consistency_BxE.mean(axis=-1), page_mask_B),
  }


def combine(losses: dict, *, weighting: str, weights: dict, log_vars_4=None, axis_name=None):
  """Total loss from the task losses.

  fixed:       sum_i w_i L_i  (seed defaults 0.4 / 0.3 / 0.2 / 0.1).
  uncertainty: sum_i exp(-s_i) L_i + s_i / 2 with learned s_i = log sigma_i^2 (Kendall et al.
               2018, classification form), s in TASKS order.
  Returns (total, effective weights dict). With `axis_name`, s_i / 2 is split over the devices.
  """
  if weighting == 'fixed':
    w = {k: jnp.float32(weights[k]) for k in TASKS}
    return sum(w[k] * losses[k] for k in TASKS), w
  if weighting == 'uncertainty':
    s = log_vars_4.astype(jnp.float32)
    w = {k: jnp.exp(-s[i]) for i, k in enumerate(TASKS)}
    devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)
    return sum(w[k] * losses[k] + 0.5 * s[i] / devices for i, k in enumerate(TASKS)), w
  raise ValueError(f'loss weighting {weighting!r}: must be fixed or uncertainty')


def multitask_loss(outputs, batch, *, element_token_ids_E, weighting: str, weights: dict,
                   log_vars_4=None, axis_name=None):
  """(total, aux) where aux holds each task loss and its effective weight, for logging. With
  `axis_name`, total and the task losses are this device's shares (psum them)."""
  losses = task_losses(outputs, batch, element_token_ids_E, axis_name)
  total, w = combine(losses, weighting=weighting, weights=weights, log_vars_4=log_vars_4,
                     axis_name=axis_name)
  aux = {f'loss_{k}': v for k, v in losses.items()}
  aux.update({f'weight_{k}': v for k, v in w.items()})
  aux['loss'] = total
  return total, aux
