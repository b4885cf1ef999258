"""Runs in a subprocess with 8 forced CPU devices (tests/test_parallel.py starts it): trains the
tiny config a few steps under each parallel layout and prints one JSON object of results.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_worker.py equivalence
  ... python tests/parallel_worker.py checkpoint DIR
  ... python tests/parallel_worker.py errors
  ... python tests/parallel_worker.py evaluation DIR
  ... python tests/parallel_worker.py all DIR
"""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

jax.config.update('jax_compilation_cache_dir', os.path.join(REPO, '.jax_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

from phase1_jax import config as config_lib  # noqa: E402
from phase1_jax import config_validation, specs  # noqa: E402
from phase1_jax.data import pipeline  # noqa: E402
from phase1_jax.inference import evaluation as evaluation_lib  # noqa: E402
from phase1_jax.training import parallel  # noqa: E402
from phase1_jax.training import state as state_lib  # noqa: E402
from phase1_jax.training import step as step_lib  # noqa: E402
from phase1_jax.training.checkpoint import CONFIG_KEY, Checkpointer  # noqa: E402

STEPS = 3


def tiny(mode='jit', fsdp=1, data=0):
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py'))
  config.model.dropout_rate = 0.0            # same masks in every layout
  config.loss.weighting = 'uncertainty'      # the s/2 term must be split over devices too
  config.train.batch_size = 8
  config.train.warmup_steps = 0
  config.parallel.mode, config.parallel.fsdp, config.parallel.data = mode, fsdp, data
  config_validation.validate(config)
  return config


def batches(config, n):
  source = pipeline.make_source(specs.data_spec(config), 'train')
  it = pipeline.train_iterator(source, batch_size=config.train.batch_size, seed=0, epoch=0)
  return [next(it) for _ in range(n)]


def setup(config):
  tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), steps_per_epoch=8)
  graphdef, state = state_lib.create_train_state(specs.model_spec(config), tx, seed=config.seed)
  return tx, graphdef, state


def run_single(config, data):
  """The reference: one device, plain jit."""
  tx, graphdef, state = setup(config)
  step = parallel.jit_train_step(graphdef=graphdef, tx=tx,
                                 loss_spec=specs.loss_spec(config))
  state = jax.device_put(state, jax.devices()[0])
  losses = []
  for batch in data:
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return jax.device_get(state), losses


def run_parallel(config, data, state=None, tx=None, graphdef=None):
  par = parallel.DataParallel(specs.mesh_spec(config))
  if state is None:
    tx, graphdef, state = setup(config)
  abstract = jax.eval_shape(lambda: state)
  step = par.train_step(graphdef=graphdef, tx=tx, loss_spec=specs.loss_spec(config),
                        abstract_state=abstract)
  state = par.place_state(state)
  losses = []
  for batch in data:
    state, metrics = step(state, par.place_batch(batch))
    losses.append(float(par.metrics_to_host(metrics)['loss']))
  return par, state, losses


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def key_bias_mask(params, d_model):
  """True on the key projections' biases (self-attention qkv bias [d:2d], cross-attention kv
  bias [:d]). Softmax is shift-invariant, so their true gradient is exactly zero; the float
  noise left in it has a sign that depends on reduction order, and Adam scales any nonzero
  gradient to a step of about the learning rate. They are compared apart."""
  def mask(path, x):
    names = jax.tree_util.keystr(path)
    m = np.zeros(np.shape(x), bool)
    if "['self_attn']['qkv']['bias']" in names:
      m[..., d_model:2 * d_model] = True
    elif "['cross_attn']['kv']['bias']" in names:
      m[..., :d_model] = True
    return m
  return jax.tree_util.tree_map_with_path(mask, params)


def param_diffs(a, b, d_model):
  """(max |a - b| over all parameters but the key biases, max over the key biases)."""
  masks = key_bias_mask(a, d_model)
  rest, keys = 0.0, 0.0
  for x, y, m in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(masks), strict=True):
    d = np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
    rest = max(rest, float(d[~m].max(initial=0.0)))
    keys = max(keys, float(d[m].max(initial=0.0)))
  return rest, keys


def logits_diff(config, params_a, params_b, batch):
  """max |logits_a - logits_b| of the detail head on a batch: what the models compute."""
  _, graphdef, _ = setup(config)
  out = [step_lib.forward(graphdef, p['model'], batch)['detail_logits'] for p in (params_a,
                                                                                 params_b)]
  return float(np.abs(np.asarray(out[0]) - np.asarray(out[1])).max())


def equivalence():
  data = batches(tiny(), STEPS)
  reference, ref_losses = run_single(tiny(), data)
  out = {'devices': jax.device_count(), 'reference_losses': ref_losses}
  for name, kwargs in (('pmap', dict(mode='pmap')), ('jit_fsdp1', dict(mode='jit')),
                       ('jit_fsdp2', dict(mode='jit', fsdp=2))):
    par, state, losses = run_parallel(tiny(**kwargs), data)
    host = jax.device_get(par.unreplicate(state))
    rest, keys = param_diffs(host.params, reference.params, tiny().model.d_model)
    out[name] = {'losses': losses, 'max_param_diff': rest, 'max_key_bias_diff': keys,
                 'moved': max_diff(host.params, setup(tiny())[2].params),
                 'logits_diff': logits_diff(tiny(), host.params, reference.params, data[0]),
                 'step': int(host.step)}
    if kwargs.get('mode') == 'jit':
      kernel = state.params['model']['token_embed']['embedding']
      opt_leaf = jax.tree.leaves(state.opt_state)[-1]
      out[name]['mesh'] = dict(par.mesh.shape)
      out[name]['embedding_spec'] = str(kernel.sharding.spec)
      out[name]['embedding_shard_shape'] = list(kernel.addressable_shards[0].data.shape)
      out[name]['opt_leaf_spec'] = str(opt_leaf.sharding.spec)
      out[name]['batch_spec'] = str(par.batch_sharding.spec)
  return out


def checkpoint(directory):
  """Train 2 steps on an 8-way data mesh and save; restore on one device and on a 4x2
  (data x fsdp) mesh; each takes one more step, as does the uninterrupted 8-way run."""
  data = batches(tiny(), 3)
  config = tiny(data=8)
  par, state, _ = run_parallel(config, data[:2])
  with Checkpointer(directory, async_save=False) as ckpt:
    ckpt.save(2, par.unreplicate(state), extra={'epoch': 0})
  _, _, continued = run_parallel(config, data[2:], *_restored(config, directory, par))
  out = {'uninterrupted': continued}
  # One device: restore without shardings onto device 0, the plain jit step.
  tx, graphdef, fresh = setup(tiny())
  with Checkpointer(directory) as ckpt:
    single_target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(
                                           jax.devices()[0])),
        jax.eval_shape(lambda: fresh))
    restored, _ = ckpt.restore(2, single_target)
  step = parallel.jit_train_step(graphdef=graphdef, tx=tx,
                                 loss_spec=specs.loss_spec(tiny()))
  out['one_device_step'] = int(restored.step)
  _, metrics = step(restored, data[2])
  out['one_device'] = [float(metrics['loss'])]
  mesh_4x2 = tiny(data=4, fsdp=2)
  par_4x2 = parallel.DataParallel(specs.mesh_spec(mesh_4x2))
  _, state_4x2, losses = run_parallel(mesh_4x2, data[2:], *_restored(mesh_4x2, directory,
                                                                    par_4x2))
  out['mesh_4x2'] = losses
  out['mesh_4x2_embedding_spec'] = str(
      state_4x2.params['model']['token_embed']['embedding'].sharding.spec)
  return out


def _restored(config, directory, par):
  tx, graphdef, fresh = setup(config)
  with Checkpointer(directory) as ckpt:
    state, _ = ckpt.restore(2, par.restore_target(jax.eval_shape(lambda: fresh)))
  return state, tx, graphdef


def errors():
  out = {}
  for name, overrides in (('batch', dict(batch_size=12)), ('mesh', dict(data=16)),
                          ('pmap_fsdp', dict(mode='pmap', fsdp=2)),
                          ('eval_batch', dict(fsdp=4, eval_batch_size=12))):
    config = tiny(**{k: v for k, v in overrides.items() if not k.endswith('batch_size')})
    config.train.batch_size = overrides.get('batch_size', config.train.batch_size)
    config.eval.batch_size = overrides.get('eval_batch_size', config.eval.batch_size)
    out[name] = _config_error(lambda c: parallel.DataParallel(specs.mesh_spec(c)), config)
  # The last config's eval batch: named before any checkpoint is looked for (no such workdir).
  out['eval_batch_load'] = _config_error(
      lambda c, w: evaluation_lib.load_trained(specs.run_spec(c), w), config,
      os.path.join(REPO, 'no_such_workdir'))
  return out


def _config_error(fn, *args):
  try:
    fn(*args)
  except config_lib.ConfigError as e:
    return str(e)
  return None


TIMES = ('decode_seconds', 'bleu_decode_seconds')


def evaluation(directory):
  """Train STEPS steps on a 2 x 4 (data x fsdp) mesh and save; evaluate the checkpoint on that
  mesh (load_trained and Evaluator with its DataParallel), on a 1 x 1 mesh, and with the plain
  one-device Evaluator. Returns each one's metrics, their largest differences from the 2 x 4
  mesh's, and how the 2 x 4 mesh held the params."""
  config = tiny(fsdp=4)
  par, state, _ = run_parallel(config, batches(config, STEPS))
  workdir = os.path.join(directory, 'evaluation')
  with Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False) as ckpt:
    ckpt.save(STEPS, par.unreplicate(state), extra={'epoch': 1, CONFIG_KEY: config.to_dict()})
  out, metrics = {}, {}
  for name, layout in (('mesh_2x4', dict(fsdp=4)), ('mesh_1x1', dict(data=1)),
                       ('one_device', None)):
    cfg = tiny(**(layout or dict(data=1)))
    par = parallel.DataParallel(specs.mesh_spec(cfg))
    graphdef, params, step, _ = evaluation_lib.load_trained(specs.run_spec(cfg), workdir,
                                                            par=par)
    source = pipeline.make_source(specs.data_spec(cfg), 'val')
    evaluate = evaluation_lib.Evaluator(specs.eval_spec(cfg), graphdef, source,
                                        par=par if layout else None)
    if layout is None:
      params = jax.device_put(params, jax.devices()[0])
    metrics[name] = {k: float(v) for k, v in evaluate(params, source).items() if k not in TIMES}
    if name == 'mesh_2x4':
      out['step'], out['mesh'] = int(step), dict(par.mesh.shape)
      out['sharding'] = _param_sharding(params)
  for name in ('mesh_1x1', 'one_device'):
    out[f'{name}_diffs'] = _metric_diffs(metrics['mesh_2x4'], metrics[name])
  out['metrics'] = metrics
  return out


def _param_sharding(params):
  """How the FSDP mesh holds the params: the leaves split over 'fsdp' and the embedding's spec
  and shard shape beside its whole shape."""
  leaves = jax.tree.leaves(params)
  split = [x for x in leaves if 'fsdp' in str(x.sharding.spec)
           and x.addressable_shards[0].data.size < x.size]
  kernel = params['model']['token_embed']['embedding']
  return {'split_leaves': len(split), 'leaves': len(leaves),
          'embedding_spec': str(kernel.sharding.spec), 'embedding_shape': list(kernel.shape),
          'embedding_shard_shape': list(kernel.addressable_shards[0].data.shape)}


def _metric_diffs(a: dict, b: dict) -> dict:
  """Largest relative difference of the losses (val_*) and absolute of the other metrics."""
  assert a.keys() == b.keys(), (sorted(a), sorted(b))
  loss = [abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in a if k.startswith('val_')]
  other = [abs(a[k] - b[k]) for k in a if not k.startswith('val_')]
  return {'loss_rel': max(loss), 'other_abs': max(other),
          'worst_other': max((k for k in a if not k.startswith('val_')),
                             key=lambda k: abs(a[k] - b[k]))}


if __name__ == '__main__':
  what = sys.argv[1]
  result = {'equivalence': equivalence, 'errors': errors,
            'checkpoint': lambda: checkpoint(sys.argv[2]),
            'evaluation': lambda: evaluation(sys.argv[2]),
            'all': lambda: {'equivalence': equivalence(), 'errors': errors(),
                            'checkpoint': checkpoint(sys.argv[2]),
                            'evaluation': evaluation(sys.argv[2])}}[what]()
  print('RESULT ' + json.dumps(result))
