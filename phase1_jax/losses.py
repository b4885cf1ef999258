"""MultiTaskLoss: detail CE, semantic CE, element BCE and a cross-head consistency term.

Pure functions of arrays, all in float32. Shapes: B batch, T positions, V vocab, C semantic
classes, E element types, D model width, N = B*T.

The detail head's logits are either given whole (`outputs['detail_logits']`, B x T x V) or, for
large vocabularies, as the final states and the head's weights (`detail_hidden`, `detail_weight`,
optional `detail_bias`): then `chunked_logsumexp` walks the vocabulary `vocab_chunk_size` entries
at a time and no B x T x V array is ever built, forward or backward. Every term needs only three
things per position: the log-sum-exp over the vocabulary, the target's logit, and the open-tag
tokens' logits (p(tag) = exp(logit_tag - lse)), and the last two are row gathers of the weight.

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

from phase1_jax.model.layers import logits_matmul

TASKS = ('detail', 'semantic', 'element', 'consistency')


def masked_mean(x, mask, axis_name=None):
  mask = mask.astype(jnp.float32)
  count = mask.sum() if axis_name is None else jax.lax.psum(mask.sum(), axis_name)
  return (x * mask).sum() / jnp.maximum(count, 1.0)


def implied_element_probs(tag_logprobs_BxTxE, target_mask_BxT):
  """P(element type e appears in the markup) as the detail head sees it: the largest probability
  it puts on e's open-tag token at any valid position. [B, E]

  tag_logprobs_BxTxE: the detail head's log-probabilities of the E open-tag tokens.

  Max, not a noisy-or: a noisy-or of many small probabilities tends to 1 for every plausible type
  (60 positions at p = 0.05 give 0.95), which would teach the classifier false positives.
  """
  p_BxTxE = jnp.exp(tag_logprobs_BxTxE)
  return jnp.max(jnp.where(target_mask_BxT[..., None], p_BxTxE, 0.0), axis=1)


def chunked_logsumexp(h_NxD, weight_VxD, bias_V=None, *, chunk_size: int):
  """logsumexp_v(h_n . w_v + b_v) per row n, float32 [N], computed over vocabulary chunks of at
  most `chunk_size` rows so that at most an N x chunk_size float32 block of logits exists at once.

  A `lax.scan` over the chunks with an online (running max, running sum) log-sum-exp; the body is
  rematerialized, so the backward pass recomputes each chunk's logits instead of storing them.
  The running max is held out of the gradient: lse = m + log sum exp(l - m) has the same
  derivative (the softmax) for any m.
  """
  v, d = weight_VxD.shape
  # As few chunks as chunk_size allows, evened out so the padding is under one row per chunk
  # (V = 50000 at 4096: 13 chunks of 3847, not 13 of 4096 with 3248 padded rows of work).
  n_chunks = -(-v // chunk_size)
  chunk_size = -(-v // n_chunks)
  pad = n_chunks * chunk_size - v
  w_CxKxD = jnp.pad(weight_VxD, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, d)
  b_V = jnp.zeros((v,), jnp.float32) if bias_V is None else bias_V.astype(jnp.float32)
  # Padded vocabulary rows get -inf; each chunk holds at least one real row, so maxima are finite.
  b_CxK = jnp.pad(b_V, (0, pad), constant_values=-jnp.inf).reshape(n_chunks, chunk_size)
  h_NxD = h_NxD.astype(weight_VxD.dtype)

  @jax.checkpoint
  def body(carry, chunk):
    m_N, s_N = carry
    w_KxD, b_K = chunk
    logits_NxK = logits_matmul(h_NxD, w_KxD) + b_K
    new_m_N = jax.lax.stop_gradient(jnp.maximum(m_N, logits_NxK.max(axis=-1)))
    s_N = s_N * jnp.exp(m_N - new_m_N) + jnp.exp(logits_NxK - new_m_N[:, None]).sum(axis=-1)
    return (new_m_N, s_N), None

  n = h_NxD.shape[0]
  init = (jnp.full((n,), -1e30, jnp.float32), jnp.zeros((n,), jnp.float32))
  (m_N, s_N), _ = jax.lax.scan(body, init, (w_CxKxD, b_CxK))
  return m_N + jnp.log(s_N)


@jax.custom_vjp
def nll_and_tag_logprobs(logits_NxV, targets_N, tag_ids_E):
  """(-log softmax(logits)[n, targets[n]] [N], log softmax(logits)[:, tag_ids] [N, E]), float32.

  The same values as indexing jax.nn.log_softmax, with a backward pass that writes the logits'
  gradient in one elementwise pass, softmax * (g_nll - sum_e g_tag) - g_nll at the target + g_tag
  at the tag columns, where autodiff of log_softmax and two gathers materializes a zero-filled
  N x V buffer, scatters into it and adds several N x V float32 terms. Measured on the
  configs/default.py step: 1.02x on an H200 (bfloat16), neutral on CPU (float32).
  """
  return _nll_and_tag_logprobs_fwd(logits_NxV, targets_N, tag_ids_E)[0]


def _nll_and_tag_logprobs_fwd(logits_NxV, targets_N, tag_ids_E):
  lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
  target_N = jnp.take_along_axis(logits_NxV, targets_N[:, None], axis=-1)[:, 0]
  tags_NxE = logits_NxV[:, tag_ids_E] - lse_N[:, None]
  return (lse_N - target_N, tags_NxE), (logits_NxV, lse_N, targets_N, tag_ids_E)


def _nll_and_tag_logprobs_bwd(residuals, cotangents):
  logits_NxV, lse_N, targets_N, tag_ids_E = residuals
  g_nll_N, g_tags_NxE = cotangents
  softmax_scale_N = g_nll_N - g_tags_NxE.sum(axis=-1)
  ids_NxV = jax.lax.broadcasted_iota(targets_N.dtype, logits_NxV.shape, 1)
  g_NxV = (jnp.exp(logits_NxV - lse_N[:, None]) * softmax_scale_N[:, None]
           - jnp.where(ids_NxV == targets_N[:, None], g_nll_N[:, None], 0.0))
  return g_NxV.at[:, tag_ids_E].add(g_tags_NxE), None, None


nll_and_tag_logprobs.defvjp(_nll_and_tag_logprobs_fwd, _nll_and_tag_logprobs_bwd)


def _target_logits(h_NxD, weight_VxD, bias_V, ids_N):
  """Logit of vocabulary id ids_N[n] at row n, float32 [N]: a gather of N weight rows."""
  w_NxD = weight_VxD[ids_N]
  logits_N = jnp.einsum('nd,nd->n', h_NxD, w_NxD, preferred_element_type=jnp.float32)
  return logits_N if bias_V is None else logits_N + bias_V.astype(jnp.float32)[ids_N]


def detail_terms(outputs, targets_BxT, element_token_ids_E, vocab_chunk_size: int = 0):
  """(nll_BxT, element-tag log-probabilities BxTxE) of the detail head, float32.

  From `detail_logits` when the outputs hold them; else chunked from `detail_hidden` and
  `detail_weight` (and `detail_bias`) with `vocab_chunk_size` (see module docstring).
  """
  if 'detail_logits' in outputs:
    logits_BxTxV = outputs['detail_logits'].astype(jnp.float32)
    b, t, v = logits_BxTxV.shape
    nll_N, tags_NxE = nll_and_tag_logprobs(logits_BxTxV.reshape(b * t, v),
                                           targets_BxT.reshape(b * t), element_token_ids_E)
    return nll_N.reshape(b, t), tags_NxE.reshape(b, t, -1)
  if vocab_chunk_size <= 0:
    raise ValueError('vocab_chunk_size: must be positive when outputs hold detail_hidden '
                     'instead of detail_logits')
  h_BxTxD, w_VxD = outputs['detail_hidden'], outputs['detail_weight']
  bias_V = outputs.get('detail_bias')
  b, t, d = h_BxTxD.shape
  h_NxD = h_BxTxD.reshape(b * t, d).astype(w_VxD.dtype)
  lse_N = chunked_logsumexp(h_NxD, w_VxD, bias_V, chunk_size=vocab_chunk_size)
  target_N = _target_logits(h_NxD, w_VxD, bias_V, targets_BxT.reshape(b * t))
  tags_NxE = jnp.einsum('nd,ed->ne', h_NxD, w_VxD[element_token_ids_E],
                        preferred_element_type=jnp.float32)
  if bias_V is not None:
    tags_NxE = tags_NxE + bias_V.astype(jnp.float32)[element_token_ids_E]
  return ((lse_N - target_N).reshape(b, t),
          (tags_NxE - lse_N[:, None]).reshape(b, t, -1))


def task_losses(outputs, batch, element_token_ids_E, vocab_chunk_size: int = 0, axis_name=None):
  """The four unweighted task losses, float32 scalars.

  outputs: detail_logits_BxTxV (or detail_hidden_BxTxD + detail_weight_VxD [+ detail_bias_V] with
    vocab_chunk_size > 0), semantic_logits_BxTxC, element_logits_BxE.
  batch: targets_BxT, target_mask_BxT, semantic_labels_BxT, semantic_mask_BxT, element_labels_BxE,
    and optionally page_mask_B (False for padding pages of a short eval batch: they count nowhere).
  """
  page_mask_B = batch.get('page_mask', jnp.ones(batch['targets'].shape[:1], bool))
  target_mask = batch['target_mask'] & page_mask_B[:, None]
  nll_BxT, tag_logprobs_BxTxE = detail_terms(outputs, batch['targets'], element_token_ids_E,
                                             vocab_chunk_size)
  semantic_nll_BxT = optax.softmax_cross_entropy_with_integer_labels(
      outputs['semantic_logits'].astype(jnp.float32), batch['semantic_labels'])
  element_logits_BxE = outputs['element_logits'].astype(jnp.float32)
  element_bce_BxE = optax.sigmoid_binary_cross_entropy(element_logits_BxE, batch['element_labels'])
  implied_BxE = implied_element_probs(tag_logprobs_BxTxE, target_mask)
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
                   log_vars_4=None, vocab_chunk_size: int = 0, axis_name=None):
  """(total, aux) where aux holds each task loss and its effective weight, for logging. With
  `axis_name`, total and the task losses are this device's shares (psum them)."""
  losses = task_losses(outputs, batch, element_token_ids_E, vocab_chunk_size, axis_name)
  total, w = combine(losses, weighting=weighting, weights=weights, log_vars_4=log_vars_4,
                     axis_name=axis_name)
  aux = {f'loss_{k}': v for k, v in losses.items()}
  aux.update({f'weight_{k}': v for k, v in w.items()})
  aux['loss'] = total
  return total, aux
