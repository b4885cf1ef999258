"""phase1_jax.losses and phase1_jax.detail_loss against values computed by hand in numpy (float64)
and against plain autodiff."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phase1_jax import detail_loss, losses

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
  got = detail_loss.implied_element_probs(lp[..., jnp.asarray(ELEMENT_IDS)],
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


# The chunked detail loss (logits_chunk_pages > 0, detail_loss.fused_head_loss): the same losses and
# gradients as the plain loss over explicit logits.
CB, CT, CD, CV, CE = 6, 5, 8, 37, 3
CHUNK_IDS = np.array([1, 3, 36])   # the last vocabulary row is a tag too


def chunked_case(seed, bias, scale=1.0):
  """Six pages of states and head weights: page 3 is padding (page_mask False), page 4 has no
  target tokens, page 0's first target is a tag id."""
  rng = np.random.default_rng(seed)
  outputs = {'detail_hidden': rng.standard_normal((CB, CT, CD)).astype(np.float32) * scale,
             'detail_weight': rng.standard_normal((CV, CD)).astype(np.float32),
             'semantic_logits': rng.standard_normal((CB, CT, C)).astype(np.float32),
             'element_logits': rng.standard_normal((CB, CE)).astype(np.float32) * 2}
  if bias:
    outputs['detail_bias'] = rng.standard_normal((CV,)).astype(np.float32)
  batch = {'targets': rng.integers(0, CV, (CB, CT)).astype(np.int32),
           'target_mask': rng.random((CB, CT)) < 0.7,
           'semantic_labels': rng.integers(0, C, (CB, CT)).astype(np.int32),
           'semantic_mask': rng.random((CB, CT)) < 0.8,
           'element_labels': (rng.random((CB, CE)) < 0.5).astype(np.float32),
           'page_mask': np.array([1, 1, 1, 0, 1, 1], bool)}
  batch['target_mask'][:, 0] = True
  batch['target_mask'][4] = False
  batch['targets'][0, 0] = CHUNK_IDS[1]
  return outputs, batch


def as_full_logits(outputs):
  full = {k: v for k, v in outputs.items() if not k.startswith('detail_')}
  logits = jnp.einsum('btd,vd->btv', outputs['detail_hidden'], outputs['detail_weight'])
  bias = outputs.get('detail_bias')
  full['detail_logits'] = logits if bias is None else logits + bias[None, None, :]
  return full


def chunked_total(diff, outputs, batch, weighting, pages, axis_name=None):
  """(total, aux) of multitask_loss with `diff` (outputs and log_vars) differentiable; pages 0:
  the plain loss over explicit B x T x V logits, the reference."""
  outs = {**outputs, **diff['outputs']}
  if pages == 0:
    outs = as_full_logits(outs)
  return losses.multitask_loss(outs, batch, element_token_ids_E=jnp.asarray(CHUNK_IDS),
                               weighting=weighting, weights=WEIGHTS, log_vars_4=diff['s'],
                               logits_chunk_pages=pages, axis_name=axis_name)


chunked_grad = jax.jit(jax.value_and_grad(chunked_total, has_aux=True),
                       static_argnames=('weighting', 'pages'))


def differentiable(outputs):
  return {'outputs': {k: jnp.asarray(v) for k, v in outputs.items() if k != 'semantic_logits'},
          's': jnp.asarray(S)}


@pytest.mark.parametrize('weighting', ['fixed', 'uncertainty'])
@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('pages', [1, 2, 4, 6])   # 4 -> 3, a divisor of the 6 pages
def test_chunked_loss_equals_full_logits_with_gradients(bias, weighting, pages):
  """Total, every task loss, and the gradients of the states, head weights (and bias), element
  logits and log-variances."""
  outputs, batch = chunked_case(pages + 10 * bias, bias)
  diff = differentiable(outputs)
  (total, aux), grads = chunked_grad(diff, outputs, batch, weighting=weighting, pages=pages)
  (want_total, want_aux), want_grads = chunked_grad(diff, outputs, batch, weighting=weighting,
                                                    pages=0)
  chex.assert_trees_all_close(aux, want_aux, rtol=1e-5)
  np.testing.assert_allclose(total, want_total, rtol=1e-5)
  chex.assert_trees_all_equal_shapes_and_dtypes(grads, want_grads)
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-6)
  for name in ('detail_hidden', 'detail_weight', 'element_logits'):
    assert float(jnp.abs(grads['outputs'][name]).max()) > 0, name
  if weighting == 'uncertainty':
    assert float(jnp.abs(grads['s']).min()) > 0


def test_chunked_loss_is_stable_with_large_logits():
  outputs, batch = chunked_case(3, bias=True, scale=30.0)   # logits in the hundreds
  diff = differentiable(outputs)
  (_, aux), grads = chunked_grad(diff, outputs, batch, weighting='fixed', pages=2)
  (_, want_aux), want_grads = chunked_grad(diff, outputs, batch, weighting='fixed', pages=0)
  chex.assert_tree_all_finite((aux, grads))
  assert float(aux['loss_detail']) > 10
  chex.assert_trees_all_close(aux, want_aux, rtol=1e-5)
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-5)


def test_chunked_loss_over_a_device_axis_sums_to_one_device():
  """With axis_name (here a vmap over 2 'devices' of 3 pages, the token counts differing), the
  per-device totals and gradients sum to the one-device loss and gradient."""
  outputs, batch = chunked_case(5, bias=False)
  diff = differentiable(outputs)
  split = lambda x: jnp.reshape(x, (2, CB // 2, *np.shape(x)[1:]))
  batched = ('detail_hidden', 'element_logits')   # the rest: the head's weights, log_vars
  axes = {'outputs': {k: 0 if k in batched else None for k in diff['outputs']}, 's': None}
  local = {'outputs': {k: split(v) if k in batched else v for k, v in diff['outputs'].items()},
           's': diff['s']}
  per_device = jax.vmap(
      lambda d, o, b: jax.value_and_grad(chunked_total, has_aux=True)(
          d, o, b, 'uncertainty', 2, axis_name='devices'),
      in_axes=(axes, 0, 0), axis_name='devices')
  (totals, _), grads = jax.jit(per_device)(
      local, {'semantic_logits': split(outputs['semantic_logits'])}, jax.tree.map(split, batch))
  (want_total, _), want = chunked_grad(diff, outputs, batch, weighting='uncertainty', pages=0)
  np.testing.assert_allclose(totals.sum(), want_total, rtol=1e-5)
  np.testing.assert_allclose(grads['outputs']['detail_hidden'].reshape(CB, CT, CD),
                             want['outputs']['detail_hidden'], rtol=1e-4, atol=1e-6)
  for name in ('detail_weight', 'element_logits'):
    got = grads['outputs'][name]
    got = got.sum(0) if name == 'detail_weight' else got.reshape(CB, CE)
    np.testing.assert_allclose(got, want['outputs'][name], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads['s'].sum(0), want['s'], rtol=1e-5)


def test_chunked_loss_in_bfloat16_matches_float32():
  """bfloat16 states and head weights (compute dtype): gradients come back in bfloat16, close to
  the float32 loss's; the losses themselves are float32."""
  outputs, batch = chunked_case(7, bias=False)
  diff = differentiable(outputs)
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 and x.shape[-1] == CD
                      else x, diff)
  (_, aux), grads = chunked_grad(half, outputs, batch, weighting='fixed', pages=2)
  (_, want_aux), want = chunked_grad(diff, outputs, batch, weighting='fixed', pages=0)
  chex.assert_type(grads['outputs']['detail_weight'], jnp.bfloat16)
  chex.assert_type(aux['loss_detail'], jnp.float32)
  chex.assert_trees_all_close(aux, want_aux, rtol=3e-2)
  for name in ('detail_hidden', 'detail_weight'):
    got, ref = (np.asarray(g['outputs'][name], np.float32) for g in (grads, want))
    assert np.abs(got - ref).max() <= 3e-2 * np.abs(ref).max(), name


@pytest.mark.parametrize('pages', [1, 4])   # 4 -> 3
def test_chunked_detail_terms_for_evaluation_equal_full_logits(pages):
  """Evaluation's chunked form: the NLL, the tags' log-probabilities and the argmax token of the
  explicit logits."""
  outputs, batch = chunked_case(11, bias=True)
  full = as_full_logits(outputs)
  ids = jnp.asarray(CHUNK_IDS)
  nll, tags, argmax = jax.jit(detail_loss.chunked_detail_terms, static_argnums=5)(
      outputs['detail_hidden'], outputs['detail_weight'], outputs['detail_bias'],
      batch['targets'], ids, pages)
  want_nll, want_tags = detail_loss.detail_terms(full, batch['targets'], ids)
  chex.assert_shape((nll, tags, argmax), ((CB, CT), (CB, CT, len(CHUNK_IDS)), (CB, CT)))
  chex.assert_type((nll, tags, argmax), (jnp.float32, jnp.float32, jnp.int32))
  np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tags, want_tags, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(argmax, jnp.argmax(full['detail_logits'], axis=-1))


def test_chunked_detail_terms_never_hold_full_logits():
  b, t, d, v = 8, 64, 16, 8192
  args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((v, d), jnp.float32),
          None, jax.ShapeDtypeStruct((b, t), jnp.int32), jnp.asarray(CHUNK_IDS))
  compiled = jax.jit(detail_loss.chunked_detail_terms, static_argnums=(2, 5)).lower(
      *args, 1).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < b * t * v * 4 / 4


def test_chunked_loss_gradient_never_holds_full_logits():
  """XLA's compiled memory of loss + gradient: with one page at a time it stays far below one
  B x T x V float32 array, which the plain loss needs several of."""
  b, t, d, v, e = 8, 64, 16, 8192, 3
  outputs = {'detail_hidden': jax.ShapeDtypeStruct((b, t, d), jnp.float32),
             'detail_weight': jax.ShapeDtypeStruct((v, d), jnp.float32),
             'element_logits': jax.ShapeDtypeStruct((b, e), jnp.float32),
             'semantic_logits': jax.ShapeDtypeStruct((b, t, C), jnp.float32)}
  batch = {'targets': jax.ShapeDtypeStruct((b, t), jnp.int32),
           'target_mask': jax.ShapeDtypeStruct((b, t), bool),
           'semantic_labels': jax.ShapeDtypeStruct((b, t), jnp.int32),
           'semantic_mask': jax.ShapeDtypeStruct((b, t), bool),
           'element_labels': jax.ShapeDtypeStruct((b, e), jnp.float32)}

  def temp_bytes(pages):
    def loss(h, w, outs, batch):
      return losses.multitask_loss(
          {**outs, 'detail_hidden': h, 'detail_weight': w}, batch,
          element_token_ids_E=jnp.asarray(CHUNK_IDS), weighting='fixed', weights=WEIGHTS,
          logits_chunk_pages=pages)[0]
    f = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return f.lower(outputs['detail_hidden'], outputs['detail_weight'], outputs,
                   batch).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = b * t * v * 4
  chunked, full = temp_bytes(1), temp_bytes(0)
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

  (lse, picked), grad = jax.jit(lambda: pull(lambda x: detail_loss.logsumexp_and_pick(x, ids)))()
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
  got = jax.jit(detail_loss.logsumexp_one_pass)(jnp.asarray(x))
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
    lp = jax.nn.log_softmax(jnp.einsum('btd,vd->btv', h, w) + bias[None, None, :])
    return -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0], lp[..., tag_ids]

  def ours(h, w, bias):
    outs = {'detail_hidden': h, 'detail_weight': w, 'detail_bias': bias}
    return detail_loss.detail_terms(outs, targets, tag_ids)

  def pull(f):
    out, vjp = jax.vjp(f, h, w, bias)
    return out, vjp((g_nll, g_tags))

  got, want = jax.jit(lambda: pull(ours))(), pull(reference)
  chex.assert_shape(got[0], ((b, t), (b, t, 4)))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_patch_label_loss_matches_a_numpy_reference():
  """Per part (section, element type): cross-entropy with class 0 = none (label -1), patches
  unlabelled (-2), masked or on padding pages not counted; the logits are in the model's order
  (valid patches first), the labels in the batch's."""
  rng = np.random.default_rng()
  b, p, c, e = 3, 7, 4, 5
  logits = rng.standard_normal((b, p, c + e + 2)).astype(np.float32)
  labels = np.stack([rng.integers(-2, c, (b, p)), rng.integers(-2, e, (b, p))], -1)
  mask = rng.random((b, p)) < 0.7
  mask[:, 0] = True
  page_mask = np.array([True, True, False])
  got = losses.patch_label_loss(jnp.asarray(logits), jnp.asarray(labels, jnp.int32),
                                jnp.asarray(mask), jnp.asarray(page_mask), c)
  parts = []
  for lo, hi, k in ((0, c + 1, 0), (c + 1, c + e + 2, 1)):
    nll = []
    for i in range(b):
      order = np.argsort(~mask[i], kind='stable')   # valid patches first
      for j in range(p):
        label = labels[i, order[j], k]
        if not (page_mask[i] and j < mask[i].sum() and label >= -1):
          continue
        z = logits[i, j, lo:hi].astype(np.float64)
        nll.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[label + 1])
    parts.append(np.mean(nll))
  np.testing.assert_allclose(float(got), 0.5 * sum(parts), rtol=1e-5)
