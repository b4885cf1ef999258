"""MultiTaskLoss: detail CE, semantic CE, element BCE and a cross-head consistency term.

Pure functions of arrays, all in float32. Shapes: B batch, T positions, V vocab, C semantic
classes, E element types, D model width, N = B*T.

The detail head arrives either as its logits (`outputs['detail_logits']`, B x T x V: evaluation)
or, as training computes it, as the final states and the head's weights (`detail_hidden`,
`detail_weight`, optional `detail_bias`). Every term needs only three things per position: the
log-sum-exp over the vocabulary, the target's logit, and the open-tag tokens' logits
(p(tag) = exp(logit_tag - lse)). From the states, the tags' logits are a small matmul with their
own weight rows, so the N x V gradient holds only the softmax and the target terms and fuses into
one pass; with `vocab_chunk_size` > 0, `chunked_logsumexp` walks the vocabulary that many entries
at a time and no B x T x V array is ever built, forward or backward (the target's logit is then a
row gather too).

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
    logits_NxK = logits_matmul(h_NxD, w_KxD, b_K)
    new_m_N = jax.lax.stop_gradient(jnp.maximum(m_N, logits_NxK.max(axis=-1)))
    s_N = s_N * jnp.exp(m_N - new_m_N) + jnp.exp(logits_NxK - new_m_N[:, None]).sum(axis=-1)
    return (new_m_N, s_N), None

  n = h_NxD.shape[0]
  init = (jnp.full((n,), -1e30, jnp.float32), jnp.zeros((n,), jnp.float32))
  (m_N, s_N), _ = jax.lax.scan(body, init, (w_CxKxD, b_CxK))
  return m_N + jnp.log(s_N)


@jax.custom_vjp
def logsumexp_and_pick(logits_NxV, ids_N):
  """(logsumexp_v logits[n, v], logits[n, ids[n]]), float32 [N] each.

  The backward writes the logits' gradient in one elementwise pass, softmax * g_lse + g_pick at
  column ids[n], with nothing else in the N x V cotangent (no scatter), so XLA fuses it with
  whatever consumes it: in half precision, the cast to the head's dtype (logits_matmul's
  backward). Plain autodiff of logsumexp and a gather materializes a zero-filled N x V buffer,
  scatters into it and adds several N x V float32 terms.
  """
  return _logsumexp_and_pick_fwd(logits_NxV, ids_N)[0]


def logsumexp_one_pass(x_NxV):
  """logsumexp over the last axis in one read of x: a single reduction of (running max, sum of
  exp(x - running max)) pairs, where jax.nn.logsumexp reads x twice (max, then the sum). [N]

  For the N x V float32 logits on a GPU, where the passes are memory-bound: 1.016x on the
  configs/default.py step (H100, interleaved A/B). On CPU, where the extra exp of each combine
  costs more than the read, jax.nn.logsumexp measured 1.07x faster (configs/bench_cpu.py)."""
  def combine(a, b):
    m = jnp.maximum(a[0], b[0])
    return m, a[1] * jnp.exp(a[0] - m) + b[1] * jnp.exp(b[0] - m)
  # A finite initial max: exp(init - init) must be 1, not exp(-inf + inf) = nan.
  init = (jnp.float32(jnp.finfo(jnp.float32).min), jnp.float32(0))
  m_N, s_N = jax.lax.reduce((x_NxV, jnp.ones_like(x_NxV)), init, combine, (x_NxV.ndim - 1,))
  return m_N + jnp.log(s_N)


def _logsumexp_and_pick_fwd(logits_NxV, ids_N):
  if jax.default_backend() == 'cpu':
    lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
  else:
    lse_N = logsumexp_one_pass(logits_NxV)
  picked_N = jnp.take_along_axis(logits_NxV, ids_N[:, None], axis=-1)[:, 0]
  return (lse_N, picked_N), (logits_NxV, lse_N, ids_N)


def _logsumexp_and_pick_bwd(residuals, cotangents):
  logits_NxV, lse_N, ids_N = residuals
  g_lse_N, g_picked_N = cotangents
  cols_NxV = jax.lax.broadcasted_iota(ids_N.dtype, logits_NxV.shape, 1)
  g_NxV = (jnp.exp(logits_NxV - lse_N[:, None]) * g_lse_N[:, None]
           + jnp.where(cols_NxV == ids_N[:, None], g_picked_N[:, None], 0.0))
  return g_NxV, None


logsumexp_and_pick.defvjp(_logsumexp_and_pick_fwd, _logsumexp_and_pick_bwd)


def _row_logits(h_NxD, weight_VxD, bias_V, ids_K):
  """Logits of the K vocabulary ids at every row, float32 [N, K]: h against K gathered weight
  rows (a small matmul; its gradient never touches an N x V array)."""
  logits_NxK = jnp.einsum('nd,kd->nk', h_NxD, weight_VxD[ids_K],
                          preferred_element_type=jnp.float32)
  return logits_NxK if bias_V is None else logits_NxK + bias_V.astype(jnp.float32)[ids_K]


def _target_logits(h_NxD, weight_VxD, bias_V, ids_N):
  """Logit of vocabulary id ids_N[n] at row n, float32 [N]: a gather of N weight rows."""
  w_NxD = weight_VxD[ids_N]
  logits_N = jnp.einsum('nd,nd->n', h_NxD, w_NxD, preferred_element_type=jnp.float32)
  return logits_N if bias_V is None else logits_N + bias_V.astype(jnp.float32)[ids_N]


def detail_terms(outputs, targets_BxT, element_token_ids_E, vocab_chunk_size: int = 0):
  """(nll_BxT, element-tag log-probabilities BxTxE) of the detail head, float32.

  From `detail_logits` when the outputs hold them (evaluation). Else from `detail_hidden` and
  `detail_weight` (and `detail_bias`), as training computes them: the logits whole, or with
  `vocab_chunk_size` > 0 over vocabulary chunks (see module docstring); the tags' logits come
  from their own weight rows, so their gradient stays out of the N x V cotangent.
  """
  b, t = targets_BxT.shape
  targets_N = targets_BxT.reshape(b * t)
  if 'detail_logits' in outputs:
    logits_NxV = outputs['detail_logits'].astype(jnp.float32).reshape(b * t, -1)
    lse_N, target_N = logsumexp_and_pick(logits_NxV, targets_N)
    tags_NxE = logits_NxV[:, element_token_ids_E]
  else:
    h_BxTxD, w_VxD = outputs['detail_hidden'], outputs['detail_weight']
    bias_V = outputs.get('detail_bias')
    h_NxD = h_BxTxD.reshape(b * t, -1).astype(w_VxD.dtype)
    if vocab_chunk_size > 0:
      lse_N = chunked_logsumexp(h_NxD, w_VxD, bias_V, chunk_size=vocab_chunk_size)
      target_N = _target_logits(h_NxD, w_VxD, bias_V, targets_N)
    else:
      lse_N, target_N = logsumexp_and_pick(logits_matmul(h_NxD, w_VxD, bias_V), targets_N)
    tags_NxE = _row_logits(h_NxD, w_VxD, bias_V, element_token_ids_E)
  return ((lse_N - target_N).reshape(b, t),
          (tags_NxE - lse_N[:, None]).reshape(b, t, -1))


def task_losses(outputs, batch, element_token_ids_E, vocab_chunk_size: int = 0, axis_name=None):
  """The four unweighted task losses, float32 scalars.

  outputs: detail_logits_BxTxV (or detail_hidden_BxTxD + detail_weight_VxD [+ detail_bias_V]),
    semantic_logits_BxTxC, element_logits_BxE.
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
