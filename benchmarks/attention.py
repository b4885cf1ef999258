"""Time and memory of the attention kinds against sequence length (causal self-attention), and of
one KV-cached decoding step against context length.

  python benchmarks/attention.py [--seq-lens 4096,16384] [--kinds dense,window] [--repeats 10]
  python benchmarks/attention.py --quick          # CPU smoke test: small T, few runs

Defaults follow the device: on a GPU the issue's measurement (bfloat16, T 4k..64k, window 512,
window_topk top_k 8 of 128-blocks, against dot_product (cuDNN) and dense, 12 heads x 64); on a
CPU the earlier float32 sweep (T 512..8192, window 256, block 256, top_k 4). A kind may name an
implementation, e.g. `window:pallas`, `window:splash`, `window:cudnn`, `window_topk:xla`
(sparse_dispatch.py), to measure it where the kind would pick another one (the FUSED_DENSE_MAX_T
threshold); `window_topk:cudnn` runs only where its mask is causal, `window_topk:splash` only
with a --block that is a multiple of 128; pallas and splash run in interpret mode off their
device (GPU, TPU). The `impl` column says what ran.

For each T and kind, forward and forward+backward (grad of the summed outputs w.r.t. q, k, v),
each AOT-compiled once: median of `repeats` runs after `warmup` runs, each timed to
block_until_ready (slow configs stop early after 3 runs past --time-budget seconds). Memory is
the compiled estimate temp + argument + output bytes (`memory_analysis()`). A (kind, T, mode)
whose analytic O(T^2) score memory (dense, or XLA's dot_product) or compiled estimate exceeds
--max-gib is skipped with a note; a compile or run that fails (e.g. out of memory) is recorded as
a note too. FLOPs: `gflop` is analytic (matmuls over every score computed, masked ones included);
XLA's `cost_analysis()` counts a scan body once. `x_dot` is dot_product's median over the row's,
checked against --bars (fwd_bwd). Decode (--decode-lens): one `kv_cache.step` (one layer, query
at the last position of a cache of that length, cache donated) per cache layout: `full` (dense,
dot_product), `ring` (window), `topk` (window_topk; its block selection runs every block_size
steps, not in the timed step). Writes <out-dir>/attention_<device>.csv, .json (with the device,
the arguments, the bars and the decode rows) and .png (needs matplotlib, the `bench` extra).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from phase1_jax.model import attention, kv_cache, sparse_attention, sparse_dispatch

MODES = ('fwd', 'fwd_bwd')
FIELDS = ('device', 'kind', 'impl', 'seq_len', 'mode', 'dtype', 'median_s', 'min_s', 'max_s',
          'runs', 'x_dot', 'memory_gib', 'temp_gib', 'gflop', 'xla_gflop', 'context_keys',
          'compile_s', 'note')
# The bars: fwd_bwd speed-up over dot_product at (kind, T).
BARS = {('window', 16384): 4.0, ('window', 65536): 12.0,
        ('window_topk', 16384): 3.0, ('window_topk', 65536): 6.0}
DEFAULTS = {
    'gpu': dict(seq_lens='4096,8192,16384,32768,65536',
                kinds='dot_product,dense,window,window_topk',
                dtype='bfloat16', window=512, block=128, top_k=8, max_gib=100.0, repeats=10,
                decode_lens='16384,65536'),
    'cpu': dict(seq_lens='512,1024,2048,4096,8192', kinds=','.join(attention.KINDS),
                dtype='float32', window=256, block=256, top_k=4, max_gib=10.0, repeats=5,
                decode_lens=''),
    'quick': dict(seq_lens='256,512', kinds='dot_product,dense,window,window_topk',
                  dtype='float32', window=64, block=32, top_k=2, max_gib=2.0, repeats=2,
                  decode_lens='1024'),
}


def split(kind):
  """'window:pallas' -> ('window', 'pallas'); a plain kind -> (kind, None)."""
  base, _, impl = kind.partition(':')
  return base, impl or None


def options(base, args):
  return attention.kind_options(base, window_size=args.window, top_k=args.top_k,
                                block_size=args.block)


def implementation(kind, t, args):
  """What runs: the forced one, sparse_dispatch's choice for the sparse kinds, else the kind."""
  base, impl = split(kind)
  if impl or base not in attention.SPARSE_KINDS:
    return impl or base
  return sparse_dispatch.implementation(
      base, t=t, s=t, head_dim=args.head_dim, dtype=args.dtype, window_size=args.window,
      block_size=args.block, top_k=args.top_k)


def attend_fn(kind, t, args):
  """q, k, v -> out of `kind`, or a note why that implementation cannot run it."""
  base, impl = split(kind)
  opts = options(base, args)
  if impl is None:
    return lambda q, k, v: attention.attend(q, k, v, causal=True, kind=base, **opts)
  if impl == 'splash' and base == 'window_topk' and args.block % 128:
    return 'skipped: window_topk:splash needs a block that is a multiple of 128'
  if impl in ('pallas', 'splash'):
    return lambda q, k, v: sparse_dispatch.kernel_attention(impl, base, q, k, v, None, **{
        'top_k': None, **opts})
  if impl == 'xla':
    return lambda q, k, v: sparse_dispatch.xla_attention(base, q, k, v, None, **{
        'top_k': None, **opts})
  if base == 'window_topk' and not sparse_dispatch.selects_every_block(
      t, args.window, args.top_k, args.block):
    return 'skipped: window_topk:cudnn only where top_k selects every block'
  window = args.window if base == 'window' else None
  return lambda q, k, v: attention.dot_product_attention(q, k, v, causal=True,
                                                         window_size=window)


def context_keys(kind, t, args):
  """Keys each query's scores are computed against (masked ones included) and padded T."""
  base, _ = split(kind)
  impl = implementation(kind, t, args)
  if base in ('dense', 'dot_product', 'fused_cpu') or impl == 'cudnn':
    return t, t
  b = args.block
  blocks = math.ceil(t / b)
  prev = min(math.ceil((args.window - 1) / b), blocks - 1)
  if impl in ('pallas', 'splash') and base == 'window':   # its own tiles over the band
    tile = sparse_dispatch.WINDOW_TILE if impl == 'pallas' else sparse_dispatch.SPLASH_WINDOW_TILE
    return (math.ceil((args.window - 1) / tile) + 1) * tile, math.ceil(t / tile) * tile
  per_chunk = min(blocks, max(1, sparse_attention.CHUNK_POSITIONS // b))
  padded = math.ceil(blocks / per_chunk) * per_chunk * b
  if impl == 'splash':   # pads T to the blocks only (the XLA code: to whole chunks of blocks)
    padded = blocks * b
  keys = (prev + 1) * b
  if base == 'window_topk':
    keys += min(args.top_k, max(blocks - prev - 1, 0)) * b
  return keys, padded


def analytic_gflop(kind, t, mode, args):
  keys, padded = context_keys(kind, t, args)
  fwd = 4 * args.batch * args.heads * padded * keys * args.head_dim   # q k^T and p v
  if mode == 'fwd':
    return fwd / 1e9
  # Autodiff of dense: 2 forward + 4 backward matmuls; flash backwards also recompute q k^T.
  return fwd * (3.0 if split(kind)[0] == 'dense' else 3.5) / 1e9


def score_gib(kind, t, mode, args):
  """Float32 T x T scores a materializing kind holds (x3 with the backward), else 0: dense, and
  XLA's dot_product (all but a GPU in bfloat16, where cuDNN runs)."""
  cudnn = jax.default_backend() == 'gpu' and args.dtype == 'bfloat16'
  impl = implementation(kind, t, args)
  materializes = impl == 'dense' or (impl in ('dot_product', 'cudnn') and not cudnn)
  per = args.batch * args.heads * t * t * 4 / 2**30
  return per * (3 if mode == 'fwd_bwd' else 1) if materializes else 0.0


def build(fn, mode):
  if mode == 'fwd':
    return fn
  return jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def time_compiled(compiled, inputs, args):
  for _ in range(args.warmup):
    jax.block_until_ready(compiled(*inputs))
  times, begin = [], time.perf_counter()
  while len(times) < args.repeats:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - start)
    if len(times) >= 3 and time.perf_counter() - begin > args.time_budget:
      break
  return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times),
              runs=len(times))


def measure(kind, t, mode, args, qkv, device):
  row = dict(device=device, kind=kind, impl=implementation(kind, t, args), seq_len=t, mode=mode,
             dtype=args.dtype, note='')
  keys, _ = context_keys(kind, t, args)
  row.update(context_keys=keys, gflop=round(analytic_gflop(kind, t, mode, args), 3))
  fn = attend_fn(kind, t, args)
  if isinstance(fn, str):
    return {**row, 'note': fn}
  if score_gib(kind, t, mode, args) > args.max_gib:
    return {**row, 'note': f'skipped: O(T^2) scores need {score_gib(kind, t, mode, args):.1f} '
                           f'GiB > --max-gib {args.max_gib}'}
  try:
    start = time.perf_counter()
    compiled = jax.jit(build(fn, mode)).lower(*qkv).compile()
    row['compile_s'] = round(time.perf_counter() - start, 2)
    mem = compiled.memory_analysis()
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    row.update(memory_gib=round(total / 2**30, 4),
               temp_gib=round(mem.temp_size_in_bytes / 2**30, 4))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    row['xla_gflop'] = round((cost or {}).get('flops', float('nan')) / 1e9, 3)
    if total > args.max_gib * 2**30:
      return {**row, 'note': f'skipped: needs {total / 2**30:.1f} GiB > --max-gib {args.max_gib}'}
    row.update(time_compiled(compiled, qkv, args))
  except Exception as e:   # out of memory, a kernel the backend refuses: a note, not a crash
    row['note'] = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}'
  return row


def add_ratios(rows):
  """x_dot: dot_product's median over each row's (same T and mode)."""
  dot = {(r['seq_len'], r['mode']): r.get('median_s') for r in rows if r['kind'] == 'dot_product'}
  for r in rows:
    ref = dot.get((r['seq_len'], r['mode']))
    if ref and r.get('median_s'):
      r['x_dot'] = round(ref / r['median_s'], 3)


def check_bars(rows):
  """Each bar of BARS whose row was measured: (kind, T, needed, got, passed)."""
  by = {(r['kind'], r['seq_len']): r for r in rows if r['mode'] == 'fwd_bwd'}
  out = []
  for (kind, t), need in BARS.items():
    got = by.get((kind, t), {}).get('x_dot')
    if got is not None:
      out.append(dict(kind=kind, seq_len=t, needed=need, got=got, passed=got >= need))
  return out


def print_table(rows):
  print(f'\n{"kind":<18} {"impl":<11} {"T":>6} {"mode":<8} {"median s":>9} {"GiB":>7} '
        f'{"GFLOP":>8} {"x dot":>6}')
  for r in rows:
    median = f'{r["median_s"]:.4f}' if 'median_s' in r else '-'
    mem = f'{r["memory_gib"]:.3f}' if 'memory_gib' in r else '-'
    print(f'{r["kind"]:<18} {r["impl"]:<11} {r["seq_len"]:>6} {r["mode"]:<8} {median:>9} '
          f'{mem:>7} {r["gflop"]:>8.1f} {r.get("x_dot", ""):>6}  {r["note"]}')


def decode_rows(args, device, kinds):
  """One KV-cached decoding step per cache layout and context length (see the docstring)."""
  rows, layouts = [], {}
  for kind in kinds:
    base = split(kind)[0]
    if base != 'fused_cpu':
      layouts.setdefault(kv_cache.layout(base), base)
  dtype = jnp.dtype(args.dtype)
  for length in (int(x) for x in args.decode_lens.split(',') if x):
    for layout, base in layouts.items():
      spec = attention.AttentionSpec.of(base, window_size=args.window, top_k=args.top_k,
                                        block_size=args.block)
      cache = kv_cache.init(spec, num_applications=1, batch=args.batch, max_len=length,
                            num_heads=args.heads, head_dim=args.head_dim, dtype=dtype)
      rng = np.random.default_rng(length)
      cache = {**cache, **{n: jnp.asarray(rng.standard_normal(cache[n].shape), dtype)
                           for n in ('k', 'v')}}
      qkv = [jnp.asarray(rng.standard_normal((args.batch, args.heads, args.head_dim)), dtype)
             for _ in range(3)]
      step = jax.jit(lambda cache, q, k, v, spec=spec, length=length: kv_cache.step(
          cache, q, k, v, length - 1, 0, spec), donate_argnums=0)
      box = {'cache': cache}

      def run(*qkv, step=step, box=box):
        out, box['cache'] = step(box['cache'], *qkv)
        return out

      run(*qkv)   # compile
      row = dict(device=device, kind=base, layout=layout, context=length, dtype=args.dtype,
                 batch=args.batch, **time_compiled(run, qkv, args))
      rows.append(row)
      print(f'  decode {layout:<5} ({base}) context {length:<6} {row["median_s"] * 1e6:.0f} us',
            flush=True)
  return rows


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
           if r['kind'] == kind and r['mode'] == 'fwd_bwd' and 'memory_gib' in r]
    if pts:
      axes[2].loglog(*zip(*pts, strict=True), marker='o', label=kind, base=2)
  axes[2].set(title='compiled memory, fwd_bwd', xlabel='T', ylabel='GiB (temp+args+outputs)')
  axes[2].grid(True, which='both', alpha=0.3)
  axes[2].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f'wrote {path}')


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='smoke test: small T, 2 runs')
  parser.add_argument('--seq-lens')
  parser.add_argument('--kinds', help='kinds, or kind:impl (impl: pallas, splash, cudnn, xla)')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--heads', type=int, default=12)
  parser.add_argument('--head-dim', type=int, default=64)
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'))
  parser.add_argument('--window', type=int)
  parser.add_argument('--block', type=int)
  parser.add_argument('--top-k', type=int)
  parser.add_argument('--repeats', type=int)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--time-budget', type=float, default=60.0,
                      help='seconds per config after which it stops at >= 3 runs')
  parser.add_argument('--max-gib', type=float)
  parser.add_argument('--decode-lens', help="KV-cached decode step contexts ('' for none)")
  parser.add_argument('--out-dir', default='benchmarks/results')
  parser.add_argument('--tag', default='', help='suffix of the output files')
  args = parser.parse_args()
  preset = DEFAULTS['quick' if args.quick else
                    'gpu' if jax.default_backend() == 'gpu' else 'cpu']
  for name, value in preset.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def main():
  args = parse_args()
  device = jax.devices()[0].device_kind
  kinds = args.kinds.split(',')
  dtype = jnp.dtype(args.dtype)
  print(f'device {device} ({jax.default_backend()}), batch {args.batch}, heads {args.heads}, '
        f'head_dim {args.head_dim}, {args.dtype}, window {args.window}, block {args.block}, '
        f'top_k {args.top_k}', flush=True)
  rows = []
  for t in (int(x) for x in args.seq_lens.split(',') if x):
    rng = np.random.default_rng(t)
    shape = (args.batch, t, args.heads, args.head_dim)
    qkv = tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
    for kind in kinds:
      for mode in MODES:
        row = measure(kind, t, mode, args, qkv, device)
        rows.append(row)
        print(f'  {kind:<18} {row["impl"]:<7} T={t:<6} {mode:<8} '
              + (f'{row["median_s"]:.4f} s' if 'median_s' in row else row['note']), flush=True)
    del qkv
  add_ratios(rows)
  print_table(rows)
  bars = check_bars(rows)
  for b in bars:
    print(f'bar {b["kind"]} T={b["seq_len"]} fwd_bwd vs dot_product: {b["got"]:.2f}x, needs '
          f'{b["needed"]}x: {"PASS" if b["passed"] else "FAIL"}')
  decode = decode_rows(args, device, kinds) if args.decode_lens else []
  os.makedirs(args.out_dir, exist_ok=True)
  name = 'cpu' if jax.default_backend() == 'cpu' else device.replace(' ', '_').lower()
  stem = os.path.join(args.out_dir, f'attention_{name}' + (f'_{args.tag}' if args.tag else ''))
  with open(stem + '.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: r.get(k, '') for k in FIELDS})
  with open(stem + '.json', 'w') as f:
    json.dump({'device': device, 'backend': jax.default_backend(), 'jax_version': jax.__version__,
               'fused_dense_max_t': sparse_dispatch.FUSED_DENSE_MAX_T, 'args': vars(args),
               'rows': rows, 'bars': bars, 'decode': decode}, f, indent=2)
  print(f'wrote {stem}.csv, {stem}.json')
  plot(rows, kinds, stem + '.png')


if __name__ == '__main__':
  main()
