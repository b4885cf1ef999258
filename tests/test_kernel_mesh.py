"""Attention kernels on several devices: within sparse_dispatch.kernel_mesh a kernel call (Pallas,
splash, fused_cpu's FFI call) is a shard_map over the mesh (GSPMD cannot partition a custom call),
each device attending over its own pages, with the same outputs and gradients as one device. Runs
in a subprocess with 4 forced CPU devices (the device count is fixed when JAX starts); Pallas and
splash in interpret mode.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/test_kernel_mesh.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (forced kernel or None, attention kind, options): causal self-attention, T = 128, 4 pages of
# different lengths.
CASES = (('pallas', 'window', dict(window_size=40, block_size=32)),
         ('pallas', 'window_topk', dict(window_size=40, top_k=1, block_size=32)),
         ('splash', 'window', dict(window_size=40, block_size=32)),
         (None, 'fused_cpu', {}))


def _run_cases() -> dict:
  """{case: max |difference| of output and q/k/v gradients, sharded vs one device; whether the
  traced step holds a shard_map}, on a 2 x 2 (data, fsdp) mesh of the pages."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from phase1_jax.model import attention, sparse_dispatch
  mesh = jax.make_mesh((2, 2), ('data', 'fsdp'), devices=jax.devices()[:4],    # as parallel.py's
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  pages = NamedSharding(mesh, P(('data', 'fsdp')))
  rng = np.random.default_rng()
  q, k, v, cotangent = (jnp.asarray(rng.standard_normal((4, 128, 2, 16)), jnp.float32)
                        for _ in range(4))
  lengths = jnp.asarray([128, 97, 50, 1], jnp.int32)
  results = {'devices': jax.device_count()}
  for chosen, kind, options in CASES:
    def output_and_grads(q, k, v, lengths, chosen=chosen, kind=kind, options=options):
      attend = lambda q, k, v: attention.attend(q, k, v, kv_lengths_B=lengths, causal=True,
                                                kind=kind, **options)
      out, vjp = jax.vjp(attend, q, k, v)
      return (out, *vjp(cotangent))

    def forced(*args, fn=output_and_grads, chosen=chosen):
      if chosen is None:
        return fn(*args)
      with sparse_dispatch.force_implementation(chosen):
        return fn(*args)

    def split(*args, fn=forced):
      with sparse_dispatch.kernel_mesh(mesh):
        return fn(*args)
    want = jax.jit(forced)(q, k, v, lengths)            # the same kernel, one call
    got = jax.jit(split, in_shardings=(pages,) * 4)(q, k, v, lengths)
    results[f'{chosen}_{kind}'] = {
        'max_diff': max(float(jnp.abs(a - b).max()) for a, b in zip(got, want, strict=True)),
        'shard_map': 'shard_map' in str(jax.make_jaxpr(split)(q, k, v, lengths)),
        'plain_has_shard_map': 'shard_map' in str(jax.make_jaxpr(forced)(q, k, v, lengths))}
  return results


@pytest.fixture(scope='module')
def four_devices():
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT '))
  return json.loads(line[len('RESULT '):])


@pytest.mark.parametrize('case', [f'{c}_{k}' for c, k, _ in CASES])
def test_kernel_split_over_the_mesh_equals_one_device(four_devices, case):
  assert four_devices['devices'] == 4
  got = four_devices[case]
  assert got['shard_map'] and not got['plain_has_shard_map']
  assert got['max_diff'] < 1e-5, got


if __name__ == '__main__':
  print('RESULT ' + json.dumps(_run_cases()))
