"""MultiTaskLoss: detail CE, semantic CE, element BCE and a cross-head consistency term.

Pure functions of arrays, all in float32. Shapes: B batch, T positions, C semantic classes,
E element types.

The detail and consistency terms come from the detail head (detail_loss.py): whole, or with
`logits_chunk_pages` > 0 a few pages of logits at a time, with the gradient in the same pass.

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

from phase1_jax.detail_loss import detail_terms, fused_head_loss, head_sums
from phase1_jax.model.phase1 import valid_patches_first

TASKS = ('detail', 'semantic', 'element', 'consistency')


def masked_mean(x, mask, axis_name=None):
  mask = mask.astype(jnp.float32)
  count = mask.sum() if axis_name is None else jax.lax.psum(mask.sum(), axis_name)
  return (x * mask).sum() / jnp.maximum(count, 1.0)


def _counts(target_mask_BxT, page_mask_B, axis_name=None):
  """The detail and consistency losses' denominators, float32 [2]: target tokens and pages (over
  all devices with axis_name; at least 1)."""
  counts_2 = jnp.stack([target_mask_BxT.sum(), page_mask_B.sum()]).astype(jnp.float32)
  counts_2 = counts_2 if axis_name is None else jax.lax.psum(counts_2, axis_name)
  return jnp.maximum(counts_2, 1.0)


def page_mask(batch):
  """[B] bool: False for the padding pages of a short eval batch (they count nowhere)."""
  return batch.get('page_mask', jnp.ones(batch['targets'].shape[:1], bool))


def _masks(batch):
  page_mask_B = page_mask(batch)
  return batch['target_mask'] & page_mask_B[:, None], page_mask_B


def _semantic_and_element_losses(outputs, batch, page_mask_B, axis_name=None):
  semantic_nll_BxT = optax.softmax_cross_entropy_with_integer_labels(
      outputs['semantic_logits'].astype(jnp.float32), batch['semantic_labels'])
  element_bce_BxE = optax.sigmoid_binary_cross_entropy(
      outputs['element_logits'].astype(jnp.float32), batch['element_labels'])
  return {
      'semantic': masked_mean(semantic_nll_BxT, batch['semantic_mask'] & page_mask_B[:, None],
                              axis_name),
      'element': masked_mean(element_bce_BxE.mean(axis=-1), page_mask_B, axis_name),
  }


def task_losses(outputs, batch, element_token_ids_E, axis_name=None):
  """The four unweighted task losses, float32 scalars.

  outputs: detail_logits_BxTxV (or detail_hidden_BxTxD + detail_weight_VxD [+ detail_bias_V]),
    semantic_logits_BxTxC, element_logits_BxE.
  batch: targets_BxT, target_mask_BxT, semantic_labels_BxT, semantic_mask_BxT, element_labels_BxE,
    and optionally page_mask_B (False for padding pages of a short eval batch: they count nowhere).
  """
  target_mask_BxT, page_mask_B = _masks(batch)
  nll_BxT, tag_logprobs_BxTxE = detail_terms(outputs, batch['targets'], element_token_ids_E)
  detail, consistency = (
      head_sums(nll_BxT, tag_logprobs_BxTxE, outputs['element_logits'].astype(jnp.float32),
                target_mask_BxT, page_mask_B)
      / _counts(target_mask_BxT, page_mask_B, axis_name))
  return {'detail': detail, 'consistency': consistency,
          **_semantic_and_element_losses(outputs, batch, page_mask_B, axis_name)}


def _real_patches(feature_mask_BxP, page_mask_B):
  """bool [B, P] in the model's memory order (valid patches first): the first (number of valid
  patches) positions of each real page."""
  lengths_B = feature_mask_BxP.sum(axis=-1, dtype=jnp.int32)
  return (jnp.arange(feature_mask_BxP.shape[1])[None] < lengths_B[:, None]) & page_mask_B[:, None]


def patch_label_loss(patch_logits_BxPxK, patch_labels_BxPx2, feature_mask_BxP, page_mask_B,
                     num_semantic_classes: int, axis_name=None):
  """Mean cross-entropy of each patch's section class and element type (the model's patch head,
  an auxiliary signal that teaches the encoder the page's layout).

  patch_logits_BxPxK: K = (C + 1) + (E + 1), class 0 of each part meaning 'none', in the model's
  memory order (valid patches first). patch_labels_BxPx2: (section, element type) per patch in
  the batch's order, -1 for none, -2 for no label (padding, a page without boxes): not scored,
  nor are the patches of padding pages (page_mask_B False).
  """
  labels_BxPx2, _ = valid_patches_first(patch_labels_BxPx2, feature_mask_BxP)
  real_BxP = _real_patches(feature_mask_BxP, page_mask_B)
  split = num_semantic_classes + 1
  terms = []
  for logits, labels_BxP in ((patch_logits_BxPxK[..., :split], labels_BxPx2[..., 0]),
                             (patch_logits_BxPxK[..., split:], labels_BxPx2[..., 1])):
    nll_BxP = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.maximum(labels_BxP + 1, 0))
    terms.append(masked_mean(nll_BxP, real_BxP & (labels_BxP >= -1), axis_name))
  return 0.5 * (terms[0] + terms[1])


def _pair_rows(patch_words_BxKx2, feature_mask_BxP, vocab_size: int):
  """(row_BxK, token_BxK, scored_BxK) of the (patch, token) pairs: each pair's patch as its row
  in the model's memory order (valid patches first), the token clipped into the vocabulary, and
  whether the pair counts (a valid patch and a token of the vocabulary; (-1, -1) pads)."""
  p = feature_mask_BxP.shape[1]
  patch_BxK, token_BxK = patch_words_BxKx2[..., 0], patch_words_BxKx2[..., 1]
  patch_BxK_safe = jnp.clip(patch_BxK, 0, p - 1)
  scored_BxK = ((patch_BxK >= 0) & (patch_BxK < p) & (token_BxK >= 0) & (token_BxK < vocab_size)
                & jnp.take_along_axis(feature_mask_BxP, patch_BxK_safe, axis=1))
  row_BxK = jnp.take_along_axis(jnp.cumsum(feature_mask_BxP, axis=1) - 1, patch_BxK_safe, axis=1)
  return row_BxK, jnp.clip(token_BxK, 0, vocab_size - 1), scored_BxK


def patch_word_loss(patch_word_logits_BxPxV, patch_words_BxKx2, feature_mask_BxP, page_mask_B,
                    axis_name=None, *, form: str):
  """How well the patch word head reads each patch's visible BPE tokens (a dense reading signal
  for the encoder). patch_word_logits_BxPxV: in the model's memory order (valid patches first).
  patch_words_BxKx2: distinct (patch, token) pairs in the batch's patch order, (-1, -1) rows for
  padding (records.patch_word_pairs); with S_p the tokens on patch p, both forms need the logits
  z only at the pairs (a gather and a scatter-add), never a [P, V] target:
    softmax: cross-entropy against the uniform distribution over S_p, lse(z_p) - mean_{S_p} z,
      averaged over the valid patches of real pages that show text;
    sigmoid: binary cross-entropy of the multi-hot of S_p, softplus(z).mean - sum_{S_p} z / V,
      averaged over all valid patches of real pages (page_mask_B).
  """
  logits_BxPxV = patch_word_logits_BxPxV.astype(jnp.float32)
  b, p, v = logits_BxPxV.shape
  real_BxP = _real_patches(feature_mask_BxP, page_mask_B)
  row_BxK, token_BxK, scored_BxK = _pair_rows(patch_words_BxKx2, feature_mask_BxP, v)
  rows_Bx1 = jnp.arange(b)[:, None]
  z_BxK = jnp.where(scored_BxK, logits_BxPxV[rows_Bx1, row_BxK, token_BxK], 0.0)
  hits_BxP = jnp.zeros((b, p), jnp.float32).at[rows_Bx1, row_BxK].add(z_BxK)
  if form == 'sigmoid':
    bce_BxP = jax.nn.softplus(logits_BxPxV).mean(axis=-1) - hits_BxP / v
    return masked_mean(bce_BxP, real_BxP, axis_name)
  count_BxP = jnp.zeros((b, p), jnp.float32).at[rows_Bx1, row_BxK].add(scored_BxK)
  ce_BxP = jax.nn.logsumexp(logits_BxPxV, axis=-1) - hits_BxP / jnp.maximum(count_BxP, 1.0)
  return masked_mean(ce_BxP, real_BxP & (count_BxP > 0), axis_name)


def task_weights(*, weighting: str, weights: dict, log_vars_4=None, axis_name=None):
  """(effective weight of each task, regularizer): the total loss is sum_i w_i L_i + regularizer.

  fixed:       w_i from `weights` (seed defaults 0.4 / 0.3 / 0.2 / 0.1), no regularizer.
  uncertainty: w_i = exp(-s_i), regularizer sum_i s_i / 2, with learned s_i = log sigma_i^2
               (Kendall et al. 2018, classification form), s in TASKS order. With `axis_name`,
               the regularizer is split over the devices.
  """
  if weighting == 'fixed':
    return {k: jnp.float32(weights[k]) for k in TASKS}, jnp.float32(0)
  if weighting == 'uncertainty':
    s = log_vars_4.astype(jnp.float32)
    devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)
    return {k: jnp.exp(-s[i]) for i, k in enumerate(TASKS)}, 0.5 * s.sum() / devices
  raise ValueError(f'loss weighting {weighting!r}: must be fixed or uncertainty')


def combine(losses: dict, *, weighting: str, weights: dict, log_vars_4=None, axis_name=None):
  """(total, effective weights dict) from the task losses: see task_weights."""
  w, regularizer = task_weights(weighting=weighting, weights=weights, log_vars_4=log_vars_4,
                                axis_name=axis_name)
  return sum(w[k] * losses[k] for k in TASKS) + regularizer, w


def multitask_loss(outputs, batch, *, element_token_ids_E, weighting: str, weights: dict,
                   log_vars_4=None, logits_chunk_pages: int = 0, axis_name=None):
  """(total, aux) where aux holds each task loss and its effective weight, for logging. With
  `axis_name`, total and the task losses are this device's shares (psum them).

  logits_chunk_pages > 0 and outputs with detail_hidden (training): the detail and consistency
  terms come from fused_head_loss, that many pages of logits at a time. Outputs with the logits
  or the detail terms (evaluation: step.eval_step) take the plain path whatever it says.
  """
  w, regularizer = task_weights(weighting=weighting, weights=weights, log_vars_4=log_vars_4,
                                axis_name=axis_name)
  if logits_chunk_pages > 0 and 'detail_hidden' in outputs:
    target_mask_BxT, page_mask_B = _masks(batch)
    losses = _semantic_and_element_losses(outputs, batch, page_mask_B, axis_name)
    head_total, (losses['detail'], losses['consistency']) = fused_head_loss(
        outputs['detail_hidden'], outputs['detail_weight'], outputs.get('detail_bias'),
        jnp.stack([w['detail'], w['consistency']]), outputs['element_logits'], batch['targets'],
        target_mask_BxT, page_mask_B, element_token_ids_E,
        _counts(target_mask_BxT, page_mask_B, axis_name), logits_chunk_pages)
    total = head_total + w['semantic'] * losses['semantic'] + w['element'] * losses['element']
    total = total + regularizer
  else:
    losses = task_losses(outputs, batch, element_token_ids_E, axis_name)
    total = sum(w[k] * losses[k] for k in TASKS) + regularizer
  aux = {f'loss_{k}': losses[k] for k in TASKS}
  aux.update({f'weight_{k}': v for k, v in w.items()})
  aux['loss'] = total
  return total, aux
