"""The sparse kinds' implementation choice (sparse_dispatch.implementation's table, on CPU for any
backend) and the wired kernel paths: `attend(kind='window'/'window_topk')` under
force_implementation('pallas' | 'splash') runs the interpret-mode Pallas (GPU) or splash (TPU)
kernels and equals dense_attention / the XLA kind with the same mask (outputs and gradients).
The GPU tests (skipped elsewhere) check what a GPU runs and that it matches."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phase1_jax.model import attention, sparse_attention, sparse_dispatch

BF16, F32 = jnp.bfloat16, jnp.float32
LONG = sparse_dispatch.FUSED_DENSE_MAX_T + 1
SHORT = sparse_dispatch.FUSED_DENSE_MAX_T


def choice(kind='window', *, t=LONG, s=None, head_dim=64, dtype=BF16, window_size=512,
           block_size=128, top_k=8, key_lengths=True, backend='gpu'):
  return sparse_dispatch.implementation(
      kind, t=t, s=t if s is None else s, head_dim=head_dim, dtype=dtype,
      window_size=window_size, block_size=block_size, top_k=top_k, key_lengths=key_lengths,
      backend=backend)


# (arguments differing from choice()'s defaults, expected implementation)
TABLE = [
    ({}, 'pallas'),
    ({'kind': 'window_topk'}, 'pallas'),
    ({'dtype': F32}, 'pallas'),
    ({'backend': 'cpu'}, 'xla'),
    ({'backend': 'cpu', 'kind': 'window_topk'}, 'xla'),
    # A TPU: splash for self-attention with lengths, at any T (no short-T fallback).
    ({'backend': 'tpu'}, 'splash'),
    ({'backend': 'tpu', 't': SHORT}, 'splash'),
    ({'backend': 'tpu', 't': 256, 'dtype': F32}, 'splash'),
    ({'backend': 'tpu', 'head_dim': 256}, 'splash'),         # a whole-dim block: any head dim
    ({'backend': 'tpu', 'block_size': 100}, 'splash'),       # window's tiles are its own
    ({'backend': 'tpu', 'kind': 'window_topk'}, 'splash'),
    ({'backend': 'tpu', 'kind': 'window_topk', 't': 256, 'block_size': 256}, 'splash'),
    ({'backend': 'tpu', 'kind': 'window_topk', 'block_size': 64}, 'xla'),   # not 128 lanes
    ({'backend': 'tpu', 's': LONG + 64}, 'xla'),
    ({'backend': 'tpu', 'key_lengths': False}, 'xla'),
    ({'backend': 'tpu', 'kind': 'window_topk', 'key_lengths': False}, 'xla'),
    ({'s': LONG + 64}, 'xla'),                            # queries after a prefix
    ({'t': 1, 's': LONG}, 'xla'),                         # one decoding position
    ({'key_lengths': False}, 'xla'),                      # a key mask tensor
    ({'head_dim': 8}, 'xla'),                             # Triton's dot needs 16
    ({'head_dim': 256}, 'xla'),
    ({'head_dim': 24}, 'pallas'),                         # zero-padded to 32
    ({'block_size': 100}, 'pallas'),                      # window's tiles are its own
    ({'kind': 'window_topk', 'block_size': 100}, 'xla'),  # topk's blocks are the selection's
    ({'kind': 'window_topk', 'block_size': 8}, 'xla'),
    # T <= FUSED_DENSE_MAX_T: cuDNN with the same mask where it can express it.
    ({'t': SHORT}, 'cudnn'),
    ({'t': 256, 'key_lengths': False}, 'cudnn'),
    ({'t': SHORT, 'dtype': F32}, 'xla'),                  # cuDNN takes half precision only
    ({'t': SHORT, 'head_dim': 12}, 'xla'),                # nor this head dim
    ({'t': SHORT, 'kind': 'window_topk'}, 'xla'),         # top 8 of 11 blocks: no cuDNN mask
    ({'t': SHORT, 'kind': 'window_topk', 'top_k': 11}, 'cudnn'),   # every block: causal
    ({'t': 1024, 'kind': 'window_topk'}, 'cudnn'),        # 8 blocks, 3 selectable
]


@pytest.mark.parametrize('changes,expected', TABLE)
def test_decision_table(changes, expected):
  assert choice(**changes) == expected


def test_forced_pallas_wherever_the_kernels_take_the_call():
  with sparse_dispatch.force_pallas():   # force_implementation('pallas')
    assert choice(backend='cpu', t=64) == 'pallas'
    assert choice(backend='cpu', t=64, kind='window_topk', block_size=16) == 'pallas'
    assert choice(backend='cpu', t=64, head_dim=8) == 'xla'
    assert choice(backend='cpu', t=64, s=80) == 'xla'
    assert choice(backend='cpu', t=64, key_lengths=False) == 'xla'
    assert choice(backend='tpu', t=64) == 'pallas'
  assert choice(backend='cpu', t=64) == 'xla'


def test_forced_splash_wherever_splash_takes_the_call():
  with sparse_dispatch.force_implementation('splash'):
    assert choice(backend='cpu', t=64) == 'splash'
    assert choice(backend='gpu', t=SHORT) == 'splash'
    assert choice(backend='cpu', t=64, head_dim=8, block_size=12) == 'splash'
    assert choice(backend='cpu', kind='window_topk', block_size=256) == 'splash'
    assert choice(backend='cpu', kind='window_topk', block_size=16) == 'xla'
    assert choice(backend='cpu', t=64, s=80) == 'xla'
    assert choice(backend='cpu', t=64, key_lengths=False) == 'xla'
    with sparse_dispatch.force_implementation('pallas'):   # the innermost one holds
      assert choice(backend='cpu', t=64) == 'pallas'
    assert choice(backend='cpu', t=64) == 'splash'
  assert choice(backend='cpu', t=64) == 'xla'
  with pytest.raises(ValueError, match='cudnn'):
    with sparse_dispatch.force_implementation('cudnn'):
      pass


def test_selects_every_block():
  # 10 blocks of 16, window 20 -> 2 local blocks before its own: 7 selectable.
  assert sparse_dispatch.selects_every_block(160, 20, 7, 16)
  assert not sparse_dispatch.selects_every_block(160, 20, 6, 16)
  assert sparse_dispatch.selects_every_block(16, 20, 0, 16)


B, N, H = 2, 2, 16


def inputs(t, dtype=F32, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((B, t, N, H)), dtype) for _ in range(4))


def out_and_grads(attend, q, k, v, cotangent):
  out, vjp = jax.vjp(attend, q, k, v)
  return out, vjp(cotangent)


def runs_pallas(attend, q, k, v):
  return 'pallas_call' in str(jax.make_jaxpr(attend)(q, k, v))


def runs_kernel(impl, attend, q, k, v):
  """A pallas_call of `impl` runs: splash's (splash_mha_*) or the Pallas GPU kernels'."""
  text = str(jax.make_jaxpr(attend)(q, k, v))
  return 'pallas_call' in text and ('splash_mha' in text) == (impl == 'splash')


# (implementation, kind, options, T, lengths). Pallas: T not a multiple of the 64-position
# tiles; splash: T not a multiple of its 128 blocks, a window above the block, window's
# block_size (ignored: its tiles are its own). Lengths < T (window: rows past length - 1 +
# window see no key and get dense's mean of all values) and 0.
CASES = [
    ('pallas', 'window', dict(window_size=37), 100, (100, 41)),
    ('pallas', 'window', dict(window_size=5, block_size=12), 70, (0, 70)),
    # top_k covers every block: window_topk is causal dense.
    ('pallas', 'window_topk', dict(window_size=20, top_k=8, block_size=16), 100, (100, 57)),
    ('splash', 'window', dict(window_size=37), 300, (300, 100)),
    ('splash', 'window', dict(window_size=200, block_size=12), 256, (0, 256)),
    # 3 blocks of 128, one local block before its own: top 1 is every block, causal dense.
    ('splash', 'window_topk', dict(window_size=20, top_k=1, block_size=128), 384, (384, 200)),
]


@pytest.mark.parametrize('impl,kind,options,t,lengths', CASES)
def test_forced_kernel_through_attend_equals_dense(impl, kind, options, t, lengths):
  q, k, v, cotangent = inputs(t, seed=t)
  lengths = jnp.asarray(lengths, jnp.int32)
  spec = attention.AttentionSpec.of(kind, **{'top_k': None, 'block_size': None, **options})
  with sparse_dispatch.force_implementation(impl):
    wired = lambda q, k, v: spec(q, k, v, kv_lengths_B=lengths, causal=True)
    assert runs_kernel(impl, wired, q, k, v)
    got = jax.jit(functools.partial(out_and_grads, wired))(q, k, v, cotangent)
  window = options['window_size'] if kind == 'window' else None
  dense = lambda q, k, v: attention.dense_attention(
      q, k, v, attention.prefix_mask(lengths, t), causal=True, window_size=window)
  want = jax.jit(functools.partial(out_and_grads, dense))(q, k, v, cotangent)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


# (implementation, T, block_size, top_k, lengths): top_k below the selectable blocks (Pallas: 2
# of 3 at the last query block; splash: 1 of 2), so the selection matters; every row sees a key.
TOPK_CASES = [('pallas', 96, 16, 2, (96, 70)), ('splash', 512, 128, 1, (512, 300))]


@pytest.mark.parametrize('impl,t,block_size,top_k,lengths', TOPK_CASES)
def test_forced_kernel_window_topk_equals_the_xla_kind(impl, t, block_size, top_k, lengths):
  options = dict(window_size=20, top_k=top_k, block_size=block_size)
  q, k, v, cotangent = inputs(t, seed=5)
  lengths = jnp.asarray(lengths, jnp.int32)
  run = lambda q, k, v: attention.attend(q, k, v, kv_lengths_B=lengths, causal=True,
                                         kind='window_topk', **options)
  with sparse_dispatch.force_implementation(impl):
    assert runs_kernel(impl, run, q, k, v)
    got = jax.jit(functools.partial(out_and_grads, run))(q, k, v, cotangent)
  reference = lambda q, k, v: sparse_attention.window_topk_attention(
      q, k, v, attention.prefix_mask(lengths, t), **options)
  want = jax.jit(functools.partial(out_and_grads, reference))(q, k, v, cotangent)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='the CPU path')
@pytest.mark.parametrize('kind,options', [('window', dict(window_size=6, block_size=8)),
                                          ('window_topk', dict(window_size=6, top_k=1,
                                                               block_size=8))])
def test_cpu_runs_the_xla_kind_unchanged(kind, options):
  q, k, v, _ = inputs(40, seed=3)
  lengths = jnp.asarray([40, 25], jnp.int32)
  run = lambda q, k, v: attention.attend(q, k, v, kv_lengths_B=lengths, causal=True, kind=kind,
                                         **options)
  assert not runs_pallas(run, q, k, v)
  direct = (sparse_attention.window_attention if kind == 'window'
            else sparse_attention.window_topk_attention)
  want = direct(q, k, v, attention.prefix_mask(lengths, 40), **options)
  np.testing.assert_array_equal(jax.jit(run)(q, k, v), want)


@pytest.mark.parametrize('impl', sparse_dispatch.FORCEABLE)
def test_forced_kernel_keeps_the_xla_kind_for_a_key_mask_or_a_prefix(impl):
  q, k, v, _ = inputs(40, seed=4)
  mask = jnp.asarray(np.random.default_rng(0).random((B, 40)) < 0.7)
  with sparse_dispatch.force_implementation(impl):
    assert not runs_pallas(lambda q, k, v: attention.attend(
        q, k, v, mask, causal=True, kind='window', window_size=6), q, k, v)
    assert not runs_pallas(lambda q, k, v: attention.attend(
        q[:, 30:], k, v, causal=True, kind='window', window_size=6), q, k, v)


# ---------------------------------------------------------------------------------- on a GPU

GPU = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='Pallas Triton / cuDNN need a GPU')


def gpu_run(kind, options, t, dtype=BF16):
  """Compiled HLO text, and (out, grads) of attend and of its reference, bf16 inputs, lengths."""
  rng = np.random.default_rng(t)
  q, k, v, cotangent = (jnp.asarray(rng.standard_normal((1, t, 4, 64)), dtype)
                        for _ in range(4))
  lengths = jnp.asarray([t - 100], jnp.int32)
  run = lambda q, k, v: attention.attend(q, k, v, kv_lengths_B=lengths, causal=True, kind=kind,
                                         **options)
  fast = jax.jit(functools.partial(out_and_grads, run))
  text = fast.lower(q, k, v, cotangent).compile().as_text()
  if kind == 'window':
    ref = lambda q, k, v: attention.dense_attention(
        q, k, v, attention.prefix_mask(lengths, t), causal=True,
        window_size=options['window_size'])
  else:
    ref = lambda q, k, v: sparse_attention.window_topk_attention(
        q, k, v, attention.prefix_mask(lengths, t), **options)
  f32 = lambda x: x.astype(F32)
  want = jax.jit(functools.partial(out_and_grads, ref))(f32(q), f32(k), f32(v), f32(cotangent))
  return text, fast(q, k, v, cotangent), want


def assert_close_in_norm(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.linalg.norm(g - w) / np.linalg.norm(w) < 2e-2


@GPU
@pytest.mark.parametrize('kind,options', [
    ('window', dict(window_size=512)),
    ('window_topk', dict(window_size=512, top_k=8, block_size=128))])
def test_gpu_long_sequences_run_the_pallas_kernels(kind, options):
  text, got, want = gpu_run(kind, options, 4096)
  assert '__gpu$xla.gpu.triton' in text and 'cudnn' not in text
  assert_close_in_norm(got, want)


@GPU
@pytest.mark.parametrize('kind,options', [
    ('window', dict(window_size=512)),
    ('window_topk', dict(window_size=256, top_k=8, block_size=128))])   # every block: causal
def test_gpu_short_sequences_run_cudnn_with_the_same_mask(kind, options):
  text, got, want = gpu_run(kind, options, 1024)
  assert 'cudnn' in text and '__gpu$xla.gpu.triton' not in text
  assert_close_in_norm(got, want)
