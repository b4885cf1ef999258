"""The train step's matmuls one by one: XLA against PyTorch's CPU kernels, timed in one run.

  pip install torch --index-url https://download.pytorch.org/whl/cpu   # PyTorch's CPU wheel
  python benchmarks/matmuls.py [--config configs/bench_cpu.py] [--repeats 30]

PyTorch is in no extra (`pip install -e '.[bench]'` brings matplotlib only): it needs
`pip install torch` in addition, as above. The package never needs it.

Why: on CPU, most of a train step is matmuls, so the kernels XLA:CPU picks (YNNPACK, Eigen)
against the ones PyTorch calls (MKL/oneDNN, its fused CPU flash attention aside) bound the step
ratio `vs_pytorch.py` measures. Each case is one matmul of the step at the config's shapes over
the whole batch of B x T positions (N tokens): a linear layer's forward x @ W, input gradient
dy @ W^T and weight gradient x^T @ dy, for every distinct layer width, and the attention's
batched score and value products. Contestants, all on the same work:

  xla_per_core   the trainer's CPU layout: pmap over one device per core, each its share of N
  xla_one        one device using all cores through XLA's intra-op threads
  torch          PyTorch eager with torch.get_num_threads() threads (the twin's setting)

Interleaved rounds (case by case, contestant by contestant), medians, GFLOP/s. Writes
benchmarks/results/matmuls_<device>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import perf_common  # noqa: E402

from phase1_jax import config as config_lib  # noqa: E402
from phase1_jax import specs  # noqa: E402
from phase1_jax.training import host  # noqa: E402

# name -> (lhs shape, rhs shape, contraction) over the whole batch; the leading dim of lhs (and of
# rhs for batched cases) is what the per-core devices split.
_FORMS = {'fwd': 'nk,km->nm', 'dx': 'nm,km->nk', 'dw': 'nk,nm->km'}


def cases(config) -> dict:
  """{name: (einsum, lhs shape, rhs shape, uses per step)} of the step's matmuls at `config`'s
  shapes. Uses per step, with L layer applications: the fused QKV, the MLP's two layers and the
  self-attention products once per application, the D x D layers three times (self-attention
  output, cross-attention query and output), the tied detail head once; the attention's scores
  product once forward and once backward (dP = dO V^T), its value product once forward and three
  times backward (dV, dQ, dK). The small cross-attention and memory matmuls are left out."""
  m, b, t = config.model, config.train.batch_size, config.data.max_seq_len
  n, d, h, L = b * t, m.d_model, m.d_model // m.num_heads, m.num_layers
  widths = {'qkv': (d, 3 * d, L), 'out': (d, d, 3 * L), 'mlp_in': (d, m.mlp_dim, L),
            'mlp_out': (m.mlp_dim, d, L), 'head': (d, m.vocab_size, 1)}
  out = {}
  for layer, (k, o, uses) in widths.items():
    for form, eq in _FORMS.items():
      shapes = {'n': n, 'k': k, 'm': o}
      lhs, rhs = eq.split('->')[0].split(',')
      out[f'{layer}.{form}'] = (eq, tuple(shapes[c] for c in lhs),
                                tuple(shapes[c] for c in rhs), uses)
  bn = b * m.num_heads
  out['attn.scores'] = ('bth,bsh->bts', (bn, t, h), (bn, t, h), 2 * L)
  out['attn.values'] = ('bts,bsh->bth', (bn, t, t), (bn, t, h), 4 * L)
  return out


def case_flops(eq, lhs_shape, rhs_shape) -> int:
  """2 x the product of all distinct dimension sizes (a multiply-add counts 2)."""
  lhs, rhs = eq.split('->')[0].split(',')
  sizes = {**dict(zip(lhs, lhs_shape, strict=True)), **dict(zip(rhs, rhs_shape, strict=True))}
  return 2 * int(np.prod(list(sizes.values())))


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def xla_runner(eq, lhs, rhs, per_core: bool):
  f = lambda a, b: jnp.einsum(eq, a, b)
  if not per_core:
    c = jax.jit(f)
    return lambda: jax.block_until_ready(c(lhs, rhs))
  k = jax.device_count()
  split = lambda a: jax.pmap(lambda x: x)(a.reshape(k, a.shape[0] // k, *a.shape[1:]))
  # The weight gradient's rhs (dy) splits with x; a forward/input-gradient rhs is the weight,
  # which every device holds whole.
  rhs_split = eq in (_FORMS['dw'], 'bth,bsh->bts', 'bts,bsh->bth')
  a = split(lhs)
  b = split(rhs) if rhs_split else jax.pmap(lambda x: x)(jnp.stack([rhs] * k))
  c = jax.pmap(f)
  return lambda: jax.block_until_ready(c(a, b))


def torch_runner(eq, lhs, rhs):
  import torch
  a, b = torch.from_numpy(np.array(lhs)), torch.from_numpy(np.array(rhs))
  ops = {_FORMS['fwd']: lambda: a @ b, _FORMS['dx']: lambda: a @ b.T,
         _FORMS['dw']: lambda: a.T @ b, 'bth,bsh->bts': lambda: a @ b.transpose(1, 2),
         'bts,bsh->bth': lambda: a @ b}
  return ops[eq]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/bench_cpu.py')
  parser.add_argument('--repeats', type=int, default=30)
  args = parser.parse_args()
  config = config_lib.load_file(args.config)
  cpu_devices = host.prepare(specs.host_spec(config))
  import torch
  rng = np.random.default_rng(0)
  rows = {}
  print(f'{"matmul":<14} {"shapes":<26} {"xla_per_core":>12} {"xla_one":>8} {"torch":>8} '
        f'{"per_core/torch":>15}   GFLOP/s')
  for name, (eq, lshape, rshape, uses) in cases(config).items():
    lhs = jnp.asarray(rng.standard_normal(lshape, np.float32))
    rhs = jnp.asarray(rng.standard_normal(rshape, np.float32))
    runners = {'xla_per_core': xla_runner(eq, lhs, rhs, per_core=True),
               'xla_one': xla_runner(eq, lhs, rhs, per_core=False),
               'torch': torch_runner(eq, lhs, rhs)}
    for run in runners.values():
      run()
      run()
    times = {k: [] for k in runners}
    for _ in range(args.repeats):
      for k, run in runners.items():
        times[k].append(_timed(run))
    flops = case_flops(eq, lshape, rshape)
    row = {'einsum': eq, 'lhs': lshape, 'rhs': rshape, 'flops': flops, 'uses_per_step': uses}
    for k, ts in times.items():
      row[k] = {'gflops_per_second': flops / statistics.median(ts) / 1e9,
                **perf_common.stats(ts)}
    row['per_core_vs_torch'] = row['xla_per_core']['gflops_per_second'] / row['torch'][
        'gflops_per_second']
    rows[name] = row
    print(f'{name:<14} {str(lshape) + "x" + str(rshape):<26} '
          + ' '.join(f'{row[k]["gflops_per_second"]:>{w}.0f}'
                     for k, w in (('xla_per_core', 12), ('xla_one', 8), ('torch', 8)))
          + f' {row["per_core_vs_torch"]:>14.2f}x')
  # The step's mix: total FLOPs over total time, each case counted as often as the step uses it.
  work = lambda r: r['flops'] * r['uses_per_step']
  total = {k: sum(work(r) for r in rows.values())
           / sum(work(r) / r[k]['gflops_per_second'] for r in rows.values())
           for k in ('xla_per_core', 'xla_one', 'torch')}
  print('the step\'s mix of these matmuls: ' + ', '.join(f'{k} {v:.0f}' for k, v in total.items())
        + f' GFLOP/s; per_core/torch {total["xla_per_core"] / total["torch"]:.2f}x')
  results = {'config': args.config, 'device': jax.devices()[0].device_kind,
             'cpu_count': os.cpu_count(), 'cpu_devices': cpu_devices,
             'jax_version': jax.__version__, 'torch_version': torch.__version__,
             'torch_threads': torch.get_num_threads(), 'repeats': args.repeats,
             'step_mix_gflops_per_second': total, 'cases': rows}
  perf_common.write_results(results, f'matmuls_{perf_common.device_name()}')


if __name__ == '__main__':
  main()
