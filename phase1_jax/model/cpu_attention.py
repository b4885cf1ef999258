"""The `fused_cpu` attention kind: cpu_attention.cc's kernel as an XLA FFI custom call.

`fused_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_lengths_B, *, causal) -> BxTxNxH` computes
what `attention.dense_attention` computes with `prefix_mask(kv_lengths_B)` (same masks, same
fully-masked-row average), in float32 whatever the input dtype, differentiable through a custom
VJP whose backward pass is the second handler (it recomputes the probabilities from the forward's
log-sum-exp). CPU only.

The kernel is C++ compiled on first use with the host's compiler (`$CXX`, else `g++`) for this
machine's CPU (`-march=native`), then cached as a shared library under
`$XDG_CACHE_HOME/phase1_jax` (default `~/.cache/phase1_jax`), keyed by the source, the compiler,
the flags, jaxlib's FFI headers and the CPU's flags. Compiling takes about 6 s, once per machine.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cpu_attention.cc')
_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w')
_TARGETS = {'forward': 'phase1_attention_forward', 'backward': 'phase1_attention_backward'}
_SYMBOLS = {'forward': 'Phase1AttentionForward', 'backward': 'Phase1AttentionBackward'}


class KernelBuildError(RuntimeError):
  """The kernel could not be compiled or loaded (no compiler, or it failed)."""


def _cpu_flags() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next((line for line in f if line.startswith('flags')), '')
  except OSError:
    return platform.processor()


def compiler_available() -> bool:
  return shutil.which(_compiler_name()) is not None


def _compiler_name() -> str:
  return os.environ.get('CXX') or 'g++'


def _compiler() -> str:
  compiler = _compiler_name()
  path = shutil.which(compiler)
  if path is None:
    raise KernelBuildError(
        f"attention kind 'fused_cpu': its C++ kernel needs a compiler, and {compiler!r} was not "
        "found (set $CXX, install g++, or use model.attention.kind='dense')")
  return path


def _library_path(compiler: str) -> str:
  version = subprocess.run([compiler, '--version'], capture_output=True, text=True).stdout
  key = hashlib.sha256()
  with open(_SOURCE, 'rb') as f:
    key.update(f.read())
  for part in (version, ' '.join(_FLAGS), jax.ffi.include_dir(), jax.lib.__version__,
               _cpu_flags()):
    key.update(part.encode())
  cache = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'),
                       'phase1_jax')
  return os.path.join(cache, f'cpu_attention-{key.hexdigest()[:16]}.so')


def _build(compiler: str, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Compile to a temporary name and rename: concurrent first uses never load a partial file.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  try:
    cmd = [compiler, *_FLAGS, '-I', jax.ffi.include_dir(), _SOURCE, '-o', tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
      lines = result.stderr.strip().splitlines() or ['(no output)']
      first_error = next((line for line in lines if 'error' in line), lines[-1])
      raise KernelBuildError(
          f"attention kind 'fused_cpu': compiling {_SOURCE} failed: {first_error.strip()}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@functools.cache
def register() -> None:
  """Compiles (or finds in the cache) and registers the two handlers; once per process."""
  compiler = _compiler()
  path = _library_path(compiler)
  if not os.path.exists(path):
    _build(compiler, path)
  library = ctypes.cdll.LoadLibrary(path)
  for name, target in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, _SYMBOLS[name])),
                                platform='cpu')


def _call(name, results, q, *args, causal):
  """The handler `name` on (q, *args); the softmax scale is 1 / sqrt(head_dim)."""
  register()
  return jax.ffi.ffi_call(_TARGETS[name], results, vmap_method='sequential')(
      q, *args, causal=causal, scale=np.float32(q.shape[-1] ** -0.5))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, lengths, causal):
  return _forward(q, k, v, lengths, causal)[0]


def _forward(q, k, v, lengths, causal):
  b, t, n, _ = q.shape
  out_BxTxNxH, lse_BxNxT = _call(
      'forward', (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                  jax.ShapeDtypeStruct((b, n, t), jnp.float32)),
      q, k, v, lengths, causal=causal)
  return out_BxTxNxH, (q, k, v, lengths, out_BxTxNxH, lse_BxNxT)


def _backward(causal, residuals, dout_BxTxNxH):
  q, k, v, lengths, out_BxTxNxH, lse_BxNxT = residuals
  dq, dk, dv = _call(
      'backward', tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
      q, k, v, lengths, out_BxTxNxH, lse_BxNxT, dout_BxTxNxH, causal=causal)
  return dq, dk, dv, None


_attention.defvjp(_forward, _backward)


def fused_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, kv_lengths_B=None, *, causal: bool = False):
  """Softmax attention over the keys [0, kv_lengths_B) (all S keys when None). Output dtype =
  q's dtype; computed in float32."""
  if jax.default_backend() != 'cpu':
    raise ValueError(f"attention kind 'fused_cpu': runs on the CPU only, not on "
                     f"{jax.default_backend()!r}; use 'dot_product' or 'dense' there")
  b, s = k_BxSxNxH.shape[:2]
  if kv_lengths_B is None:
    kv_lengths_B = jnp.full((b,), s, jnp.int32)
  f32 = lambda x: x.astype(jnp.float32)
  out_BxTxNxH = _attention(f32(q_BxTxNxH), f32(k_BxSxNxH), f32(v_BxSxNxH),
                           kv_lengths_B.astype(jnp.int32), causal)
  return out_BxTxNxH.astype(q_BxTxNxH.dtype)
