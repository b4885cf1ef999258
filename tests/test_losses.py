"""phase1_jax.losses against values computed by hand in numpy (float64)."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phase1_jax import losses

B, T, V, C, E = 2, 3, 5, 3, 2
# The open-tag token of element type e is vocabulary id ELEMENT_IDS[e].
ELEMENT_IDS = np.array([1, 3])

task_losses = jax.jit(losses.task_losses)


def make_case(seed=0):
  rng = np.random.default_rng(seed)
  outputs = {
      'detail_logits': rng.standard_normal((B, T, V)).astype(np.float32) * 2,
      'semantic_logits': rng.standard_normal((B, T, C)).astype(np.float32) * 2,
      'element_logits': rng.standard_normal((B, E)).astype(np.float32) * 2,
  }
  batch = {
      'targets': np.array([[4, 1, 2], [3, 2, 0]], np.int32),
      'target_mask': np.array([[1, 1, 1], [1, 1, 0]], bool),
      'semantic_labels': np.array([[2, 0, 0], [1, 1, 0]], np.int32),
      'semantic_mask': np.array([[1, 1, 0], [1, 0, 0]], bool),
      'element_labels': np.array([[1, 0], [0, 1]], np.float32),
  }
  return outputs, batch


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def sigmoid(x):
  return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def hand_losses(outputs, batch, pages):
  """The four losses over the pages listed in `pages`, written out elementwise."""
  lp = log_softmax(outputs['detail_logits'])
  ls = log_softmax(outputs['semantic_logits'])
  detail_sum = detail_n = sem_sum = sem_n = 0.0
  bce, cons = [], []
  for b in pages:
    for t in range(T):
      if batch['target_mask'][b, t]:
        detail_sum -= lp[b, t, batch['targets'][b, t]]
        detail_n += 1
      if batch['semantic_mask'][b, t]:
        sem_sum -= ls[b, t, batch['semantic_labels'][b, t]]
        sem_n += 1
    page_bce, page_cons = 0.0, 0.0
    for e in range(E):
      y, q = batch['element_labels'][b, e], sigmoid(outputs['element_logits'][b, e])
      page_bce += -(y * np.log(q) + (1 - y) * np.log(1 - q))
      # Max over the page's target positions of P(open tag of e).
      implied = 0.0
      for t in range(T):
        if batch['target_mask'][b, t]:
          implied = max(implied, np.exp(lp[b, t, ELEMENT_IDS[e]]))
      page_cons += (implied - q) ** 2
    bce.append(page_bce / E)
    cons.append(page_cons / E)
  return {'detail': detail_sum / detail_n, 'semantic': sem_sum / sem_n,
          'element': np.mean(bce), 'consistency': np.mean(cons)}


def test_masked_mean():
  x = jnp.asarray([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
  mask = jnp.asarray([[True, False, True], [False, False, True]])
  np.testing.assert_allclose(losses.masked_mean(x, mask), (1 + 4 + 32) / 3)
  np.testing.assert_allclose(losses.masked_mean(x, mask.astype(jnp.float32)), (1 + 4 + 32) / 3)
  # An empty mask gives 0, not NaN.
  assert float(losses.masked_mean(x, jnp.zeros_like(mask))) == 0.0
  chex.assert_type(losses.masked_mean(x.astype(jnp.bfloat16), mask), jnp.float32)


def test_task_losses_by_hand():
  outputs, batch = make_case()
  got = task_losses(outputs, batch, jnp.asarray(ELEMENT_IDS))
  want = hand_losses(outputs, batch, pages=[0, 1])
  assert set(got) == set(losses.TASKS)
  for k in losses.TASKS:
    chex.assert_shape(got[k], ())
    chex.assert_type(got[k], jnp.float32)
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
  assert all(want[k] > 0 for k in want)


def test_implied_element_probs_is_max_over_positions():
  outputs, batch = make_case(1)
  lp = jax.nn.log_softmax(jnp.asarray(outputs['detail_logits']))
  got = losses.implied_element_probs(lp[..., jnp.asarray(ELEMENT_IDS)],
                                     jnp.asarray(batch['target_mask']))
  p = np.exp(log_softmax(outputs['detail_logits']))[..., ELEMENT_IDS]   # B x T x E
  m = batch['target_mask'][..., None]
  want = np.max(np.where(m, p, 0.0), axis=1)
  chex.assert_shape(got, (B, E))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_page_mask_excludes_a_page_from_every_term():
  outputs, batch = make_case(2)
  batch = {**batch, 'page_mask': np.array([True, False])}
  got = task_losses(outputs, batch, jnp.asarray(ELEMENT_IDS))
  want = hand_losses(outputs, batch, pages=[0])
  for k in losses.TASKS:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
  # Whatever the masked page holds, nothing changes.
  rng = np.random.default_rng(3)
  outputs2 = {k: v.copy() for k, v in outputs.items()}
  for v in outputs2.values():
    v[1] = 5 * rng.standard_normal(v[1].shape)
  batch2 = {k: v.copy() for k, v in batch.items()}
  batch2['targets'][1] = [0, 0, 1]
  batch2['element_labels'][1] = 1 - batch2['element_labels'][1]
  got2 = task_losses(outputs2, batch2, jnp.asarray(ELEMENT_IDS))
  chex.assert_trees_all_close(got2, got, rtol=1e-6)
  # ... while without the page mask page 1 does count.
  unmasked = task_losses(outputs, {k: v for k, v in batch.items() if k != 'page_mask'},
                         jnp.asarray(ELEMENT_IDS))
  for k in losses.TASKS:
    assert abs(float(unmasked[k]) - float(got[k])) > 1e-4, k


def test_task_losses_float32_from_bfloat16_logits():
  outputs, batch = make_case(4)
  outputs16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in outputs.items()}
  got = task_losses(outputs16, batch, jnp.asarray(ELEMENT_IDS))
  want = hand_losses({k: np.asarray(v, np.float32) for k, v in outputs16.items()}, batch, [0, 1])
  for k in losses.TASKS:
    chex.assert_type(got[k], jnp.float32)
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)


LOSSES = {'detail': 2.5, 'semantic': 1.25, 'element': 0.75, 'consistency': 0.125}
WEIGHTS = {'detail': 0.4, 'semantic': 0.3, 'element': 0.2, 'consistency': 0.1}


def test_combine_fixed_is_weighted_sum():
  task = {k: jnp.float32(v) for k, v in LOSSES.items()}
  weights = {'detail': 0.5, 'semantic': 0.25, 'element': 2.0, 'consistency': 4.0}
  total, w = losses.combine(task, weighting='fixed', weights=weights)
  np.testing.assert_allclose(total, 0.5 * 2.5 + 0.25 * 1.25 + 2.0 * 0.75 + 4.0 * 0.125, rtol=1e-6)
  chex.assert_type(total, jnp.float32)
  for k in losses.TASKS:
    np.testing.assert_allclose(w[k], weights[k])
    chex.assert_type(w[k], jnp.float32)


S = np.array([0.5, -1.0, 2.0, 0.0], np.float32)


def test_combine_uncertainty_formula():
  task = {k: jnp.float32(v) for k, v in LOSSES.items()}
  total, w = losses.combine(task, weighting='uncertainty', weights=WEIGHTS,
                            log_vars_4=jnp.asarray(S))
  l = np.array([LOSSES[k] for k in losses.TASKS])
  np.testing.assert_allclose(total, np.sum(np.exp(-S) * l + S / 2), rtol=1e-6)
  chex.assert_type(total, jnp.float32)
  for i, k in enumerate(losses.TASKS):
    np.testing.assert_allclose(w[k], np.exp(-S[i]), rtol=1e-6)
    chex.assert_type(w[k], jnp.float32)


def test_uncertainty_gradient_wrt_log_vars():
  task = {k: jnp.float32(v) for k, v in LOSSES.items()}
  grad = jax.grad(lambda s: losses.combine(task, weighting='uncertainty', weights=WEIGHTS,
                                           log_vars_4=s)[0])(jnp.asarray(S))
  chex.assert_tree_all_finite(grad)
  chex.assert_type(grad, jnp.float32)
  l = np.array([LOSSES[k] for k in losses.TASKS])
  np.testing.assert_allclose(grad, -np.exp(-S) * l + 0.5, rtol=1e-6)


def test_combine_unknown_weighting():
  with pytest.raises(ValueError, match="'x'"):
    losses.combine(LOSSES, weighting='x', weights=WEIGHTS)


@pytest.mark.parametrize('weighting', ['fixed', 'uncertainty'])
def test_multitask_loss_aux(weighting):
  outputs, batch = make_case(5)
  total, aux = jax.jit(lambda o, b, s: losses.multitask_loss(
      o, b, element_token_ids_E=jnp.asarray(ELEMENT_IDS), weighting=weighting, weights=WEIGHTS,
      log_vars_4=s))(outputs, batch, jnp.asarray(S))
  want = hand_losses(outputs, batch, [0, 1])
  w = ({k: WEIGHTS[k] for k in losses.TASKS} if weighting == 'fixed'
       else {k: np.exp(-S[i]) for i, k in enumerate(losses.TASKS)})
  extra = 0.0 if weighting == 'fixed' else S.sum() / 2
  np.testing.assert_allclose(total, sum(w[k] * want[k] for k in losses.TASKS) + extra, rtol=1e-5)
  np.testing.assert_allclose(aux['loss'], total)
  for k in losses.TASKS:
    np.testing.assert_allclose(aux[f'loss_{k}'], want[k], rtol=1e-5)
    np.testing.assert_allclose(aux[f'weight_{k}'], w[k], rtol=1e-6)
  for v in jax.tree.leaves(aux):
    chex.assert_type(v, jnp.float32)


# Vocabulary-chunked detail cross-entropy: the same losses and gradients as full logits.
CB, CT, CD, CV = 2, 5, 8, 37      # 37 = 4 chunks of 10 with 3 padded rows in the last


def chunked_case(seed, bias):
  rng = np.random.default_rng(seed)
  outputs, batch = make_case(seed)
  batch = {**batch, 'targets': rng.integers(0, CV, (CB, CT)).astype(np.int32),
           'target_mask': rng.random((CB, CT)) < 0.7, 'semantic_labels': np.zeros((CB, CT), int),
           'semantic_mask': np.ones((CB, CT), bool)}
  batch['target_mask'][:, 0] = True
  outputs = {'semantic_logits': rng.standard_normal((CB, CT, C)).astype(np.float32),
             'element_logits': outputs['element_logits'],
             'detail_hidden': rng.standard_normal((CB, CT, CD)).astype(np.float32),
             'detail_weight': rng.standard_normal((CV, CD)).astype(np.float32)}
  if bias:
    outputs['detail_bias'] = rng.standard_normal((CV,)).astype(np.float32)
  return outputs, batch


def as_full_logits(outputs):
  full = {k: v for k, v in outputs.items() if not k.startswith('detail_')}
  logits = jnp.einsum('btd,vd->btv', outputs['detail_hidden'], outputs['detail_weight'])
  full['detail_logits'] = logits + outputs.get('detail_bias', 0.0)
  return full


@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('chunk', [0, 10, 16, 37, 64])   # 0: whole logits built by the loss
def test_chunked_detail_loss_equals_full_logits(bias, chunk):
  outputs, batch = chunked_case(6, bias)
  weights = dict(WEIGHTS)

  def total(outs, chunk_size):
    return losses.multitask_loss(outs, batch, element_token_ids_E=jnp.asarray(ELEMENT_IDS),
                                 weighting='fixed', weights=weights,
                                 vocab_chunk_size=chunk_size)[0]

  diff_keys = [k for k in outputs if k.startswith('detail_')]
  grad_chunked = jax.jit(jax.value_and_grad(
      lambda d: total({**outputs, **d}, chunk)))
  grad_full = jax.jit(jax.value_and_grad(
      lambda d: total(as_full_logits({**outputs, **d}), 0)))
  params = {k: jnp.asarray(outputs[k]) for k in diff_keys}
  (l_c, g_c), (l_f, g_f) = grad_chunked(params), grad_full(params)
  np.testing.assert_allclose(l_c, l_f, rtol=1e-5)
  chex.assert_trees_all_close(g_c, g_f, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(g_c['detail_weight']).max()) > 0
  # Each task term separately as well (the consistency term reads p(open tag) via the lse).
  got = losses.task_losses(outputs, batch, jnp.asarray(ELEMENT_IDS), chunk)
  want = losses.task_losses(as_full_logits(outputs), batch, jnp.asarray(ELEMENT_IDS))
  chex.assert_trees_all_close(got, want, rtol=1e-5)


def test_chunked_logsumexp_matches_and_is_stable():
  rng = np.random.default_rng(7)
  h = jnp.asarray(rng.standard_normal((6, CD)).astype(np.float32)) * 30   # large logits
  w = jnp.asarray(rng.standard_normal((CV, CD)).astype(np.float32))
  got = losses.chunked_logsumexp(h, w, chunk_size=8)
  chex.assert_shape(got, (6,))
  chex.assert_tree_all_finite(got)
  np.testing.assert_allclose(got, jax.nn.logsumexp(h @ w.T, axis=-1), rtol=1e-6)


def test_chunked_loss_gradient_never_holds_full_logits():
  """XLA's compiled memory of loss+gradient: chunked stays far below one N x V float32 array."""
  n, d, v, chunk = 512, 16, 8192, 256
  h = jax.ShapeDtypeStruct((1, n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((v, d), jnp.float32)
  tgt = jax.ShapeDtypeStruct((1, n), jnp.int32)

  def detail_loss(h, w, t, chunk_size):
    outs = {'detail_hidden': h, 'detail_weight': w}
    if chunk_size == 0:
      outs = {'detail_logits': jnp.einsum('btd,vd->btv', h, w)}
    nll, tags = losses.detail_terms(outs, t, jnp.asarray(ELEMENT_IDS), chunk_size)
    return nll.mean() + tags.mean()

  def temp_bytes(chunk_size):
    f = jax.jit(jax.grad(lambda h, w, t: detail_loss(h, w, t, chunk_size), argnums=(0, 1)))
    return f.lower(h, w, tgt).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = n * v * 4
  chunked, full = temp_bytes(chunk), temp_bytes(0)
  assert full >= logits_bytes
  assert chunked < logits_bytes / 4, (chunked, logits_bytes)


def test_logsumexp_and_pick_match_autodiff_with_gradients():
  """The one-pass backward gives autodiff's gradient of logsumexp + a gather, with large logits
  (stability) and targets on the first and last columns."""
  rng = np.random.default_rng(17)
  n, v = 6, 11
  logits = jnp.asarray(rng.standard_normal((n, v)) * 30, jnp.float32)
  ids = jnp.asarray(np.r_[0, v - 1, rng.integers(0, v, n - 2)], jnp.int32)
  g_lse, g_pick = (jnp.asarray(rng.standard_normal(n), jnp.float32) for _ in range(2))

  def reference(logits):
    return (jax.nn.logsumexp(logits, axis=-1),
            jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0])

  def pull(f):
    out, vjp = jax.vjp(f, logits)
    return out, vjp((g_lse, g_pick))[0]

  (lse, picked), grad = jax.jit(lambda: pull(lambda x: losses.logsumexp_and_pick(x, ids)))()
  (ref_lse, ref_picked), ref_grad = pull(reference)
  chex.assert_shape((lse, picked, grad), ((n,), (n,), (n, v)))
  chex.assert_type((lse, picked, grad), jnp.float32)
  chex.assert_tree_all_finite((lse, grad))
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)
  np.testing.assert_allclose(picked, ref_picked, rtol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_logsumexp_one_pass_matches_and_is_stable():
  """The GPU's one-read logsumexp: large logits (no overflow), -inf entries, a V not a power of
  two."""
  rng = np.random.default_rng(23)
  x = rng.standard_normal((7, 1001)).astype(np.float32) * 40
  x[0, :500] = -np.inf
  got = jax.jit(losses.logsumexp_one_pass)(jnp.asarray(x))
  chex.assert_shape(got, (7,))
  chex.assert_type(got, jnp.float32)
  chex.assert_tree_all_finite(got)
  np.testing.assert_allclose(got, jax.nn.logsumexp(jnp.asarray(x), axis=-1), rtol=1e-6)


def test_detail_terms_from_states_match_log_softmax_with_gradients():
  """Training's form (states + weights, whole logits) against log_softmax and gathers of the
  explicit logits, values and gradients, with a target that is also a tag column and a tag id
  listed twice (both cotangents must land on its weight row)."""
  rng = np.random.default_rng(19)
  b, t, d, v = 2, 3, 8, 13
  h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((v, d)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(v), jnp.float32)
  targets = jnp.asarray(np.r_[4, rng.integers(0, v, b * t - 1)].reshape(b, t), jnp.int32)
  tag_ids = jnp.asarray([4, 7, 2, 7], jnp.int32)
  g_nll, g_tags = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, t), (b, t, 4)))

  def reference(h, w, bias):
    lp = jax.nn.log_softmax(jnp.einsum('btd,vd->btv', h, w) + bias)
    return -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0], lp[..., tag_ids]

  def ours(h, w, bias):
    outs = {'detail_hidden': h, 'detail_weight': w, 'detail_bias': bias}
    return losses.detail_terms(outs, targets, tag_ids)

  def pull(f):
    out, vjp = jax.vjp(f, h, w, bias)
    return out, vjp((g_nll, g_tags))

  got, want = jax.jit(lambda: pull(ours))(), pull(reference)
  chex.assert_shape(got[0], ((b, t), (b, t, 4)))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
