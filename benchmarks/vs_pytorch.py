"""Our train step against a plain PyTorch eager twin of the same model, timed in one run.

  pip install torch --index-url https://download.pytorch.org/whl/cpu   # PyTorch's CPU wheel
  python benchmarks/vs_pytorch.py [--config configs/bench_cpu.py] [--repeats 20]

PyTorch is in no extra (`pip install -e '.[bench]'` brings matplotlib only): it needs
`pip install torch` in addition, as above. The package never needs it.

Four contestants on the same batch: PyTorch eager float32, ours float32, PyTorch CPU autocast
bfloat16, ours bfloat16 (float32 master weights). Each is warmed up, then they run interleaved
round by round (A B C D A B C D ...) so that machine noise hits all alike; a short pause between
contestants lets the other framework's spinning worker threads go idle.

Each framework runs in the process a user would run it in. Ours runs in this process, set up as
the train CLI sets up its own (host.prepare: per-core CPU devices, glibc malloc keeping freed
memory). PyTorch runs in a worker process of its own with glibc's malloc defaults, as a PyTorch
user runs it; `torchkeep_<dtype>` contestants run it in a second worker with the same malloc
setting as ours (host.keep_freed_memory), to show what that setting does for PyTorch. The
worker's steps are timed here like ours, the pipe's round trip included.

Reports medians, the spread (max - min) / median, tokens/s (all B x T positions), achieved
FLOP/s from the analytic count (perf_common.py; identical for both: same shapes, same matmuls)
and MFU against XLA's float32 / bfloat16 2048^3 matmul, timed in the same rounds. Writes
benchmarks/results/vs_pytorch_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax

# Runs as a script from the repository root: find the package and the sibling modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import perf_common  # noqa: E402

from phase1_jax import config as config_lib  # noqa: E402
from phase1_jax import specs  # noqa: E402
from phase1_jax.data import vocab  # noqa: E402
from phase1_jax.training import host  # noqa: E402
from phase1_jax.training import state as state_lib  # noqa: E402

CONTESTANTS = ('torch_float32', 'jax_float32', 'torch_bfloat16', 'jax_bfloat16')
# Also accepted: jax1_float32 / jax1_bfloat16, ours on one device (the trainer's layout on a CPU
# host is data parallel over one device per core, parallel.cpu_devices), and torchkeep_float32 /
# torchkeep_bfloat16, PyTorch with host.keep_freed_memory's malloc setting.
TORCH_WORKERS = {'torch': False, 'torchkeep': True}   # contestant prefix -> keep freed memory
PAUSE_S = 0.05


def jax_runner(config_path, dtype, batch, overrides, one_device=False):
  config = config_lib.load_file(config_path)
  config.model.compute_dtype = dtype
  perf_common.apply_overrides(config, overrides)
  compiled, state, batch, info = perf_common.compile_train_step(config, batch,
                                                                one_device=one_device)
  box = {'state': state}

  def run():
    box['state'], metrics = compiled(box['state'], batch)
    return perf_common.loss_value(metrics)   # waits for the step
  return run, info


def torch_runner(config, autocast_bf16, batch, jax_params):
  import torch
  import torch_twin
  torch.manual_seed(0)
  m = config.model
  model = torch_twin.Twin(
      vocab_size=m.vocab_size, num_semantic_classes=m.num_semantic_classes,
      num_element_types=m.num_element_types, feature_dim=config.data.feature_dim,
      max_seq_len=config.data.max_seq_len, d_model=m.d_model, num_heads=m.num_heads,
      num_layers=m.num_layers, num_unique_layers=m.num_unique_layers, mlp_dim=m.mlp_dim)
  torch_twin.load_from_jax(model, jax_params)   # same initial weights: the losses must agree
  opt, sched = torch_twin.make_optimizer(model, config.train)
  step = torch_twin.make_step(model, opt, sched, vocab.ELEMENT_OPEN_TAG_IDS,
                              config.train.grad_clip_norm, autocast_bf16)
  batch = torch_twin.to_torch(batch)
  return (lambda: step(batch).item()), {'params': torch_twin.count_params(model),
                                        'torch_version': torch.__version__,
                                        'torch_threads': torch.get_num_threads()}


def initial_params(config):
  """The initial weights every contestant starts from (create_train_state is seeded by config)."""
  tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), 1000)
  _, initial = state_lib.create_train_state(specs.model_spec(config), tx, seed=config.seed)
  return initial.params['model']


class TorchWorker:
  """PyTorch contestants in a process of their own (see the module docstring). The process runs
  this script with --worker and answers each contestant name on its stdin with one step's loss."""

  def __init__(self, config_path, names, keep_freed_memory):
    command = [sys.executable, os.path.abspath(__file__), '--config', config_path,
               '--worker', ','.join(names)] + (['--worker_keep_freed_memory'] * keep_freed_memory)
    self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True)
    self.info = json.loads(self._reply())

  def _reply(self) -> str:
    for line in self.process.stdout:   # libraries may print; replies carry a prefix
      if line.startswith(_REPLY):
        return line[len(_REPLY):]
    raise SystemExit(f'PyTorch worker exited with status {self.process.wait()}')

  def runner(self, name):
    def run():
      self.process.stdin.write(name + '\n')
      self.process.stdin.flush()
      return float(self._reply())
    return run, self.info[name]


_REPLY = 'WORKER '


def serve_torch(config_path, names, keep_freed_memory):
  """The --worker side of TorchWorker."""
  if keep_freed_memory:
    host.keep_freed_memory()
  config = config_lib.load_file(config_path)
  batch, params = perf_common.first_batch(config), initial_params(config)
  runners, info = {}, {}
  for name in names:
    runners[name], info[name] = torch_runner(config, name.endswith('bfloat16'), batch, params)
    info[name]['keep_freed_host_memory'] = keep_freed_memory
  print(_REPLY + json.dumps(info), flush=True)
  for line in sys.stdin:
    print(f'{_REPLY}{runners[line.strip()]()!r}', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/bench_cpu.py')
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--contestants', default=','.join(CONTESTANTS))
  parser.add_argument('--set', action='append', default=[],
                      help='config override a.b=value for our side only, e.g. '
                           'model.remat=True (the model must stay the twin of PyTorch\'s)')
  parser.add_argument('--jax_malloc_defaults', action='store_true',
                      help="our process leaves glibc's malloc at its defaults "
                           '(parallel.keep_freed_host_memory=False)')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  parser.add_argument('--worker_keep_freed_memory', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return serve_torch(args.config, args.worker.split(','), args.worker_keep_freed_memory)
  config = config_lib.load_file(args.config)
  config.parallel.keep_freed_host_memory = not args.jax_malloc_defaults
  # As the train CLI does: before JAX starts, keep freed host memory and split a CPU host into
  # the config's devices.
  cpu_devices = host.prepare(specs.host_spec(config))
  overrides = perf_common.parse_sets(args.set)

  batch = perf_common.first_batch(config)
  names = args.contestants.split(',')
  runners, info = {}, {}
  torch_names = {prefix: [n for n in names if n.split('_')[0] == prefix]
                 for prefix in TORCH_WORKERS}
  workers = {prefix: TorchWorker(args.config, torch_names[prefix], keep)
             for prefix, keep in TORCH_WORKERS.items() if torch_names[prefix]}
  for name in names:
    framework, dtype = name.split('_')
    if framework in workers:
      runners[name], info[name] = workers[framework].runner(name)
    else:
      runners[name], info[name] = jax_runner(args.config, dtype, batch, overrides,
                                             one_device=framework == 'jax1')
  counts = {info[n]['params'] for n in names}
  if len(counts) != 1:
    raise SystemExit(f'parameter counts differ: { {n: info[n]["params"] for n in names} }')
  for name in names:
    info[name]['first_loss'] = runners[name]()   # from the same initial weights in all four
    for _ in range(args.warmup - 1):
      runners[name]()
  for dtype, tol in (('float32', 1e-4), ('bfloat16', 3e-2)):
    pair = [info[f'{f}_{dtype}']['first_loss'] for f in ('torch', 'jax') if f'{f}_{dtype}' in info]
    if len(pair) == 2 and abs(pair[0] - pair[1]) > tol * abs(pair[0]):
      raise SystemExit(f'{dtype}: PyTorch loss {pair[0]} != ours {pair[1]}: not the same model')
  peak_runs = {dt: perf_common.peak_runner(dt) for dt in ('float32', 'bfloat16')}
  for dt, (run_peak, _) in peak_runs.items():
    runners[f'peak_{dt}'] = run_peak
  times = {name: [] for name in runners}
  for _ in range(args.repeats):
    for name in runners:
      time.sleep(PAUSE_S)
      start = time.perf_counter()
      runners[name]()
      times[name].append(time.perf_counter() - start)
  peaks = {dt: perf_common.peak_summary(dt, times[f'peak_{dt}'], flops)
           for dt, (_, flops) in peak_runs.items()}

  flops = perf_common.analytic_flops(config)['train_step']
  positions = config.train.batch_size * config.data.max_seq_len
  device = perf_common.device_name()
  results = {'config': args.config, 'device': jax.devices()[0].device_kind,
             'backend': jax.default_backend(), 'host_cpu': perf_common.host_cpu(),
             'cpu_count': os.cpu_count(),
             'jax_version': jax.__version__, 'jax_overrides': overrides,
             'cpu_devices': cpu_devices, 'device_count': jax.device_count(),
             'keep_freed_host_memory': config.parallel.keep_freed_host_memory,
             'positions_per_batch': positions,
             'real_tokens_per_batch': int(batch['target_mask'].sum()),
             'train_step_flops': flops, 'xla_matmul_peak': peaks, 'contestants': {}}
  print(f'{"contestant":<16} {"median ms":>10} {"spread":>7} {"tokens/s":>10} {"GFLOP/s":>8} '
        f'{"MFU":>6} {"vs torch same dtype":>20}')
  for name in names:
    row = {**info[name], **perf_common.stats(times[name])}
    dtype = name.split('_')[1]
    row['tokens_per_second'] = positions / row['median_seconds']
    row['flops_per_second'] = flops / row['median_seconds']
    row['mfu'] = row['flops_per_second'] / peaks[dtype]['flops_per_second']
    results['contestants'][name] = row
  for name in names:
    row = results['contestants'][name]
    twin = 'torch_' + name.split('_')[1]
    if name.startswith('jax') and twin in results['contestants']:
      row['vs_torch'] = results['contestants'][twin]['median_seconds'] / row['median_seconds']
    ratio = f'{row["vs_torch"]:.2f}x' if 'vs_torch' in row else ''
    print(f'{name:<16} {row["median_seconds"] * 1e3:>10.1f} {row["spread"]:>7.0%} '
          f'{row["tokens_per_second"]:>10,.0f} {row["flops_per_second"] / 1e9:>8.1f} '
          f'{row["mfu"]:>6.1%} {ratio:>20}')
  print(perf_common.peak_line(peaks))
  perf_common.write_results(results, f'vs_pytorch_{device}')


if __name__ == '__main__':
  main()
