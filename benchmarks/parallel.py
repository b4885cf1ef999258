"""Train-step time and tokens/s of each parallel layout on the devices present.

  python benchmarks/parallel.py [--config configs/small.py] [--repeats 10]
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/parallel.py  # 8 CPU devices

Layouts: one device (plain jit, the reference), `pmap` over all devices, and `jit` over every
(data, fsdp) mesh with fsdp in 1, 2, ..., devices. Each step is timed to block_until_ready after
two warm-up steps (compile excluded and reported apart); median and spread over --repeats.
Forced host devices share the machine's cores, so on a CPU this measures the layouts' overhead,
not scaling. Writes benchmarks/results/parallel_<backend>.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax

# Runs as a script from the repository root: find the package and the sibling modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import perf_common  # noqa: E402

from phase1_jax import config as config_lib  # noqa: E402
from phase1_jax import specs  # noqa: E402
from phase1_jax.data import pipeline  # noqa: E402
from phase1_jax.training import parallel  # noqa: E402
from phase1_jax.training import state as state_lib  # noqa: E402


def layouts(devices: int):
  yield 'single', {}
  yield 'pmap', dict(mode='pmap')
  fsdp = 1
  while fsdp <= devices:
    if devices % fsdp == 0:
      yield f'jit data={devices // fsdp} fsdp={fsdp}', dict(mode='jit', fsdp=fsdp)
    fsdp *= 2


def measure(config, name, overrides, batches, repeats):
  for k, v in overrides.items():
    config.parallel[k] = v
  tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), steps_per_epoch=100)
  graphdef, state = state_lib.create_train_state(specs.model_spec(config), tx, seed=config.seed)
  loss_spec = specs.loss_spec(config)
  if name == 'single':
    step = parallel.jit_train_step(graphdef=graphdef, tx=tx, loss_spec=loss_spec)
    place, state = (lambda b: b), jax.device_put(state, jax.devices()[0])
  else:
    par = parallel.DataParallel(specs.mesh_spec(config))
    step = par.train_step(graphdef=graphdef, tx=tx, loss_spec=loss_spec,
                          abstract_state=jax.eval_shape(lambda: state))
    place, state = par.place_batch, par.place_state(state)
  start = time.perf_counter()
  state, metrics = step(state, place(batches[0]))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  state, metrics = step(state, place(batches[1]))
  jax.block_until_ready(metrics)
  times = []
  for i in range(repeats):
    batch = place(batches[i % len(batches)])
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  tokens = statistics.mean(int(b['target_mask'].sum()) for b in batches)
  s = perf_common.stats(times)
  return {'layout': name, 'compile_and_first_step_s': compile_s,
          'median_step_s': s['median_seconds'], 'min_step_s': s['min_seconds'],
          'max_step_s': s['max_seconds'], 'spread': s['spread'],
          'tokens_per_s': tokens / s['median_seconds']}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/small.py')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--out-dir', default='benchmarks/results')
  args = parser.parse_args()
  config = config_lib.load_file(args.config)
  source = pipeline.make_source(specs.data_spec(config), 'train')
  it = pipeline.train_iterator(source, batch_size=config.train.batch_size, seed=0, epoch=0)
  batches = [next(it) for _ in range(4)]
  devices = jax.device_count()
  rows = []
  for name, overrides in layouts(devices):
    if config.train.batch_size % devices and name != 'single':
      continue
    row = measure(config_lib.load_file(args.config), name, overrides, batches, args.repeats)
    rows.append(row)
    print(f'{name:24s} step {1e3 * row["median_step_s"]:8.1f} ms (min {1e3 * row["min_step_s"]:.1f}'
          f', max {1e3 * row["max_step_s"]:.1f})  {row["tokens_per_s"]:9.0f} real tok/s  '
          f'compile+first {row["compile_and_first_step_s"]:.1f} s', flush=True)
  result = {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
            'devices': devices, 'config': args.config, 'batch_size': config.train.batch_size,
            'repeats': args.repeats, 'jax': jax.__version__, 'rows': rows}
  perf_common.write_results(result, f'parallel_{perf_common.device_name()}', args.out_dir)


if __name__ == '__main__':
  main()
