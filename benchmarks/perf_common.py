"""Shared by the train-step benchmarks: analytic FLOPs, measured matmul peak, timing statistics.

FLOP formula (matmuls only; a multiply-add counts 2; elementwise work, softmax, norms, the
optimizer are left out, as in the usual MFU convention). Per sequence of T positions over P
memory patches, with D model width, M MLP width, V vocabulary, C semantic classes, E element
types, F feature width, L layer applications (sharing does not change FLOPs):

  memory       2 P F D                     (feature projection)
  per layer    2 T D 3D + 2 T D D          self-attention QKV, output
               2 T T D  + 2 T T D          scores, weighted values (full T x T: the dense kind
                                           computes masked entries too)
               2 T D D + 2 P D 2D + 2 T D D  cross Q, memory KV, output
               2 T P D  + 2 T P D          cross scores, values
               2 T D M  + 2 T M D          MLP
  heads        2 T D V + 2 T D C           detail (tied), semantic
  classifier   2 T D E + 2 E T D + 2 E D   pooling scores, pooled states, readout

A train step is forward + backward = 3x the forward (the backward computes each matmul's input
gradient and weight gradient), less the feature projection's input gradient (features are data).
`check_flops_against_xla` compares this with XLA's cost analysis of the unrolled step.
"""
from __future__ import annotations

import ast
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def parse_sets(items) -> dict:
  """{'a.b': value} from ['a.b=value', ...] (values as Python literals, else strings)."""
  out = {}
  for item in items:
    key, value = item.split('=', 1)
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def apply_overrides(config, overrides: dict):
  """Sets each dotted path of `overrides` in `config` (in place) and returns it."""
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def first_batch(config) -> dict:
  """The first training batch of `config`'s dataset (seed 0, epoch 0), as numpy arrays."""
  from phase1_jax import specs
  from phase1_jax.data import pipeline
  source = pipeline.make_source(specs.data_spec(config), 'train')
  batch = next(pipeline.train_iterator(source, batch_size=config.train.batch_size, seed=0,
                                       epoch=0))
  return {k: np.asarray(v) for k, v in batch.items()}


def analytic_flops(config) -> dict:
  """{'forward': ..., 'train_step': ...} FLOPs of one batch of `config` (see module docstring)."""
  m, d = config.model, config.data
  B, T, P, F = config.train.batch_size, d.max_seq_len, d.grid_rows * d.grid_cols, d.feature_dim
  D, M, V, C, E, L = (m.d_model, m.mlp_dim, m.vocab_size, m.num_semantic_classes,
                      m.num_element_types, m.num_layers)
  memory = 2 * P * F * D
  layer = (2 * T * D * 3 * D + 2 * T * D * D + 4 * T * T * D
           + 2 * T * D * D + 2 * P * D * 2 * D + 2 * T * D * D + 4 * T * P * D
           + 4 * T * D * M)
  heads = 2 * T * D * V + 2 * T * D * C + 2 * T * D * E + 2 * E * T * D + 2 * E * D
  forward = B * (memory + L * layer + heads)
  return {'forward': forward, 'train_step': 3 * forward - B * memory}


def xla_flops(compiled) -> float | None:
  """FLOPs XLA's cost analysis gives a compiled executable (a scanned body counts only once)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return None if not cost else float(cost.get('flops', 0.0)) or None


def peak_size() -> int:
  """Matmul size for the peak: 2048 on CPU (about 0.1 s per call there), 8192 on GPU/TPU (a 2048
  matmul is too short to reach an accelerator's peak)."""
  return 2048 if jax.default_backend() == 'cpu' else 8192


def peak_runner(dtype, n: int | None = None):
  """(run, flops): `run()` does one n x n x n matmul in `dtype` on the device and waits for it
  (n: peak_size()).

  The benchmarks time it in the same interleaved rounds as the steps, so the peak and the steps
  see the same machine load, and MFU = (step FLOP/s) / (peak FLOP/s) compares like with like.
  """
  n = n or peak_size()
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  mm = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(mm(a, b))
  return (lambda: jax.block_until_ready(mm(a, b))), 2 * n ** 3


def peak_summary(dtype, times, flops) -> dict:
  """The matmul peak from its interleaved timings: median-based (what MFU divides by) and best."""
  return {'dtype': str(jnp.dtype(dtype)), 'n': round((flops / 2) ** (1 / 3)),
          'repeats': len(times),
          'flops_per_second': flops / statistics.median(times),
          'best_flops_per_second': flops / min(times),
          'spread': (max(times) - min(times)) / statistics.median(times)}


def stats(times: list[float]) -> dict:
  """Median and spread of step times: min, max, and (max - min) / median as one noise number."""
  med = statistics.median(times)
  q = statistics.quantiles(times, n=4) if len(times) >= 2 else [med, med, med]
  return {'median_seconds': med, 'min_seconds': min(times), 'max_seconds': max(times),
          'iqr_seconds': q[2] - q[0], 'spread': (max(times) - min(times)) / med,
          'repeats': len(times)}


def device_name() -> str:
  """'cpu' on CPU, else the device kind ('nvidia_h100_80gb_hbm3'), for result file names."""
  dev = jax.devices()[0]
  return 'cpu' if dev.platform == 'cpu' else dev.device_kind.replace(' ', '_').lower()


def host_cpu() -> str:
  """The host CPU's model name (/proc/cpuinfo): CPU figures from different runs may come from
  different machines, whose relative speeds differ (PyTorch's oneDNN against XLA, say)."""
  try:
    with open('/proc/cpuinfo') as f:
      return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                  'unknown')
  except OSError:
    return 'unknown'


def memory_bytes(compiled) -> dict:
  """XLA's memory analysis of the compiled step: 'compiled_memory_bytes' (arguments + outputs +
  temporaries - aliased: the state, the batch and every intermediate) and 'temp_memory_bytes'
  (the intermediates alone: activations, logits, gradients before the update). None where XLA
  reports nothing."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    mem = None
  if mem is None:
    return {'compiled_memory_bytes': None, 'temp_memory_bytes': None}
  return {'compiled_memory_bytes': int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                       + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
          'temp_memory_bytes': int(mem.temp_size_in_bytes)}


def compile_train_step(config, batch, *, one_device: bool = False):
  """The train step of `config` compiled as the trainer runs it: over all devices in the config's
  parallel layout (DataParallel; on a CPU host, the per-core devices `configure_cpu_devices`
  made), or with `one_device` a plain jit on the first device.

  Returns (compiled, placed state, placed batch, info) where info holds the layout, device
  count, parameter count and the lower / compile seconds (timed apart).
  """
  from flax import nnx

  from phase1_jax import specs
  from phase1_jax.model.phase1 import count_params
  from phase1_jax.training import parallel
  from phase1_jax.training import state as state_lib
  tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), steps_per_epoch=1000)
  graphdef, state = state_lib.create_train_state(specs.model_spec(config), tx, seed=config.seed)
  loss_spec = specs.loss_spec(config)
  params = count_params(nnx.merge(graphdef, state.params['model']))
  if one_device or jax.device_count() == 1:
    device = jax.devices()[0]
    step = parallel.jit_train_step(graphdef=graphdef, tx=tx, loss_spec=loss_spec)
    state, batch = jax.device_put(state, device), jax.device_put(batch, device)
    layout, devices = 'one device', 1
  else:
    par = parallel.DataParallel(specs.mesh_spec(config))
    step = par.train_step(graphdef=graphdef, tx=tx, loss_spec=loss_spec,
                          abstract_state=jax.eval_shape(lambda: state))
    state, batch = par.place_state(state), par.place_batch(batch)
    layout, devices = f'{par.mode} over {par.num_devices} devices', par.num_devices
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s
  return compiled, state, batch, {'layout': layout, 'devices': devices, 'params': params,
                                  'lower_seconds': lower_s, 'compile_seconds': compile_s}


def loss_value(metrics) -> float:
  """The step's loss on the host (waits for the step); pmap returns one copy per device."""
  return float(np.asarray(jax.device_get(metrics['loss'])).ravel()[0])


def flop_unit() -> tuple[str, float]:
  """('GFLOP/s', 1e9) on CPU, ('TFLOP/s', 1e12) on an accelerator: the unit printed tables use."""
  return ('GFLOP/s', 1e9) if jax.default_backend() == 'cpu' else ('TFLOP/s', 1e12)


def peak_line(peaks: dict) -> str:
  """One line of the matmul peaks `peak_summary` gave, per dtype: median; best."""
  unit, scale = flop_unit()
  return 'XLA matmul peak (median; best): ' + ', '.join(
      f'{k} {v["flops_per_second"] / scale:.0f}; {v["best_flops_per_second"] / scale:.0f} {unit}'
      for k, v in peaks.items())


def write_results(results: dict, name: str, out_dir: str = 'benchmarks/results') -> None:
  """<out_dir>/<name>.json, and a line saying so."""
  os.makedirs(out_dir, exist_ok=True)
  out = os.path.join(out_dir, f'{name}.json')
  with open(out, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {out}')
