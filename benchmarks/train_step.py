"""Train-step performance of a config: compile time, step time, tokens/s, FLOP/s, MFU, memory.

  python benchmarks/train_step.py --config configs/small.py
  python benchmarks/train_step.py --config configs/small.py --set model.vocab_size=50000 \
      --variants float32_unrolled,float32_unrolled_chunked --depths '' --tag vocab50k

The step runs as the trainer runs it (on a CPU host: data parallel over one device per core,
parallel.cpu_devices; --one_device for a plain jit on one device; the compile-by-depth figures
always use one device). For each variant (config overrides, VARIANTS below): trace+lower and XLA
compile timed apart; then the median and spread of `repeats` timings after two warm-up steps, each
timing `steps_per_timing` steps dispatched back to back (1 on CPU, 10 on GPU/TPU) up to the last
one's loss on the host, divided by their number; variants run interleaved round by round so
machine noise hits all alike. Achieved FLOP/s = the analytic FLOPs of a step (perf_common.py
documents the formula; checked here against XLA's cost analysis, which counts a scanned layer body
once, so only unrolled variants are compared; on a GPU it reports about 0.19x of the formula,
seemingly leaving out the matmuls handed to cuBLAS) / median step time; MFU = achieved / the
matmul peak measured in the same run (an n^3 matmul in the variant's compute dtype, n = 2048 on
CPU and 8192 on GPU/TPU, timed in the same interleaved rounds: median over median). Memory: XLA's
compiled memory of the step (arguments + outputs + temporaries - donated aliases), and the
temporaries alone (the intermediates: what remat and the chunked loss cut). With --depths,
also the compile time of scanned and unrolled stacks of each depth (layer applications over 2
unique layers).
Writes benchmarks/results/train_step_<device>_<config>[_<tag>].json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import perf_common  # noqa: E402

from phase1_jax import config as config_lib  # noqa: E402
from phase1_jax import specs  # noqa: E402
from phase1_jax.training import host  # noqa: E402

VARIANTS = {
    'float32_unrolled': {'model.compute_dtype': 'float32', 'model.scan_layers': False},
    'float32_scan': {'model.compute_dtype': 'float32', 'model.scan_layers': True},
    'bfloat16_unrolled': {'model.compute_dtype': 'bfloat16', 'model.scan_layers': False},
    'bfloat16_scan': {'model.compute_dtype': 'bfloat16', 'model.scan_layers': True},
    'float32_scan_remat': {'model.compute_dtype': 'float32', 'model.scan_layers': True,
                           'model.remat': True},
    # The fused chunked loss (loss.logits_chunk_pages): 2 pages of logits at a time by default.
    'float32_unrolled_chunked': {'model.compute_dtype': 'float32', 'model.scan_layers': False,
                                 'loss.logits_chunk_pages': 2},
    'float32_unrolled_chunked1': {'model.compute_dtype': 'float32', 'model.scan_layers': False,
                                  'loss.logits_chunk_pages': 1},
    'float32_unrolled_chunked4': {'model.compute_dtype': 'float32', 'model.scan_layers': False,
                                  'loss.logits_chunk_pages': 4},
    'bfloat16_scan_chunked': {'model.compute_dtype': 'bfloat16', 'model.scan_layers': True,
                              'loss.logits_chunk_pages': 2},
    'bfloat16_unrolled_chunked': {'model.compute_dtype': 'bfloat16', 'model.scan_layers': False,
                                  'loss.logits_chunk_pages': 2},
    'bfloat16_scan_dot_product': {'model.compute_dtype': 'bfloat16', 'model.scan_layers': True,
                                  'model.attention.kind': 'dot_product'},
    # configs/long_gpu.py's comparison (issue 29): the sparse kind against cuDNN's causal one.
    'bfloat16_unrolled_window': {'model.compute_dtype': 'bfloat16', 'model.scan_layers': False,
                                 'model.attention.kind': 'window'},
    'bfloat16_unrolled_dot_product': {'model.compute_dtype': 'bfloat16',
                                      'model.scan_layers': False,
                                      'model.attention.kind': 'dot_product'},
    'bfloat16_unrolled_dense': {'model.compute_dtype': 'bfloat16', 'model.scan_layers': False,
                                'model.attention.kind': 'dense'},
    'float32_unrolled_dense': {'model.compute_dtype': 'float32', 'model.scan_layers': False,
                               'model.attention.kind': 'dense'},
    'float32_unrolled_fused_cpu': {'model.compute_dtype': 'float32', 'model.scan_layers': False,
                                   'model.attention.kind': 'fused_cpu'},
}
DEFAULT_VARIANTS = {
    'cpu': 'float32_unrolled,float32_scan,bfloat16_unrolled,bfloat16_scan',
    'gpu': ('bfloat16_unrolled,bfloat16_scan,bfloat16_unrolled_dense,bfloat16_unrolled_chunked,'
            'float32_unrolled'),
}
# Steps dispatched back to back per timing. An accelerator's step is milliseconds, so a host wait
# after each one would time the round trip too; the trainer waits only at log intervals.
DEFAULT_STEPS_PER_TIMING = {'cpu': 1, 'gpu': 10}


def run_variant(config, batch, one_device):
  compiled, state, placed, info = perf_common.compile_train_step(config, batch,
                                                                 one_device=one_device)
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, placed)
  perf_common.loss_value(metrics)
  # A data-parallel program is one device's share: XLA's count times the devices.
  xla_flops = perf_common.xla_flops(compiled)
  return {'compiled': compiled, 'state': state, 'batch': placed, 'times': [],
          'row': {**info, 'xla_flops': xla_flops and xla_flops * info['devices'],
                  **perf_common.memory_bytes(compiled),
                  'compute_dtype': specs.compute_dtype(config.model.compute_dtype),
                  'scan_layers': config.model.scan_layers, 'remat': config.model.remat,
                  'logits_chunk_pages': config.loss.logits_chunk_pages}}


def compile_by_depth(config_path, sets, batch, depths):
  """Compile seconds of the train step at each depth, scanned and unrolled (2 unique layers)."""
  out = {}
  for scan in (True, False):
    for depth in depths:
      config = perf_common.apply_overrides(config_lib.load_file(config_path), {
          **sets, 'model.num_layers': depth, 'model.num_unique_layers': min(2, depth),
          'model.scan_layers': scan})
      info = perf_common.compile_train_step(config, batch, one_device=True)[3]
      lower_s, compile_s = info['lower_seconds'], info['compile_seconds']
      out[f'{"scan" if scan else "unrolled"}_{depth}'] = {
          'num_layers': depth, 'lower_seconds': lower_s, 'compile_seconds': compile_s}
      print(f'compile {"scan" if scan else "unrolled"} x{depth}: lower {lower_s:.1f} s, '
            f'compile {compile_s:.1f} s', flush=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/small.py')
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--variants', default=None, help=f'names from {", ".join(VARIANTS)}')
  parser.add_argument('--set', action='append', default=[], help='config override a.b=value')
  parser.add_argument('--depths', default='2,12', help="compile-time depths ('' to skip)")
  parser.add_argument('--tag', default='')
  parser.add_argument('--steps_per_timing', type=int, default=None,
                      help='steps dispatched back to back per timing (default: 1 on CPU, 10 on '
                           'GPU/TPU); a timing is their total / their number')
  parser.add_argument('--one_device', action='store_true',
                      help="one device instead of the trainer's layout (on a CPU host: data "
                           'parallel over one device per core, parallel.cpu_devices)')
  args = parser.parse_args()
  sets = perf_common.parse_sets(args.set)
  base = perf_common.apply_overrides(config_lib.load_file(args.config), sets)
  # As the train CLI does: before JAX starts, keep freed host memory (host.py) and split a CPU
  # host into the config's devices.
  cpu_devices = host.prepare(specs.host_spec(base), split_cpu=not args.one_device)
  backend = jax.default_backend()
  names = (args.variants or DEFAULT_VARIANTS.get(backend, DEFAULT_VARIANTS['gpu'])).split(',')
  per_timing = args.steps_per_timing or DEFAULT_STEPS_PER_TIMING.get(backend, 10)

  batch = perf_common.first_batch(base)
  runs = {}
  for name in names:
    config = perf_common.apply_overrides(config_lib.load_file(args.config),
                                         {**sets, **VARIANTS[name]})
    runs[name] = run_variant(config, batch, args.one_device)
    print(f'{name}: lower {runs[name]["row"]["lower_seconds"]:.1f} s, compile '
          f'{runs[name]["row"]["compile_seconds"]:.1f} s', flush=True)
  dtypes = sorted({runs[n]['row']['compute_dtype'] for n in names})
  peak_runs = {dt: (*perf_common.peak_runner(dt), []) for dt in dtypes}
  for _ in range(args.repeats):
    for name in names:
      run = runs[name]
      start = time.perf_counter()
      for _ in range(per_timing):
        run['state'], metrics = run['compiled'](run['state'], run['batch'])
      perf_common.loss_value(metrics)  # waits for the last step, hence for all of them
      run['times'].append((time.perf_counter() - start) / per_timing)
    for run_peak, _, times in peak_runs.values():
      start = time.perf_counter()
      for _ in range(per_timing):
        run_peak()
      times.append((time.perf_counter() - start) / per_timing)
  peaks = {dt: perf_common.peak_summary(dt, times, flops)
           for dt, (_, flops, times) in peak_runs.items()}

  flops = perf_common.analytic_flops(base)
  positions = base.train.batch_size * base.data.max_seq_len
  results = {'config': args.config, 'overrides': sets, 'device': jax.devices()[0].device_kind,
             'backend': backend, 'host_cpu': perf_common.host_cpu(),
             'device_count': jax.device_count(),
             'cpu_devices': cpu_devices,
             'keep_freed_host_memory': host.keeps_freed_memory(specs.host_spec(base)),
             'jax_version': jax.__version__, 'batch_size': base.train.batch_size,
             'seq_len': base.data.max_seq_len, 'positions_per_batch': positions,
             'real_tokens_per_batch': int(batch['target_mask'].sum()),
             'analytic_flops': flops, 'matmul_peak': peaks, 'repeats': args.repeats,
             'steps_per_timing': per_timing,
             'variants': {}}
  print(f'layout: {runs[names[0]]["row"]["layout"]}')
  flop_unit, flop_scale = perf_common.flop_unit()
  print(f'{"variant":<30} {"compile s":>9} {"median ms":>10} {"spread":>7} {"tokens/s":>9} '
        f'{flop_unit:>8} {"MFU":>6} {"memory MiB":>10} {"temps MiB":>9} {"XLA/analytic":>12}')
  for name in names:
    row = {**runs[name]['row'], **perf_common.stats(runs[name]['times'])}
    med = row['median_seconds']
    row['tokens_per_second'] = positions / med
    row['real_tokens_per_second'] = results['real_tokens_per_batch'] / med
    row['flops_per_second'] = flops['train_step'] / med
    row['mfu'] = row['flops_per_second'] / peaks[row['compute_dtype']]['flops_per_second']
    # XLA counts a scanned body once (layers, logits chunks): compare unscanned steps only.
    if row['xla_flops'] and not row['scan_layers'] and not row['logits_chunk_pages']:
      row['xla_over_analytic_flops'] = row['xla_flops'] / flops['train_step']
    results['variants'][name] = row
    mem, temps = row['compiled_memory_bytes'], row['temp_memory_bytes']
    ratio = row.get('xla_over_analytic_flops')
    print(f'{name:<30} {row["compile_seconds"]:>9.1f} {med * 1e3:>10.1f} {row["spread"]:>7.0%} '
          f'{row["tokens_per_second"]:>9,.0f} {row["flops_per_second"] / flop_scale:>8.1f} '
          f'{row["mfu"]:>6.1%} {"" if mem is None else f"{mem / 2**20:,.0f}":>10} '
          f'{"" if temps is None else f"{temps / 2**20:,.0f}":>9} '
          f'{"" if ratio is None else f"{ratio:.3f}":>12}')
  print(perf_common.peak_line(peaks))
  depths = [int(d) for d in args.depths.split(',') if d]
  if depths:
    results['compile_by_depth'] = compile_by_depth(args.config, sets, batch, depths)
  stem = os.path.splitext(os.path.basename(args.config))[0] + (f'_{args.tag}' if args.tag else '')
  perf_common.write_results(results, f'train_step_{perf_common.device_name()}_{stem}')


if __name__ == '__main__':
  main()
