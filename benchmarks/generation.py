"""Decoding speed: KV-cached against recomputing the whole forward pass at every token.

  python benchmarks/generation.py [--config configs/small.py] [--lengths 256,1024,4096]
      [--kinds dense,window] [--batch 4] [--repeats 3]

The model is the config's (random weights: speed does not depend on them) with position
embeddings for the longest length. Every page runs to its full length (an EOS id no token
equals), greedy, float32. For each (kind, length):
- cached: `decoding.decode_tokens(..., use_cache=True)`, the jitted while_loop generate and
  evaluation use; median of --repeats runs after one warm-up, each to block_until_ready;
- uncached: the same loop with `use_cache=False` (the full [batch, length] forward pass at every
  position, fixed shapes). Its cost per token does not depend on the position, so above
  --uncached-full-max tokens it is timed over the first --uncached-steps positions only (a
  `fori_loop` over the same stepper; a full uncached run at 4096 tokens would take hours) and
  the `uncached_steps` field says so.
Writes benchmarks/results/generation_<device>.json and prints a table with tokens/s (decoded
tokens of all pages per second), ms per token-step, and cached/uncached speedup.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Runs as a script from the repository root: find the package and the sibling modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import perf_common  # noqa: E402

from phase1_jax import config as config_lib  # noqa: E402
from phase1_jax import specs  # noqa: E402
from phase1_jax.inference import decoding  # noqa: E402
from phase1_jax.model.phase1 import Phase1Decoder  # noqa: E402

IDS = decoding.TokenIds(bos=1, eos=-1, pad=0)   # eos -1: every page runs to max_len


def build_model(config, kind, max_len, args):
  config.data.max_seq_len = max_len
  config.model.attention.kind = kind
  config.model.attention.window_size = args.window
  return nnx.split(Phase1Decoder(specs.model_spec(config), rngs=nnx.Rngs(0)))


def timed(fn, repeats):
  """(median, min, max) seconds of `fn` over `repeats` runs after one warm-up."""
  fn()   # warm-up (compiled already)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  s = perf_common.stats(times)
  return s['median_seconds'], s['min_seconds'], s['max_seconds']


def run_cached(graphdef, params, features, mask, length, use_cache, repeats):
  settings = decoding.DecodeSettings(max_len=length)

  @jax.jit
  def decode(params, features, mask):
    model = nnx.merge(graphdef, params)
    return decoding.decode_tokens(model, features, mask, settings=settings, ids=IDS,
                                  use_cache=use_cache)[0]

  compiled = decode.lower(params, features, mask).compile()
  return timed(lambda: compiled(params, features, mask).block_until_ready(), repeats)


def run_uncached_steps(graphdef, params, features, mask, length, steps, repeats):
  """The first `steps` positions of the recomputing loop (same stepper as decode_tokens)."""
  @jax.jit
  def decode(params, features, mask):
    model = nnx.merge(graphdef, params)
    stepper = decoding.recompute_stepper(model, features, mask, length, IDS.pad)

    def body(pos, carry):
      prev, state = carry
      logits, state = stepper.step(prev, pos, state)
      return jnp.argmax(logits, -1).astype(jnp.int32), state
    start = (jnp.full((features.shape[0],), IDS.bos, jnp.int32), stepper.state)
    return jax.lax.fori_loop(0, steps, body, start)[0]

  compiled = decode.lower(params, features, mask).compile()
  return timed(lambda: compiled(params, features, mask).block_until_ready(), repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/small.py')
  parser.add_argument('--lengths', default='256,1024,4096')
  parser.add_argument('--kinds', default='dense,window')
  parser.add_argument('--window', type=int, default=128)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--uncached-full-max', type=int, default=256)
  parser.add_argument('--uncached-steps', type=int, default=16)
  parser.add_argument('--out-dir', default='benchmarks/results')
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(',')]
  config = config_lib.load_file(args.config)
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(args.batch, config.data.grid_rows * config.data.grid_cols,
                                          config.data.feature_dim)), jnp.float32)
  mask = jnp.ones(features.shape[:2], bool)
  rows = []
  for kind in args.kinds.split(','):
    graphdef, params = build_model(config_lib.load_file(args.config), kind, max(lengths), args)
    for length in lengths:
      row = dict(kind=kind, length=length, batch=args.batch)
      med, lo, hi = run_cached(graphdef, params, features, mask, length, True, args.repeats)
      row.update(cached_s=med, cached_min_s=lo, cached_max_s=hi)
      if length <= args.uncached_full_max:
        med, lo, hi = run_cached(graphdef, params, features, mask, length, False, args.repeats)
        steps = length
      else:
        steps = args.uncached_steps
        med, lo, hi = run_uncached_steps(graphdef, params, features, mask, length, steps,
                                         args.repeats)
      row.update(uncached_steps=steps, uncached_s=med, uncached_min_s=lo, uncached_max_s=hi)
      row['cached_tokens_per_s'] = args.batch * length / row['cached_s']
      row['uncached_tokens_per_s'] = args.batch * steps / row['uncached_s']
      row['cached_ms_per_step'] = 1e3 * row['cached_s'] / length
      row['uncached_ms_per_step'] = 1e3 * row['uncached_s'] / steps
      row['speedup'] = row['cached_tokens_per_s'] / row['uncached_tokens_per_s']
      rows.append(row)
      print(f'{kind:8s} T={length:5d}  cached {row["cached_tokens_per_s"]:9.0f} tok/s '
            f'({row["cached_ms_per_step"]:.2f} ms/step)  uncached '
            f'{row["uncached_tokens_per_s"]:8.1f} tok/s ({row["uncached_ms_per_step"]:.1f} '
            f'ms/step, {steps} steps)  speedup {row["speedup"]:.1f}x', flush=True)
  result = {'device': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
            'config': args.config, 'window_size': args.window, 'batch': args.batch,
            'repeats': args.repeats, 'jax': jax.__version__, 'rows': rows}
  perf_common.write_results(result, f'generation_{perf_common.device_name()}', args.out_dir)


if __name__ == '__main__':
  main()
