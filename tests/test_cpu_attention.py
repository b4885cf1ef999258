"""The `fused_cpu` attention kind (model/cpu_attention.cc through jax.ffi) against `dense`."""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phase1_jax import specs
from phase1_jax.model import attention, cpu_attention

pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='a CPU kernel')


def _inputs(seed, b, t, s, n, h):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, n, h))
  k = jax.random.normal(keys[1], (b, s, n, h))
  v = jax.random.normal(keys[2], (b, s, n, h))
  weights = jax.random.normal(keys[3], (b, t, n, h))   # a random cotangent for the gradients
  return q, k, v, weights


def _output_and_grads(kind, causal, lengths, q, k, v, weights):
  def loss(q, k, v):
    out = attention.attend(q, k, v, kv_lengths_B=lengths, causal=causal, kind=kind)
    return jnp.sum(out.astype(jnp.float32) * weights), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


# (batch, T, S, heads, head_dim, causal, key lengths): bench_cpu's self- and cross-attention
# shapes; several 64-row blocks with short rows (length 100, 37) and empty rows (length 0:
# dense averages all S values); sizes that are no multiple of the kernel's 16-float vectors; T < S.
CASES = [
    (2, 256, 256, 4, 64, True, [256, 100]),
    (2, 130, 130, 2, 64, True, [0, 37]),
    (3, 70, 90, 2, 24, True, [90, 5, 0]),
    (2, 33, 64, 4, 64, False, [64, 10]),
    (2, 33, 64, 4, 40, False, [0, 1]),
    (1, 5, 5, 1, 8, True, [5]),
]


@pytest.mark.parametrize('b,t,s,n,h,causal,lengths', CASES)
def test_fused_cpu_equals_dense_output_and_gradients(b, t, s, n, h, causal, lengths):
  q, k, v, weights = _inputs(b * t + s * h, b, t, s, n, h)
  lengths = jnp.asarray(lengths, jnp.int32)
  out, grads = _output_and_grads('fused_cpu', causal, lengths, q, k, v, weights)
  ref_out, ref_grads = _output_and_grads('dense', causal, lengths, q, k, v, weights)
  chex.assert_shape(out, (b, t, n, h))
  chex.assert_type(out, jnp.float32)
  chex.assert_trees_all_equal_shapes_and_dtypes(grads, (q, k, v))
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=2e-6)
  for grad, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-5)


def test_fused_cpu_without_lengths_attends_every_key():
  q, k, v, _ = _inputs(3, 2, 20, 20, 2, 16)
  np.testing.assert_allclose(attention.attend(q, k, v, causal=True, kind='fused_cpu'),
                             attention.attend(q, k, v, causal=True, kind='dense'),
                             rtol=1e-5, atol=2e-6)


def test_fused_cpu_bfloat16_keeps_dtype_and_is_close():
  q, k, v, _ = _inputs(4, 2, 48, 48, 2, 32)
  lengths = jnp.asarray([48, 20], jnp.int32)
  out = attention.attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), kv_lengths_B=lengths,
                         causal=True, kind='fused_cpu')
  chex.assert_type(out, jnp.bfloat16)
  ref = attention.attend(q, k, v, kv_lengths_B=lengths, causal=True, kind='dense')
  rel = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
  assert rel < 1e-2, rel


def test_fused_cpu_under_vmap_and_pmap():
  """vmap runs the custom call once per mapped element; pmap once per device (the trainer's
  layout on a CPU host)."""
  q, k, v, _ = _inputs(5, 2, 24, 24, 2, 16)
  lengths = jnp.asarray([24, 9], jnp.int32)
  ref = attention.attend(q, k, v, kv_lengths_B=lengths, causal=True, kind='dense')
  fused = lambda q, k, v, lengths: attention.attend(q[None], k[None], v[None],
                                                    kv_lengths_B=lengths[None], causal=True,
                                                    kind='fused_cpu')[0]
  np.testing.assert_allclose(jax.vmap(fused)(q, k, v, lengths), ref, rtol=1e-5, atol=2e-6)
  n = min(2, jax.local_device_count())
  np.testing.assert_allclose(jax.pmap(jax.vmap(fused))(
      *(x.reshape(n, -1, *x.shape[1:]) for x in (q, k, v, lengths))).reshape(ref.shape),
      ref, rtol=1e-5, atol=2e-6)


def test_fused_cpu_takes_lengths_not_a_mask():
  q, k, v, _ = _inputs(6, 2, 8, 8, 2, 16)
  with pytest.raises(ValueError, match='kv_mask_BxS.*fused_cpu.*kv_lengths_B'):
    attention.attend(q, k, v, jnp.ones((2, 8), bool), causal=True, kind='fused_cpu')
  with pytest.raises(ValueError, match='window_size.*not used by attention kind .fused_cpu.'):
    attention.attend(q, k, v, causal=True, kind='fused_cpu', window_size=4)


def test_missing_compiler_is_one_clear_error(monkeypatch):
  monkeypatch.setenv('CXX', 'no-such-compiler-phase1')
  with pytest.raises(cpu_attention.KernelBuildError, match="no-such-compiler-phase1.*'dense'"):
    cpu_attention._compiler()


def test_the_kernel_is_cached_by_what_built_it(tmp_path, monkeypatch):
  """Registered once per process from a library in the cache, named by a hash of its source,
  compiler, flags and CPU; no temporary file of a build is left beside it."""
  cpu_attention.register()
  compiler = cpu_attention._compiler()
  path = cpu_attention._library_path(compiler)
  assert os.path.getsize(path) > 0
  assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith('tmp')]
  monkeypatch.setattr(cpu_attention, '_FLAGS', cpu_attention._FLAGS + ('-DOTHER',))
  assert cpu_attention._library_path(compiler) != path
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert cpu_attention._library_path(compiler).startswith(str(tmp_path))


def test_a_failed_build_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
  source = tmp_path / 'broken.cc'
  source.write_text('#error this kernel does not compile\n')
  monkeypatch.setattr(cpu_attention, '_SOURCE', str(source))
  library = tmp_path / 'cache' / 'kernel.so'
  with pytest.raises(cpu_attention.KernelBuildError, match='broken.cc failed: .*does not compile'):
    cpu_attention._build(cpu_attention._compiler(), str(library))
  assert os.listdir(library.parent) == []


def test_auto_kind_is_fused_cpu_with_a_compiler_and_dense_without(monkeypatch):
  assert specs.attention_kind('auto') == 'fused_cpu'
  assert specs.attention_kind('window') == 'window'
  monkeypatch.setenv('CXX', 'no-such-compiler-phase1')
  assert specs.attention_kind('auto') == 'dense'
