"""What checkpoint checksums cost: save and restore time with and without them.

  python benchmarks/checkpoint_checksum.py [--configs small,default] [--repeats 5]
      [--default-repeats 3] [--dir /tmp]

For each config, the train state a run checkpoints (`state.create_train_state`: parameters,
Adam moments, step, RNG key; initialized, not trained: time depends on sizes only) and the
`extra` dict a run saves with it (here its config) are saved and restored through
`checkpoint.Checkpointer` with `checksums=True` and `checksums=False`, alternating which goes
first in each repeat, one fresh directory per save (deleted outside the timing):
- save: `save()` plus `wait_until_finished()`, async as a run saves by default: the time until
  the step is committed; `save_call`: the `save()` call alone (what the train loop waits for,
  the checksums being hashed in it);
- restore: `restore(step, abstract state)` (the checksums verified in it), page cache warm;
- digest: `checkpoint_compat.tree_digests(state)` alone.
Medians over --repeats (--default-repeats for configs/default.py), and with/without ratios.
Writes benchmarks/results/checkpoint_checksum_<device>.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

# Runs as a script from the repository root: find the package and the sibling modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import perf_common  # noqa: E402

from phase1_jax import config as config_lib  # noqa: E402
from phase1_jax import specs  # noqa: E402
from phase1_jax.training import checkpoint_compat as compat  # noqa: E402
from phase1_jax.training import state as state_lib  # noqa: E402
from phase1_jax.training.checkpoint import Checkpointer  # noqa: E402


def train_state(name: str):
  """(state, abstract state, extra) of configs/<name>.py, on the default device."""
  config = config_lib.load_file(os.path.join(os.path.dirname(_HERE), 'configs', f'{name}.py'))
  tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), 100)
  _, state = state_lib.create_train_state(specs.model_spec(config), tx, seed=config.seed)
  jax.block_until_ready(state)
  return state, jax.eval_shape(lambda: state), {'epoch': 1, 'config': config.to_dict()}


def state_bytes(state) -> int:
  """Bytes of the arrays (typed PRNG keys as their key data), as Orbax stores them."""
  return sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(
      jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
          x.dtype, jax.dtypes.prng_key) else x, state)))


def one_round(root: str, state, target, extra, checksums: bool) -> dict[str, float]:
  """Seconds of one save (the call, and until committed) and one restore."""
  directory = tempfile.mkdtemp(dir=root)
  try:
    with Checkpointer(directory, checksums=checksums) as ckpt:
      start = time.perf_counter()
      ckpt.save(1, state, extra=extra)
      called = time.perf_counter()
      ckpt.wait_until_finished()
      saved = time.perf_counter()
      restored, _ = ckpt.restore(1, target)
      jax.block_until_ready(restored)
      done = time.perf_counter()
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  return {'save_call': called - start, 'save': saved - start, 'restore': done - saved}


def measure(name: str, repeats: int, root: str) -> dict:
  state, target, extra = train_state(name)
  times = {(mode, what): [] for mode in ('with', 'without')
           for what in ('save_call', 'save', 'restore')}
  one_round(root, state, target, extra, True)   # warm-up: Orbax's first save sets things up
  for r in range(repeats):
    order = (True, False) if r % 2 == 0 else (False, True)
    for checksums in order:
      for what, seconds in one_round(root, state, target, extra, checksums).items():
        times['with' if checksums else 'without', what].append(seconds)
  digest = []
  for _ in range(repeats):
    start = time.perf_counter()
    compat.tree_digests(state)
    digest.append(time.perf_counter() - start)
  med = {f'{what}_{mode}': perf_common.stats(t)['median_seconds']
         for (mode, what), t in times.items()}
  ratios = {f'{what}_ratio': med[f'{what}_with'] / med[f'{what}_without']
            for what in ('save_call', 'save', 'restore')}
  return {'config': name, 'state_megabytes': state_bytes(state) / 1e6, 'leaves':
          len(jax.tree.leaves(state)), 'repeats': repeats, 'median_seconds': med, **ratios,
          'digest_median_seconds': perf_common.stats(digest)['median_seconds'],
          'all_seconds': {f'{what}_{mode}': t for (mode, what), t in times.items()}}


def print_table(rows: list[dict]) -> None:
  print(f'{"config":8} {"MB":>7} | {"save w/o":>9} {"save w/":>9} {"ratio":>6} | '
        f'{"call w/o":>9} {"call w/":>9} | {"restore w/o":>11} {"restore w/":>10} {"ratio":>6} |'
        f' {"digest":>7}')
  for r in rows:
    m = r['median_seconds']
    print(f'{r["config"]:8} {r["state_megabytes"]:7.1f} | {m["save_without"]:8.3f}s '
          f'{m["save_with"]:8.3f}s {r["save_ratio"]:6.3f} | {m["save_call_without"]:8.3f}s '
          f'{m["save_call_with"]:8.3f}s | {m["restore_without"]:10.3f}s {m["restore_with"]:9.3f}s '
          f'{r["restore_ratio"]:6.3f} | {r["digest_median_seconds"]:6.3f}s')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='small,default')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--default-repeats', type=int, default=3,
                      help='repeats for configs/default.py (800 MB of state per save)')
  parser.add_argument('--dir', default=None, help='where the checkpoints go (default: $TMPDIR)')
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix='checkpoint_checksum_', dir=args.dir)
  try:
    rows = [measure(name, args.default_repeats if name == 'default' else args.repeats, root)
            for name in args.configs.split(',')]
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f'{perf_common.host_cpu()}, {os.cpu_count()} cores, {jax.default_backend()}')
  print_table(rows)
  perf_common.write_results({'device': perf_common.device_name(), 'cpu': perf_common.host_cpu(),
                             'cores': os.cpu_count(), 'digest': compat.DIGEST_ALGORITHM,
                             'results': rows}, f'checkpoint_checksum_{perf_common.device_name()}')


if __name__ == '__main__':
  main()
