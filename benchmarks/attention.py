"""Time and memory of the attention kinds against sequence length (causal self-attention).

  python benchmarks/attention.py [--seq-lens 512,1024] [--kinds dense,window] [--repeats 5]

For each T and kind, forward and forward+backward (grad of the summed outputs w.r.t. q, k, v),
each AOT-compiled once: median of `repeats` runs after `warmup` runs, each timed to
block_until_ready (slow configs stop early after 3 runs past --time-budget seconds). Memory is
the compiled estimate temp + argument + output bytes (`memory_analysis()`; its
peak_memory_in_bytes is recorded too, but on CPU it holds only arguments + outputs). FLOPs: XLA's
`cost_analysis()` counts a scan body once, which undercounts the scanned sparse kinds, so the
`gflop` column is analytic (matmuls over every score computed, masked ones included). A
(kind, T, mode) whose estimate exceeds --max-gib is skipped with a note. Writes
benchmarks/results/attention_<device>.csv and .png (log-log time vs T; needs matplotlib, the
optional `bench` extra) and prints a table with ratios against dense.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from phase1_jax.model import attention, sparse_attention

MODES = ('fwd', 'fwd_bwd')
FIELDS = ('device', 'kind', 'seq_len', 'mode', 'median_s', 'min_s', 'max_s', 'runs', 'memory_gib',
          'temp_gib', 'peak_field_gib', 'gflop', 'xla_gflop', 'context_keys', 'compile_s', 'note')


def options(kind, args):
  return attention.kind_options(kind, window_size=args.window, top_k=args.top_k,
                                block_size=args.block)


def context_keys(kind, t, args):
  """Keys each query's scores are computed against (masked ones included) and padded T."""
  if kind in ('dense', 'dot_product'):
    return t, t
  b = args.block
  blocks = math.ceil(t / b)
  prev = min(math.ceil((args.window - 1) / b), blocks - 1)
  per_chunk = min(blocks, max(1, sparse_attention.CHUNK_POSITIONS // b))
  padded = math.ceil(blocks / per_chunk) * per_chunk * b
  keys = (prev + 1) * b
  if kind == 'window_topk':
    keys += min(args.top_k, max(blocks - prev - 1, 0)) * b
  return keys, padded


def analytic_gflop(kind, t, mode, args):
  keys, padded = context_keys(kind, t, args)
  fwd = 4 * args.batch * args.heads * padded * keys * args.head_dim   # q k^T and p v
  if mode == 'fwd':
    return fwd / 1e9
  # Autodiff of dense: 2 forward + 4 backward matmuls; the sparse backward also recomputes q k^T.
  return fwd * (3.0 if kind in ('dense', 'dot_product') else 3.5) / 1e9


def build(kind, mode, args):
  opts = options(kind, args)
  fwd = lambda q, k, v: attention.attend(q, k, v, causal=True, kind=kind, **opts)
  if mode == 'fwd':
    return fwd
  return jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def measure(kind, t, mode, args, qkv, device):
  row = dict(device=device, kind=kind, seq_len=t, mode=mode, note='')
  keys, _ = context_keys(kind, t, args)
  row.update(context_keys=keys, gflop=round(analytic_gflop(kind, t, mode, args), 3))
  start = time.perf_counter()
  compiled = jax.jit(build(kind, mode, args)).lower(*qkv).compile()
  row['compile_s'] = round(time.perf_counter() - start, 2)
  mem = compiled.memory_analysis()
  total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  row.update(memory_gib=round(total / 2**30, 4), temp_gib=round(mem.temp_size_in_bytes / 2**30, 4),
             peak_field_gib=round(mem.peak_memory_in_bytes / 2**30, 4))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  row['xla_gflop'] = round(cost.get('flops', float('nan')) / 1e9, 3)
  if total > args.max_gib * 2**30:
    row['note'] = f'skipped: needs {total / 2**30:.1f} GiB > --max-gib {args.max_gib}'
    return row
  for _ in range(args.warmup):
    jax.block_until_ready(compiled(*qkv))
  times, begin = [], time.perf_counter()
  while len(times) < args.repeats:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*qkv))
    times.append(time.perf_counter() - start)
    if len(times) >= 3 and time.perf_counter() - begin > args.time_budget:
      break
  row.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times),
             runs=len(times))
  return row


def print_table(rows, kinds):
  by = {(r['kind'], r['seq_len'], r['mode']): r for r in rows}
  print(f'\n{"kind":<12} {"T":>6} {"mode":<8} {"median s":>9} {"GiB":>7} {"GFLOP":>8} '
        f'{"x faster":>9} {"x less mem":>10}')
  for r in rows:
    dense = by.get(('dense', r['seq_len'], r['mode']))
    speed = mem = ''
    if dense and 'median_s' in dense and 'median_s' in r:
      speed = f'{dense["median_s"] / r["median_s"]:.1f}'
    if dense:
      mem = f'{dense["memory_gib"] / r["memory_gib"]:.1f}'
    median = f'{r["median_s"]:.4f}' if 'median_s' in r else 'skipped'
    print(f'{r["kind"]:<12} {r["seq_len"]:>6} {r["mode"]:<8} {median:>9} {r["memory_gib"]:>7.3f} '
          f'{r["gflop"]:>8.1f} {speed:>9} {mem:>10}  {r["note"]}')
  lens = sorted({r['seq_len'] for r in rows})
  for kind in kinds:
    for mode in MODES:
      times = [by.get((kind, t, mode), {}).get('median_s') for t in lens]
      growth = [f'{b / a:.2f}' for a, b in zip(times[:-1], times[1:], strict=True) if a and b]
      if growth:
        print(f'{kind} {mode}: time growth per doubling of T: {", ".join(growth)}')


def plot(rows, kinds, path):
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    print('matplotlib not installed (pip install .[bench]): no plot')
    return
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  for ax, mode in zip(axes[:2], MODES, strict=True):
    for kind in kinds:
      pts = [(r['seq_len'], r['median_s']) for r in rows
             if r['kind'] == kind and r['mode'] == mode and 'median_s' in r]
      if pts:
        ax.loglog(*zip(*pts, strict=True), marker='o', label=kind, base=2)
    ax.set(title=f'time, {mode}', xlabel='T', ylabel='seconds (median)')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
  for kind in kinds:
    pts = [(r['seq_len'], r['memory_gib']) for r in rows
           if r['kind'] == kind and r['mode'] == 'fwd_bwd']
    if pts:
      axes[2].loglog(*zip(*pts, strict=True), marker='o', label=kind, base=2)
  axes[2].set(title='compiled memory, fwd_bwd', xlabel='T', ylabel='GiB (temp+args+outputs)')
  axes[2].grid(True, which='both', alpha=0.3)
  axes[2].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f'wrote {path}')


def main():
  gpu = jax.default_backend() == 'gpu'
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seq-lens', default='512,1024,2048,4096,8192' + (',16384' if gpu else ''))
  parser.add_argument('--kinds', default=','.join(attention.KINDS))
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--heads', type=int, default=12)
  parser.add_argument('--head-dim', type=int, default=64)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--window', type=int, default=256)
  parser.add_argument('--block', type=int, default=256)
  parser.add_argument('--top-k', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--time-budget', type=float, default=60.0,
                      help='seconds per config after which it stops at >= 3 runs')
  # Dense fwd_bwd at T=8192 (float32, 12 heads) needs ~9.2 GiB; 10 still measures it.
  parser.add_argument('--max-gib', type=float, default=40.0 if gpu else 10.0)
  parser.add_argument('--out-dir', default='benchmarks/results')
  args = parser.parse_args()

  device = jax.devices()[0].device_kind.replace(' ', '_').lower()
  kinds = args.kinds.split(',')
  dtype = jnp.dtype(args.dtype)
  print(f'device {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {args.batch}, '
        f'heads {args.heads}, head_dim {args.head_dim}, {args.dtype}, window {args.window}, '
        f'block {args.block}, top_k {args.top_k}')
  rows = []
  for t in (int(x) for x in args.seq_lens.split(',')):
    rng = np.random.default_rng(t)
    shape = (args.batch, t, args.heads, args.head_dim)
    qkv = tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
    for kind in kinds:
      for mode in MODES:
        row = measure(kind, t, mode, args, qkv, device)
        rows.append(row)
        print(f'  {kind:<12} T={t:<6} {mode:<8} '
              + (f'{row["median_s"]:.4f} s' if 'median_s' in row else row['note'])
              + f'  {row["memory_gib"]:.3f} GiB', flush=True)
  print_table(rows, kinds)
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, f'attention_{device}')
  with open(stem + '.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: r.get(k, '') for k in FIELDS})
  print(f'wrote {stem}.csv')
  plot(rows, kinds, stem + '.png')


if __name__ == '__main__':
  main()
