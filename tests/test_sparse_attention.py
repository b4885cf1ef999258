"""The attention kinds behind `attend`: dot_product, window and window_topk against the dense
reference (and a float64 numpy reference of the top-k selection), their gradients, masks, dtypes,
transforms and argument checks."""
from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phase1_jax.model import attention, sparse_attention

B, N, H = 2, 3, 8
RTOL, ATOL = 1e-5, 1e-6
STATIC = ('causal', 'kind', 'window_size', 'top_k', 'block_size')
attend = jax.jit(attention.attend, static_argnames=STATIC)
dense = jax.jit(attention.dense_attention, static_argnames=('causal', 'window_size'))
# chunk_positions small enough that most cases below run several scan steps.
window = jax.jit(sparse_attention.window_attention,
                 static_argnames=('window_size', 'block_size', 'chunk_positions'))
window_topk = jax.jit(sparse_attention.window_topk_attention,
                      static_argnames=('window_size', 'top_k', 'block_size', 'chunk_positions'))


def random_qkv(seed, t, s=None, dtype=jnp.float32, batch=B):
  rng = np.random.default_rng(seed)
  s = t if s is None else s
  shapes = ((batch, t, N, H), (batch, s, N, H), (batch, s, N, H))
  return tuple(jnp.asarray(rng.standard_normal(x).astype(np.float32), dtype) for x in shapes)


def random_kv_mask(seed, s, p_valid=0.75):
  """Random key mask; key 0 valid so that every causal query without a window sees a key."""
  mask = np.random.default_rng(seed).random((B, s)) < p_valid
  mask[:, 0] = True
  return jnp.asarray(mask)


def allowed_BxTxS(t, s, kv_mask=None, window_size=None):
  """Causal (optionally banded) visibility in numpy: query i sits at key position i + s - t."""
  dist = np.arange(t)[:, None] + s - t - np.arange(s)[None, :]
  allowed = (dist >= 0) & (dist < (window_size or s + 1))
  kv = np.ones((B, s), bool) if kv_mask is None else np.asarray(kv_mask)
  return allowed[None] & kv[:, None, :]


def masked_attention(q, k, v, allowed_BxNxTxS):
  """Dense float32 attention with an explicit visibility mask (for gradient references)."""
  scores = jnp.einsum('btnh,bsnh->bnts', q, k) / math.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(allowed_BxNxTxS, scores, -1e30), axis=-1)
  return jnp.einsum('bnts,bsnh->btnh', probs, v)


def numpy_attention(q, k, v, allowed_BxNxTxS):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  scores = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(allowed_BxNxTxS, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum('bnts,bsnh->btnh', probs / probs.sum(-1, keepdims=True), v)


def topk_allowed(q, k, kv_mask, window_size, top_k, block_size):
  """float64 numpy reference of window_topk's visibility (B x N x T x S): causal keys of the
  query block's local blocks, plus the top_k eligible blocks by <selection query, pooled key>."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  t, s, b = q.shape[1], k.shape[1], block_size
  kv = np.ones((B, s), bool) if kv_mask is None else np.asarray(kv_mask)
  n = math.ceil(s / b)
  p = min(math.ceil((window_size - 1) / b), n - 1)
  pos = np.arange(t) + s - t
  out = np.zeros((B, N, t, s), bool)
  for bi in range(B):
    counts = np.array([kv[bi, j * b:(j + 1) * b].sum() for j in range(n)])
    for ni in range(N):
      pooled = np.stack([(k[bi, j * b:(j + 1) * b, ni] * kv[bi, j * b:(j + 1) * b, None]).sum(0)
                         / max(counts[j], 1) for j in range(n)])
      for i in range(t):
        qb = pos[i] // b
        keys = np.arange(s)
        visible = (keys <= pos[i]) & (keys >= (qb - p) * b)
        # Selection query: previous block's queries and this block's first query.
        rows = [r for r in range(t) if (qb - 1) * b <= pos[r] < qb * b]
        rows.append(int(np.argmax(pos // b == qb)))
        rep = q[bi, rows, ni].mean(0)
        eligible = [j for j in range(n) if j < qb - p and counts[j] > 0]
        chosen = sorted(eligible, key=lambda j: -(pooled[j] @ rep))[:top_k]
        for j in chosen:
          visible |= keys // b == j
        out[bi, ni, i] = visible & kv[bi]
  return out


# (t, s, window, block): T not a multiple of the block, T < window, w < b, w > b, T < S.
SHAPES = [(37, 37, 5, 4), (10, 10, 30, 4), (29, 29, 3, 8), (50, 50, 17, 8), (20, 33, 7, 8)]


@pytest.mark.parametrize('t,s,w,b', SHAPES)
@pytest.mark.parametrize('use_mask', [False, True])
def test_window_equals_banded_dense(t, s, w, b, use_mask):
  q, k, v = random_qkv(t + w, t, s)
  mask = random_kv_mask(s + b, s) if use_mask else None
  out = window(q, k, v, mask, window_size=w, block_size=b, chunk_positions=2 * b)
  ref = dense(q, k, v, mask, causal=True, window_size=w)
  # Rows whose window holds no valid key are finite but unspecified (see sparse_attention).
  seen = allowed_BxTxS(t, s, mask, w).any(-1)
  chex.assert_tree_all_finite(out)
  np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(ref)[seen], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(ref, numpy_attention(q, k, v, allowed_BxTxS(t, s, mask, w)[:, None]),
                             rtol=RTOL, atol=ATOL)


def test_window_covering_the_sequence_is_causal_dense_through_attend():
  q, k, v = random_qkv(1, 21)
  mask = random_kv_mask(2, 21)
  ref = dense(q, k, v, mask, causal=True)
  for w, b in ((21, 8), (100, 4), (64, None)):
    out = attend(q, k, v, mask, causal=True, kind='window', window_size=w, block_size=b)
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('t,s,w,b', [(37, 37, 5, 4), (20, 33, 7, 8), (9, 9, 2, 16)])
def test_window_topk_with_every_block_is_causal_dense(t, s, w, b):
  q, k, v = random_qkv(t * s, t, s)
  mask = random_kv_mask(w, s)
  out = window_topk(q, k, v, mask, window_size=w, top_k=100, block_size=b, chunk_positions=2 * b)
  np.testing.assert_allclose(out, dense(q, k, v, mask, causal=True), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('t,s,w,b,top_k', [(45, 45, 6, 4, 2), (30, 41, 9, 4, 1), (40, 40, 3, 4, 0)])
def test_window_topk_matches_numpy_selection(t, s, w, b, top_k):
  q, k, v = random_qkv(7 * t + top_k, t, s)
  mask = random_kv_mask(t, s, p_valid=0.6)
  allowed = topk_allowed(q, k, mask, w, top_k, b)
  out = window_topk(q, k, v, mask, window_size=w, top_k=top_k, block_size=b, chunk_positions=8)
  seen = allowed.any(-1).transpose(0, 2, 1)
  np.testing.assert_allclose(np.asarray(out)[seen], numpy_attention(q, k, v, allowed)[seen],
                             rtol=RTOL, atol=ATOL)
  # Not trivially the causal pattern: some earlier keys stay unseen.
  assert (allowed_BxTxS(t, s, mask)[:, None] & ~allowed).any()


def test_window_topk_never_looks_ahead():
  """Outputs at positions <= t ignore every q, k, v after t, selection included."""
  t_len, w, b, top_k = 64, 5, 4, 2
  q, k, v = random_qkv(3, t_len)
  q2, k2, v2 = random_qkv(4, t_len)
  run = lambda q, k, v: window_topk(q, k, v, window_size=w, top_k=top_k, block_size=b,
                                    chunk_positions=16)
  out = run(q, k, v)
  for cut in (6, 21, 40):   # block start, mid-block, block end
    later = (jnp.arange(t_len) > cut)[None, :, None, None]
    # Future keys made very relevant (scaled up), so a look-ahead would change the selection.
    mixed = [jnp.where(later, 5 * y, x) for x, y in ((q, q2), (k, k2), (v, v2))]
    out2 = run(*mixed)
    np.testing.assert_allclose(out2[:, :cut + 1], out[:, :cut + 1], rtol=RTOL, atol=ATOL)
    assert not np.allclose(out2[:, cut + 1:], out[:, cut + 1:], atol=1e-3)


def test_gradients_match_dense_reference():
  t, w, b = 27, 6, 4
  q, k, v = random_qkv(5, t)
  mask = random_kv_mask(6, t)
  cot = random_qkv(7, t)[0]
  # Cotangent only on rows whose window holds a valid key (the others are unspecified).
  cot = cot * jnp.asarray(allowed_BxTxS(t, t, mask, w).any(-1))[..., None, None]
  grads = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cot),
                                      argnums=(0, 1, 2)))(q, k, v)
  selected = jnp.asarray(topk_allowed(q, k, mask, w, 1, b))   # selection has no gradient
  cases = [
      (lambda q, k, v: window(q, k, v, mask, window_size=w, block_size=b, chunk_positions=8),
       lambda q, k, v: dense(q, k, v, mask, causal=True, window_size=w)),
      (lambda q, k, v: window_topk(q, k, v, mask, window_size=w, top_k=9, block_size=b,
                                   chunk_positions=8),
       lambda q, k, v: dense(q, k, v, mask, causal=True)),
      (lambda q, k, v: window_topk(q, k, v, mask, window_size=w, top_k=1, block_size=b,
                                   chunk_positions=8),
       lambda q, k, v: masked_attention(q, k, v, selected)),
      (lambda q, k, v: attention.attend(q, k, v, mask, causal=True, kind='dot_product'),
       lambda q, k, v: dense(q, k, v, mask, causal=True)),
  ]
  for fn, ref_fn in cases:
    chex.assert_trees_all_close(grads(fn), grads(ref_fn), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kind,options', [('window', dict(window_size=6, block_size=4)),
                                          ('window_topk', dict(window_size=6, top_k=2,
                                                               block_size=4)),
                                          ('dot_product', {})])
def test_bfloat16_close_to_float32(kind, options):
  t = 30
  q, k, v = random_qkv(9, t)
  mask = random_kv_mask(10, t)
  ref = attend(q, k, v, mask, causal=True, kind=kind, **options)
  half = lambda x: x.astype(jnp.bfloat16)
  out = attend(half(q), half(k), half(v), mask, causal=True, kind=kind, **options)
  chex.assert_type(out, jnp.bfloat16)
  out, ref = np.asarray(out, np.float32), np.asarray(ref)
  rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert rel < 1e-2, rel
  loss = lambda q, k, v: attend(q, k, v, mask, causal=True, kind=kind, **options).astype(
      jnp.float32).sum()
  g16 = jax.grad(loss, argnums=(0, 1, 2))(half(q), half(k), half(v))
  g32 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for a, c in zip(g16, g32):
    chex.assert_type(a, jnp.bfloat16)
    a = np.asarray(a, np.float32)
    assert np.linalg.norm(a - c) / np.linalg.norm(c) < 2e-2


@pytest.mark.parametrize('kind,options', [('dense', {}), ('dot_product', {}),
                                          ('window', dict(window_size=8, block_size=4)),
                                          ('window_topk', dict(window_size=5, top_k=1,
                                                               block_size=4))])
def test_masked_keys_are_ignored(kind, options):
  t = 26
  q, k, v = random_qkv(11, t)
  mask = random_kv_mask(12, t)
  # Masked keys/values replaced by large different ones.
  k2, v2 = (jnp.where(mask[:, :, None, None], x, 100.0 * y)
            for x, y in zip((k, v), random_qkv(13, t)[1:]))
  out = attend(q, k, v, mask, causal=True, kind=kind, **options)
  np.testing.assert_allclose(attend(q, k2, v2, mask, causal=True, kind=kind, **options), out,
                             rtol=RTOL, atol=ATOL)


LENGTH_CASES = [('dense', {}, False), ('dense', {}, True), ('dot_product', {}, False),
                ('dot_product', {}, True), ('window', dict(window_size=5, block_size=4), True),
                ('window_topk', dict(window_size=4, top_k=1, block_size=4), True)]


@pytest.mark.parametrize('kind,options,causal', LENGTH_CASES)
def test_lengths_are_their_prefix_mask(kind, options, causal):
  """kv_lengths_B means the mask arange(S) < length for every kind (dot_product hands the lengths
  to jax.nn.dot_product_attention instead of a mask): same outputs and gradients."""
  t, s = (13, 13) if causal else (5, 11)
  q, k, v = random_qkv(21 + s, t, s)
  lengths = jnp.asarray([s, 4])
  mask = jnp.arange(s)[None] < lengths[:, None]
  cot = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)

  def out_and_grads(**keys):
    fn = lambda q, k, v: attend(q, k, v, causal=causal, kind=kind, **options, **keys)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) * cot)
    return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  by_lengths, by_mask = out_and_grads(kv_lengths_B=lengths), out_and_grads(kv_mask_BxS=mask)
  chex.assert_trees_all_close(by_lengths, by_mask, rtol=RTOL, atol=ATOL)
  # The lengths bite: keys past a row's length do not reach it.
  full = out_and_grads(kv_lengths_B=jnp.asarray([s, s]))[0]
  assert np.abs(np.asarray(full[1]) - np.asarray(by_lengths[0][1])).max() > 1e-3


def test_lengths_and_mask_together_or_misshapen_raise():
  q, k, v = random_qkv(3, 6)
  mask = jnp.ones((B, 6), bool)
  with pytest.raises(ValueError, match='not both'):
    attention.attend(q, k, v, mask, kv_lengths_B=jnp.asarray([6, 6]))
  with pytest.raises(ValueError, match=r'kv_lengths_B: shape \(2, 6\)'):
    attention.attend(q, k, v, kv_lengths_B=mask)


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('t,s', [(9, 9), (4, 11)])
def test_dot_product_equals_dense(causal, t, s):
  q, k, v = random_qkv(t + s, t, s)
  mask = random_kv_mask(s, s)
  for m in (None, mask):
    np.testing.assert_allclose(attend(q, k, v, m, causal=causal, kind='dot_product'),
                               dense(q, k, v, m, causal=causal), rtol=RTOL, atol=ATOL)
  if causal:
    np.testing.assert_allclose(
        attend(q, k, v, mask, causal=True, kind='dot_product', window_size=3),
        dense(q, k, v, mask, causal=True, window_size=3), rtol=RTOL, atol=ATOL)


def test_vmap_over_an_extra_axis():
  q, k, v = (x.reshape(2, 1, *x.shape[1:]) for x in random_qkv(14, 18))
  mask = random_kv_mask(15, 18).reshape(2, 1, 18)
  for kind, options in (('window', dict(window_size=5, block_size=4)),
                        ('window_topk', dict(window_size=5, top_k=1, block_size=4))):
    fn = functools.partial(attention.attend, causal=True, kind=kind, **options)
    batched = jax.jit(jax.vmap(fn))(q, k, v, mask)
    looped = jnp.stack([fn(q[i], k[i], v[i], mask[i]) for i in range(2)])
    np.testing.assert_allclose(batched, looped, rtol=RTOL, atol=ATOL)


def test_ring_buffer_window_cache_with_dense_decode():
  """How decoding uses a window: a ring buffer of the last w keys attended with non-causal dense
  and a 'slot filled' mask gives the window kind's output at that position."""
  t, w = 13, 5
  q, k, v = random_qkv(16, t)
  full = attend(q, k, v, causal=True, kind='window', window_size=w, block_size=4)
  cache_k, cache_v = jnp.zeros((B, w, N, H)), jnp.zeros((B, w, N, H))
  for pos in range(t):
    cache_k = cache_k.at[:, pos % w].set(k[:, pos])
    cache_v = cache_v.at[:, pos % w].set(v[:, pos])
    filled = jnp.broadcast_to(jnp.arange(w) <= pos, (B, w))
    out = attend(q[:, pos:pos + 1], cache_k, cache_v, filled, causal=False, kind='dense')
    np.testing.assert_allclose(out[:, 0], full[:, pos], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('kwargs,name', [
    (dict(kind='window', window_size=0), 'window_size'),
    (dict(kind='window', window_size=2.5), 'window_size'),
    (dict(kind='window', window_size=True), 'window_size'),
    (dict(kind='window'), 'window_size'),
    (dict(kind='window', window_size=4, block_size=0), 'block_size'),
    (dict(kind='window', window_size=4, top_k=2), 'top_k'),
    (dict(kind='window_topk', window_size=4), 'top_k'),
    (dict(kind='window_topk', window_size=4, top_k=-1), 'top_k'),
    (dict(kind='window', window_size=4, causal=False), 'causal'),
    (dict(kind='window_topk', window_size=4, top_k=1, causal=False), 'causal'),
    (dict(kind='dense', block_size=4), 'block_size'),
    (dict(kind='dot_product', top_k=1), 'top_k'),
    (dict(kind='dense', window_size=4, causal=False), 'window_size'),
    (dict(kind='sparse'), "'sparse'"),
])
def test_bad_arguments_raise_naming_them(kwargs, name):
  q, k, v = random_qkv(0, 4)
  kwargs = {'causal': True, **kwargs}
  with pytest.raises(ValueError, match=name):
    attention.attend(q, k, v, **kwargs)


def test_sparse_kinds_need_no_more_queries_than_keys():
  q, k, v = random_qkv(0, 5, 3)
  with pytest.raises(ValueError, match='q_BxTxNxH'):
    attention.attend(q, k, v, causal=True, kind='window', window_size=2)


def test_kind_options_pick_what_each_kind_takes():
  opts = dict(window_size=64, top_k=2, block_size=32)
  assert attention.kind_options('dense', **opts) == {}
  assert attention.kind_options('dot_product', **opts) == {}
  assert attention.kind_options('window', **opts) == dict(window_size=64, block_size=32)
  assert attention.kind_options('window_topk', **opts) == opts
  with pytest.raises(ValueError, match="'nope'"):
    attention.kind_options('nope')
  assert sparse_attention.default_block_size(1) == 16
  assert sparse_attention.default_block_size(256) == 128
