"""Train-step time of a config under compute-dtype and layer-loop variants, in one process.

  python benchmarks/train_step.py --config configs/small.py [--repeats 20]

For each variant: compile time, then the median (and spread) of `repeats` step times after two
warm-up steps, each timed to `block_until_ready()`. Variants run interleaved round by round so
machine noise hits all of them alike; compare them as ratios. Writes
benchmarks/results/train_step_<device>_<config>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax

from phase1_jax import config as config_lib
from phase1_jax.data import pipeline
from phase1_jax.training import parallel
from phase1_jax.training import state as state_lib
from phase1_jax.training import step as step_lib

VARIANTS = {
    'float32_scan': {'compute_dtype': 'float32', 'scan_layers': True},
    'float32_unrolled': {'compute_dtype': 'float32', 'scan_layers': False},
    'bfloat16_scan': {'compute_dtype': 'bfloat16', 'scan_layers': True},
    'bfloat16_unrolled': {'compute_dtype': 'bfloat16', 'scan_layers': False},
}


def build(config, overrides, batch):
  for k, v in overrides.items():
    config.model[k] = v
  tx, _ = state_lib.make_optimizer(config, steps_per_epoch=1000)
  graphdef, state = state_lib.create_train_state(config, tx)
  step = parallel.jit_train_step(graphdef=graphdef, tx=tx,
                                 loss_spec=step_lib.LossSpec.from_config(config))
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  return {'compiled': compiled, 'state': state, 'compile_seconds': compile_s, 'times': []}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/small.py')
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--variants', default=','.join(VARIANTS))
  args = parser.parse_args()

  base = config_lib.load_file(args.config)
  source = pipeline.make_source(base, 'train')
  batch = next(pipeline.train_iterator(source, batch_size=base.train.batch_size, seed=0, epoch=0))
  names = args.variants.split(',')
  runs = {name: build(config_lib.load_file(args.config), VARIANTS[name], batch) for name in names}
  for _ in range(args.repeats):
    for name in names:
      run = runs[name]
      start = time.perf_counter()
      run['state'], metrics = run['compiled'](run['state'], batch)
      jax.block_until_ready(metrics)
      run['times'].append(time.perf_counter() - start)

  tokens = int(batch['target_mask'].sum())
  device = jax.devices()[0].device_kind.replace(' ', '_').lower()
  baseline = statistics.median(runs[names[0]]['times'])
  results = {'config': args.config, 'device': jax.devices()[0].device_kind,
             'backend': jax.default_backend(), 'batch_size': base.train.batch_size,
             'seq_len': base.data.max_seq_len, 'real_tokens_per_batch': tokens,
             'repeats': args.repeats, 'variants': {}}
  print(f'{"variant":<20} {"compile s":>10} {"median ms":>10} {"min-max ms":>15} '
        f'{"tokens/s":>10} {"vs " + names[0]:>22}')
  for name in names:
    times = runs[name]['times']
    med = statistics.median(times)
    row = {'compile_seconds': runs[name]['compile_seconds'], 'median_seconds': med,
           'min_seconds': min(times), 'max_seconds': max(times), 'tokens_per_second': tokens / med,
           'speedup_vs_first': baseline / med}
    results['variants'][name] = row
    print(f'{name:<20} {row["compile_seconds"]:>10.1f} {med * 1e3:>10.1f} '
          f'{min(times) * 1e3:>7.1f}-{max(times) * 1e3:<7.1f} {tokens / med:>10,.0f} '
          f'{baseline / med:>21.2f}x')
  os.makedirs('benchmarks/results', exist_ok=True)
  stem = os.path.splitext(os.path.basename(args.config))[0]
  out = f'benchmarks/results/train_step_{device}_{stem}.json'
  with open(out, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
