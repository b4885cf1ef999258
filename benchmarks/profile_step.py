"""Where a config's train step spends its device time, per XLA operation and per category.

  python benchmarks/profile_step.py --config configs/default.py [--set model.scan_layers=True]

Compiles the step as the trainer runs it (perf_common.compile_train_step: on a CPU host, data
parallel over one device per core), runs three warm-up steps, records `--steps` more with
jax.profiler, and sums per step the time of each operation of the step's XLA module: on a GPU
the kernels on its streams (fusions by their HLO name, cuBLAS/cuDNN kernels by theirs), on CPU
the runtime's per-operation events of every device (so the total is about devices x step time).
Each operation is put in one category, from its kernel or HLO opcode and the shape it writes:

  matmul         GEMM kernels, dots, cuBLAS/cuDNN calls, matmul fusions
  collective     all-reduces and other cross-device operations (on CPU hosts they include the
                 time a device waits for the slowest)
  vocab N x V    anything else writing a [.., V] array (softmax, cross-entropy, the embedding
                 gradient: the vocabulary-sized passes; left out when V equals another width)
  attention      the fused_cpu kernel's custom calls, and anything else writing a [.., T, T] or
                 [.., T, P] array (scores, masks, softmax)
  layer stacking dynamic-(update-)slices and device copies (what scanned layers add)
  reduction      other reductions (norm statistics, bias gradients, partial sums)
  other          the remaining elementwise work (norms, GELU, dropout, masks, the optimizer)

Prints the categories and the top operations, with the JAX op each came from (HLO metadata), on
a CPU host with several devices each device's time per step (`device_balance`), and
writes benchmarks/results/profile_<device>_<config>[_<tag>].json; the raw trace (Perfetto /
TensorBoard) stays in --trace_dir.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import time

import jax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import perf_common  # noqa: E402

from phase1_jax import config as config_lib  # noqa: E402
from phase1_jax import specs  # noqa: E402
from phase1_jax.training import host  # noqa: E402

_GEMM_KERNEL = re.compile(r'gemm|nvjet|xmma|cutlass|cublas|cudnn|fmha', re.I)
_MATMUL_OPS = ('dot', 'convolution')
_STACKING_OPS = ('dynamic-update-slice', 'dynamic-slice', 'copy-start', 'copy-done')
_COLLECTIVE_OPS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                   'collective-permute')


def hlo_instructions(hlo_text: str) -> dict:
  """{normalized name: (opcode, output dims [[...], ...], JAX op name)} of an HLO module's text.
  Names are normalized as kernel names are ('.' and '-' become '_')."""
  out = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*)$', hlo_text, re.M):
    name, rest = m.group(1), m.group(2)
    head = re.match(r'(\(.*?\)|\S+)\s+([\w\-]+)\(', rest)
    shape, opcode = (head.group(1), head.group(2)) if head else ('', '')
    dims = [[int(d) for d in ds.split(',') if d] for ds in re.findall(r'\[([\d,]*)\]', shape)]
    op_name = re.search(r'op_name="([^"]*)"', rest)
    if 'custom_call_target="' in rest:
      opcode += ':' + re.search(r'custom_call_target="([^"]*)"', rest).group(1)
    out.setdefault(re.sub(r'[.\-]', '_', name),
                   (opcode, dims, op_name.group(1) if op_name else ''))
  return out


def categorize(kernel: str, instruction, *, vocab: int | None, seq: int, patches: int) -> str:
  opcode, dims, op_name = instruction or ('', [], '')
  if (_GEMM_KERNEL.search(kernel) or opcode.startswith(_MATMUL_OPS) or 'cublas' in opcode
      or 'cudnn' in opcode or op_name.endswith('dot_general')):
    return 'matmul'
  if opcode.startswith(_COLLECTIVE_OPS):
    return 'collective'
  if 'phase1_attention' in opcode:   # model/cpu_attention.py's custom calls, matmuls included
    return 'attention'
  if vocab and any(d and d[-1] == vocab for d in dims):
    return 'vocab N x V'
  if any(len(d) >= 2 and d[-2] == seq and d[-1] in (seq, patches) for d in dims):
    return 'attention'
  if (opcode in _STACKING_OPS or opcode.startswith('copy') or 'memcpy' in kernel.lower()
      or 'dynamic_update_slice' in kernel or 'dynamic_slice' in kernel):
    return 'layer stacking'
  if opcode == 'reduce' or 'reduce' in kernel:
    return 'reduction'
  return 'other'


def device_events(trace_events, module_names):
  """The trace's per-operation device events of the step's module: GPU stream kernels, or (on
  CPU) the runtime's per-operation events (args hlo_module among `module_names`)."""
  process = {e['pid']: e['args']['name'] for e in trace_events
             if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  gpu_pids = {pid for pid, name in process.items() if '/device:' in name}
  for e in trace_events:
    if e.get('ph') != 'X':
      continue
    if e['pid'] in gpu_pids:
      yield e
    elif e.get('args', {}).get('hlo_module') in module_names and 'hlo_op' in e['args']:
      yield e


def device_balance(events, is_collective) -> list[dict]:
  """Per step (the runtime's run_id) of a multi-device CPU host, per device: its operations' time
  outside collectives, its time in collectives (which includes waiting for the slowest device),
  and how many of its operations ran on a thread that ran mostly another device's operations that
  step. XLA:CPU runs all devices' operations on one intra-op thread pool and splits operations
  over it, which is what these figures measure (docs/performance.md, "Two per-core devices in
  one process")."""
  steps = collections.defaultdict(list)
  for e in events:
    if 'device_ordinal' in e.get('args', {}) and 'run_id' in e['args']:
      steps[e['args']['run_id']].append(e)
  rows = []
  for run_id, step_events in steps.items():
    thread_time = collections.defaultdict(collections.Counter)
    for e in step_events:
      thread_time[e['tid']][e['args']['device_ordinal']] += e['dur']
    if len({device for times in thread_time.values() for device in times}) < 2:
      continue
    owner = {tid: times.most_common(1)[0][0] for tid, times in thread_time.items()}
    devices = collections.defaultdict(lambda: {'ops_ms': 0.0, 'collective_ms': 0.0, 'ops': 0,
                                               'ops_on_other_threads': 0})
    for e in step_events:
      row = devices[e['args']['device_ordinal']]
      row['collective_ms' if is_collective(e['name']) else 'ops_ms'] += e['dur'] / 1e3
      row['ops'] += 1
      row['ops_on_other_threads'] += owner[e['tid']] != e['args']['device_ordinal']
    rows.append({'run_id': run_id, 'devices': dict(sorted(devices.items()))})
  return rows


def print_device_balance(rows: list[dict]) -> None:
  for step, row in enumerate(rows):
    print(f'  step {step}: ' + '; '.join(
        f'device {device}: ops {d["ops_ms"]:.0f} ms, collectives {d["collective_ms"]:.0f} ms, '
        f'{d["ops_on_other_threads"]} of {d["ops"]} ops on another device\'s thread'
        for device, d in row['devices'].items()))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/small.py')
  parser.add_argument('--set', action='append', default=[], help='config override a.b=value')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--tag', default='')
  parser.add_argument('--one_device', action='store_true')
  parser.add_argument('--trace_dir', default='/tmp/phase1_profile')
  args = parser.parse_args()
  config = perf_common.apply_overrides(config_lib.load_file(args.config),
                                       perf_common.parse_sets(args.set))
  host.prepare(specs.host_spec(config), split_cpu=not args.one_device)
  batch = perf_common.first_batch(config)
  compiled, state, placed, info = perf_common.compile_train_step(config, batch,
                                                                 one_device=args.one_device)
  hlo = compiled.as_text()
  instructions = hlo_instructions(hlo)
  module = re.match(r'HloModule (\S+?)[,\s]', hlo).group(1)
  for _ in range(3):
    state, metrics = compiled(state, placed)
  perf_common.loss_value(metrics)

  shutil.rmtree(args.trace_dir, ignore_errors=True)
  start = time.perf_counter()
  with jax.profiler.trace(args.trace_dir):
    for _ in range(args.steps):
      state, metrics = compiled(state, placed)
    perf_common.loss_value(metrics)
  wall = (time.perf_counter() - start) / args.steps
  path = glob.glob(os.path.join(args.trace_dir, '**', '*.trace.json.gz'), recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  trace = trace['traceEvents'] if isinstance(trace, dict) else trace

  m = config.model
  other_widths = {m.d_model, m.mlp_dim, 2 * m.d_model, 3 * m.d_model}
  sizes = dict(vocab=None if m.vocab_size in other_widths else m.vocab_size,
               seq=config.data.max_seq_len, patches=config.data.grid_rows * config.data.grid_cols)
  events = list(device_events(trace, {module, f'{module}.1'}))
  per_op, count = collections.Counter(), collections.Counter()
  for e in events:
    per_op[e['name']] += e['dur'] / 1e3 / args.steps    # trace durations are microseconds
    count[e['name']] += 1 / args.steps
  categories, category_of = collections.Counter(), {}
  top = []
  for name, ms in per_op.most_common():
    instruction = instructions.get(re.sub(r'[.\-]', '_', name))
    category = category_of[name] = categorize(name, instruction, **sizes)
    categories[category] += ms
    if len(top) < args.top:
      top.append({'op': name, 'category': category, 'ms_per_step': ms,
                  'count_per_step': count[name],
                  'jax_op': instruction[2].split('/')[-1] if instruction else '',
                  'output_dims': instruction[1] if instruction else []})
  total = sum(categories.values())
  backend = jax.default_backend()
  # Empty with one device (device_balance keeps steps of two or more) and on GPUs (no ordinals).
  balance = device_balance(events, lambda name: category_of[name] == 'collective')
  print(f'{args.config} on {jax.devices()[0].device_kind} ({info["layout"]}): '
        f'{wall * 1e3:.1f} ms per step (wall, while tracing), {total:.1f} ms of device '
        f'operations per step{" over all devices" if backend == "cpu" else ""}')
  for category, ms in categories.most_common():
    print(f'  {category:<16} {ms:8.2f} ms  {ms / total:6.1%}')
  print(f'{"ms/step":>8} {"count":>6}  {"category":<15} {"operation":<34} jax op, output')
  for row in top:
    print(f'{row["ms_per_step"]:8.3f} {row["count_per_step"]:6.0f}  {row["category"]:<15} '
          f'{row["op"][:34]:<34} {row["jax_op"][:40]} {row["output_dims"][:2]}')
  if balance:
    print('per device and step (the all-reduce waits for the slowest device):')
    print_device_balance(balance)
  stem = os.path.splitext(os.path.basename(args.config))[0] + (f'_{args.tag}' if args.tag else '')
  perf_common.write_results(
      {'config': args.config, 'overrides': perf_common.parse_sets(args.set),
       'device': jax.devices()[0].device_kind, 'backend': backend, 'layout': info['layout'],
       'jax_version': jax.__version__, 'steps': args.steps, 'wall_ms_per_step': wall * 1e3,
       'device_ms_per_step': total, 'categories_ms_per_step': dict(categories), 'top': top,
       'device_balance': balance, 'trace': path},
      f'profile_{perf_common.device_name()}_{stem}')


if __name__ == '__main__':
  main()
