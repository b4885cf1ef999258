"""The detail head's terms of the loss: per position, the NLL of the target token and the
log-probabilities of the element types' open-tag tokens, and from them the detail and consistency
sums; whole, or in chunks of pages with the gradient in the same pass (`fused_head_loss`).

Pure functions of arrays, all in float32. Shapes: B batch, T positions, V vocab, E element types,
D model width, N = B*T.

The detail head arrives either as its logits (`outputs['detail_logits']`, B x T x V: evaluation)
or, as training computes it, as the final states and the head's weights (`detail_hidden`,
`detail_weight`, optional `detail_bias`). Every term needs only three things per position: the
log-sum-exp over the vocabulary, the target's logit, and the open-tag tokens' logits
(p(tag) = exp(logit_tag - lse)). From the states, the tags' logits are a small matmul with their
own weight rows, so the N x V gradient holds only the softmax and the target terms and fuses into
one pass. With `pages_per_chunk` (large vocabularies), `fused_head_loss` builds the logits that
many pages at a time and computes their gradient in the same pass: no B x T x V array is ever
built, and the head costs the same three matmuls as the plain loss.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from phase1_jax.model.layers import logits_matmul


def implied_element_probs(tag_logprobs_BxTxE, target_mask_BxT):
  """P(element type e appears in the markup) as the detail head sees it: the largest probability
  it puts on e's open-tag token at any valid position. [B, E]

  tag_logprobs_BxTxE: the detail head's log-probabilities of the E open-tag tokens.

  Max, not a noisy-or: a noisy-or of many small probabilities tends to 1 for every plausible type
  (60 positions at p = 0.05 give 0.95), which would teach the classifier false positives.
  """
  p_BxTxE = jnp.exp(tag_logprobs_BxTxE)
  return jnp.max(jnp.where(target_mask_BxT[..., None], p_BxTxE, 0.0), axis=1)


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
  return logits_NxK if bias_V is None else logits_NxK + bias_V.astype(jnp.float32)[ids_K][None, :]


def _page_terms(lse_N, picked_N, tags_NxE, pages: int, t: int):
  """(nll_PxT, tag_logprobs_PxTxE) from each row's log-sum-exp, target logit and tags' logits."""
  return (lse_N - picked_N).reshape(pages, t), (tags_NxE - lse_N[:, None]).reshape(pages, t, -1)


def detail_terms(outputs, targets_BxT, element_token_ids_E):
  """(nll_BxT, element-tag log-probabilities BxTxE) of the detail head, float32.

  As given when the outputs hold them (`detail_nll`, `detail_tag_logprobs`: chunked evaluation,
  chunked_detail_terms). From `detail_logits` (evaluation). Else from `detail_hidden` and
  `detail_weight` (and `detail_bias`), as training computes them: the tags' logits come from their
  own weight rows, so their gradient stays out of the N x V cotangent.
  """
  if 'detail_nll' in outputs:
    return outputs['detail_nll'], outputs['detail_tag_logprobs']
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
    lse_N, target_N = logsumexp_and_pick(logits_matmul(h_NxD, w_VxD, bias_V), targets_N)
    tags_NxE = _row_logits(h_NxD, w_VxD, bias_V, element_token_ids_E)
  return _page_terms(lse_N, target_N, tags_NxE, b, t)


def head_sums(nll_BxT, tag_logprobs_BxTxE, element_logits_BxE, target_mask_BxT, page_mask_B):
  """Numerators of the detail and consistency losses, float32 [2]: the detail NLL summed over the
  target mask, and the consistency term (mean over element types) summed over the pages.
  target_mask_BxT must already exclude padding pages."""
  implied_BxE = implied_element_probs(tag_logprobs_BxTxE, target_mask_BxT)
  consistency_B = jnp.square(implied_BxE - jax.nn.sigmoid(element_logits_BxE)).mean(axis=-1)
  return jnp.stack([jnp.where(target_mask_BxT, nll_BxT, 0.0).sum(),
                    jnp.where(page_mask_B, consistency_B, 0.0).sum()])


def chunk_pages(batch_size: int, pages: int) -> int:
  """Pages per logits chunk: the largest divisor of the batch size that is at most `pages`."""
  return max(p for p in range(1, min(pages, batch_size) + 1) if batch_size % p == 0)


def _page_chunks(x, pages: int):
  """[B, ...] -> [B / pages, pages, ...], the leading axis for lax.scan / lax.map over chunks.

  Chunk c holds pages c, c + B/pages, c + 2B/pages, ...: strided, not adjacent, so that under jit
  over a mesh, where the batch is split into contiguous blocks over the devices, every chunk has
  pages on every device (pages a multiple of the devices) and each device works on its own pages
  in every iteration. With adjacent pages the scanned axis itself was split over the devices and
  XLA ran every chunk on every device (the step 0.55x plain logits over 2 devices).
  """
  return jnp.swapaxes(x.reshape(pages, x.shape[0] // pages, *x.shape[1:]), 0, 1)


def _unchunk(x):
  """The inverse of _page_chunks: [B / pages, pages, ...] -> [B, ...]."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _chunk_logits(h_RxD, weight_VxD, bias_V, targets_R, element_token_ids_E):
  """(logits_RxV, lse_R, picked_R, tags_RxE) of one chunk of rows, float32."""
  logits_RxV = logits_matmul(h_RxD, weight_VxD, bias_V)
  lse_R = jax.nn.logsumexp(logits_RxV, axis=-1)
  picked_R = jnp.take_along_axis(logits_RxV, targets_R[:, None], axis=-1)[:, 0]
  return logits_RxV, lse_R, picked_R, logits_RxV[:, element_token_ids_E]


def chunked_detail_terms(h_BxTxD, weight_VxD, bias_V, targets_BxT, element_token_ids_E,
                         pages_per_chunk: int):
  """(nll_BxT, tag_logprobs_BxTxE, argmax_BxT): detail_terms plus the argmax token, with the
  logits built `pages_per_chunk` pages at a time (evaluation: no gradient, no B x T x V array)."""
  b, t, d = h_BxTxD.shape
  p = chunk_pages(b, pages_per_chunk)

  def chunk(args):
    h_PxTxD, targets_PxT = args
    logits_RxV, lse_R, picked_R, tags_RxE = _chunk_logits(
        h_PxTxD.reshape(p * t, d), weight_VxD, bias_V, targets_PxT.reshape(p * t),
        element_token_ids_E)
    return (*_page_terms(lse_R, picked_R, tags_RxE, p, t),
            jnp.argmax(logits_RxV, axis=-1).reshape(p, t))

  outs = jax.lax.map(chunk, (_page_chunks(h_BxTxD, p), _page_chunks(targets_BxT, p)))
  return tuple(_unchunk(x) for x in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def fused_head_loss(h_BxTxD, weight_VxD, bias_V, task_weights_2, element_logits_BxE, targets_BxT,
                    target_mask_BxT, page_mask_B, element_token_ids_E, counts_2, pages_per_chunk):
  """w_detail * L_detail + w_consistency * L_consistency with its gradient computed in the same
  pass, `pages_per_chunk` pages at a time: (total, (L_detail, L_consistency)), float32.

  task_weights_2: (w_detail, w_consistency); counts_2: the losses' denominators (target tokens and
  pages, summed over devices). bias_V may be None. The (L_detail, L_consistency) output is for
  logging and carries no gradient.

  Why fused: the plain loss builds B x T x V float32 logits; a vocabulary-chunked loss avoids that
  but must build every chunk's logits twice (the softmax needs each row's whole log-sum-exp, and
  the backward pass needs the softmax): 4 head matmuls against 3. Here each chunk holds whole
  rows, and whole pages, so the chunk knows its rows' log-sum-exp AND its rows' full cotangent (the
  consistency term is a per-page max): the forward pass writes the logits' gradient and applies
  both gradient matmuls at once, 3 head matmuls, and at most a P x T x V block exists at a time.
  The output is one scalar, so the backward pass only scales the stored gradients.
  """
  return _fused_head_loss_fwd(h_BxTxD, weight_VxD, bias_V, task_weights_2, element_logits_BxE,
                              targets_BxT, target_mask_BxT, page_mask_B, element_token_ids_E,
                              counts_2, pages_per_chunk)[0]


def _fused_head_loss_fwd(h_BxTxD, weight_VxD, bias_V, task_weights_2, element_logits_BxE,
                         targets_BxT, target_mask_BxT, page_mask_B, element_token_ids_E,
                         counts_2, pages_per_chunk):
  b, t, d = h_BxTxD.shape
  v = weight_VxD.shape[0]
  p = chunk_pages(b, pages_per_chunk)
  r = p * t
  dtype = h_BxTxD.dtype
  # The sums' cotangent: d total / d sum_i = w_i / count_i.
  scale_2 = task_weights_2.astype(jnp.float32) / counts_2
  tag_w_ExD = weight_VxD[element_token_ids_E]

  def body(carry, chunk):
    d_weight_VxD, d_bias_V, sums_2 = carry
    h_PxTxD, elements_PxE, targets_PxT, target_mask_PxT, page_mask_P = chunk
    h_RxD, targets_R = h_PxTxD.reshape(r, d), targets_PxT.reshape(r)
    logits_RxV, lse_R, picked_R, tags_RxE = _chunk_logits(h_RxD, weight_VxD, bias_V, targets_R,
                                                          element_token_ids_E)

    def sums(lse_R, picked_R, tags_RxE, elements_PxE):
      return head_sums(*_page_terms(lse_R, picked_R, tags_RxE, p, t), elements_PxE,
                       target_mask_PxT, page_mask_P)

    chunk_sums_2, sums_vjp = jax.vjp(sums, lse_R, picked_R, tags_RxE, elements_PxE)
    g_lse_R, g_picked_R, g_tags_RxE, g_elements_PxE = sums_vjp(scale_2)
    # The logits' gradient, softmax * g_lse + g_picked at the target column, in one elementwise
    # pass; the few tag columns' share goes through their own weight rows below instead.
    cols_RxV = jax.lax.broadcasted_iota(targets_R.dtype, logits_RxV.shape, 1)
    g_RxV = (jnp.exp(logits_RxV - lse_R[:, None]) * g_lse_R[:, None]
             + jnp.where(cols_RxV == targets_R[:, None], g_picked_R[:, None], 0.0))
    g_lo_RxV = g_RxV.astype(dtype)
    d_h_RxD = (jnp.einsum('rv,vd->rd', g_lo_RxV, weight_VxD, preferred_element_type=jnp.float32)
               + jnp.einsum('re,ed->rd', g_tags_RxE, tag_w_ExD.astype(jnp.float32)))
    d_weight_VxD = d_weight_VxD + jnp.einsum('rv,rd->vd', g_lo_RxV, h_RxD,
                                             preferred_element_type=jnp.float32)
    d_weight_VxD = d_weight_VxD.at[element_token_ids_E].add(
        jnp.einsum('re,rd->ed', g_tags_RxE, h_RxD.astype(jnp.float32)))
    if d_bias_V is not None:
      d_bias_V = (d_bias_V + g_RxV.sum(axis=0)).at[element_token_ids_E].add(g_tags_RxE.sum(0))
    return (d_weight_VxD, d_bias_V, sums_2 + chunk_sums_2), (d_h_RxD.reshape(p, t, d).astype(dtype),
                                                             g_elements_PxE)

  init = (jnp.zeros((v, d), jnp.float32), None if bias_V is None else jnp.zeros((v,), jnp.float32),
          jnp.zeros((2,), jnp.float32))
  xs = tuple(_page_chunks(x, p) for x in (h_BxTxD, element_logits_BxE.astype(jnp.float32),
                                           targets_BxT, target_mask_BxT, page_mask_B))
  (d_weight_VxD, d_bias_V, sums_2), (d_h, d_elements) = jax.lax.scan(body, init, xs)
  losses_2 = sums_2 / counts_2
  total = jnp.dot(task_weights_2.astype(jnp.float32), losses_2)
  grads = (_unchunk(d_h), d_weight_VxD.astype(weight_VxD.dtype),
           None if bias_V is None else d_bias_V.astype(bias_V.dtype), losses_2,
           _unchunk(d_elements).astype(element_logits_BxE.dtype))
  return (total, jax.lax.stop_gradient(losses_2)), grads


def _fused_head_loss_bwd(pages_per_chunk, grads, cotangents):
  del pages_per_chunk
  g_total, _ = cotangents   # the losses output is for logging: its cotangent is ignored
  d_h, d_weight, d_bias, d_task_weights, d_elements = jax.tree.map(
      lambda x: (g_total * x).astype(x.dtype), grads)
  return d_h, d_weight, d_bias, d_task_weights, d_elements, None, None, None, None, None


fused_head_loss.defvjp(_fused_head_loss_fwd, _fused_head_loss_bwd)
