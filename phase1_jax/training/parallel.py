"""The one place where steps are compiled and placed on devices.

`config.parallel.mode`:
- `jit` (default): one program over a `Mesh` with axes ('data', 'fsdp'). The batch is sharded
  over both axes. Parameters and optimizer state are replicated (fsdp = 1) or sharded along
  their largest axis divisible by the fsdp size (FSDP / ZeRO-3: XLA gathers them for the
  matmuls and reduce-scatters the gradients), so models larger than one device fit. On several
  hosts every process feeds its own slice of each global batch
  (`jax.make_array_from_process_local_data`).
- `pmap`: classic data parallelism over the local devices: `jax.pmap` of the same step with
  `axis_name='batch'`, the state replicated with a leading device axis, the batch reshaped to
  [devices, per_device_batch, ...]; the step sums each device's share of loss and gradients
  (losses.py), so every mode computes the same update.
Both wrap the same pure `step.train_step`. Checkpoints hold the unreplicated state, so a run
saved in one mode or mesh restores in another. Evaluation and generation (`eval_step`,
`generate`) run on the same layout: in jit mode over the mesh with the params left sharded, so a
model that needs FSDP to train can be evaluated; in pmap mode on one replica.

On a CPU host, the train CLI first splits the machine into per-core devices (host.py).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
from flax import jax_utils, nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from phase1_jax.config import ConfigError
from phase1_jax.inference import decoding
from phase1_jax.model import sparse_dispatch
from phase1_jax.training import placement
from phase1_jax.training import step as step_lib

MESH_AXES = ('data', 'fsdp')
PMAP_AXIS = 'batch'


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """The layout: 'pmap' (replicated state) or 'jit' over a data x fsdp mesh (data 0: all the
  devices fsdp leaves); the global train and eval batch sizes it splits."""
  batch_size: int
  eval_batch_size: int
  mode: str = 'jit'
  data: int = 0
  fsdp: int = 1


def fsdp_spec(shape, fsdp: int) -> P:
  """Shard the largest axis divisible by `fsdp` (first of equals); replicate the rest."""
  if fsdp > 1:
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if shape[axis] % fsdp == 0 and shape[axis] >= fsdp:
        return P(*[('fsdp' if a == axis else None) for a in range(len(shape))])
  return P()


def _fitting_fsdp(devices: int, data: int, batch: int) -> str:
  """The parallel.fsdp values a mesh over `devices` takes, as 'fsdp 1 or 2 fits'."""
  fits = [f for f in range(1, devices + 1) if devices % f == 0 and
          (data or devices // f) * f <= devices and batch % ((data or devices // f) * f) == 0]
  if not fits:
    return f'no fsdp fits parallel.data={data} and train.batch_size={batch}'
  return f'fsdp {" or ".join(map(str, fits))} fits'


def _eval_batch_error(batch: int, data: int, fsdp: int) -> str:
  """The one line for an eval.batch_size the mesh cannot split, with the nearest that fit."""
  n = data * fsdp
  fits = ' or '.join(str(b) for b in (batch // n * n, (batch // n + 1) * n) if b)
  return (f'config.eval.batch_size={batch}: must be divisible by the data-parallel size '
          f'data x fsdp = {data} x {fsdp} = {n} (evaluation splits each batch over the mesh: '
          f'e.g. {fits})')


class DataParallel:
  """Devices, mesh and shardings of a run, and its compiled train, eval and generate steps.
  Validates the layout (and the train and eval batch sizes) against the devices before anything
  compiles (one-line ConfigError)."""

  def __init__(self, spec: MeshSpec):
    p, batch = spec, spec.batch_size
    self.mode = p.mode
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    if batch % self.process_count:
      raise ConfigError(f'config.train.batch_size={batch}: must be divisible by the '
                        f'{self.process_count} processes')
    self.local_batch_size = batch // self.process_count
    if self.mode == 'pmap':
      if p.fsdp != 1:
        raise ConfigError(f'config.parallel.fsdp={p.fsdp}: pmap replicates the state; use '
                          "parallel.mode='jit' to shard it")
      self.num_devices = jax.device_count()
      if batch % self.num_devices:
        raise ConfigError(f'config.train.batch_size={batch}: must be divisible by the '
                          f'{self.num_devices} devices pmap splits it over')
      self.mesh = None
      return
    devices = jax.device_count()
    if p.fsdp > devices:     # else data = 0 below, and a modulo by zero
      raise ConfigError(f'config.parallel.fsdp={p.fsdp}: the mesh needs {p.fsdp} devices, '
                        f'{devices} present ({_fitting_fsdp(devices, p.data, batch)}; on a CPU '
                        f'host, --config.parallel.cpu_devices={p.fsdp} splits it into '
                        f'{p.fsdp})')
    data = p.data or devices // p.fsdp
    if data * p.fsdp > devices:
      raise ConfigError(f'config.parallel.data={data}: mesh data x fsdp = {data} x {p.fsdp} '
                        f'needs {data * p.fsdp} devices, {devices} present')
    if self.process_count > 1 and data * p.fsdp != devices:
      raise ConfigError(f'config.parallel.data={data}: on several processes the mesh must '
                        f'use all {devices} devices (data x fsdp = {data * p.fsdp})')
    if batch % (data * p.fsdp):
      raise ConfigError(f'config.train.batch_size={batch}: must be divisible by the '
                        f'data-parallel size data x fsdp = {data * p.fsdp}')
    if p.eval_batch_size % (data * p.fsdp):   # evaluation splits its batches the same way
      raise ConfigError(_eval_batch_error(p.eval_batch_size, data, p.fsdp))
    self.num_devices = data * p.fsdp
    self.fsdp = p.fsdp
    self.mesh = jax.make_mesh((data, p.fsdp), MESH_AXES, devices=jax.devices()[:data * p.fsdp],
                              axis_types=(jax.sharding.AxisType.Auto,) * 2)
    self.batch_sharding = NamedSharding(self.mesh, P(MESH_AXES))
    self.replicated = NamedSharding(self.mesh, P())

  # --- state -------------------------------------------------------------------------------
  def state_shardings(self, state):
    """NamedSharding per leaf of `state` (arrays or ShapeDtypeStructs); jit mode only."""
    return jax.tree.map(lambda x: NamedSharding(self.mesh, fsdp_spec(x.shape, self.fsdp)),
                        state)

  def restore_target(self, abstract_state):
    """What Orbax restores into: ShapeDtypeStructs with this mesh's shardings (jit), or the
    plain unreplicated state (pmap; `place_state` replicates it after)."""
    if self.mode == 'pmap':
      return abstract_state
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, self.state_shardings(abstract_state))

  def place_state(self, state):
    """A host or single-device state onto the devices: sharded (jit) or replicated (pmap)."""
    if self.mode == 'pmap':
      return jax_utils.replicate(state)
    return jax.device_put(state, self.state_shardings(state))

  def unreplicate(self, tree):
    """The state (or part of it) as one copy: for checkpoints. pmap: this process's first
    replica (all are equal)."""
    if self.mode != 'pmap':
      return tree
    # Each device's shard of a pmap output is its replica with a leading axis of 1.
    return jax.tree.map(lambda x: x.addressable_data(0).reshape(x.shape[1:]), tree)

  def eval_params(self, state):
    """Params for evaluation and logging, usable by a plain jit on this process: one replica
    (pmap), the sharded global arrays (jit, one process), or all shards gathered to every
    process (several processes: each then evaluates on its own devices)."""
    if self.mode == 'pmap':
      return self.unreplicate(state.params)
    if self.process_count > 1:
      return multihost_utils.process_allgather(state.params, tiled=True)
    return state.params

  # --- batches ------------------------------------------------------------------------------
  def place_batch(self, local_batch: dict):
    """This process's slice of a global batch (numpy, leading axis local_batch_size) onto the
    devices: a global array sharded over the mesh (jit) or [devices, per_device, ...] (pmap)."""
    if self.mode == 'pmap':
      n = jax.local_device_count()
      return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in local_batch.items()}
    if self.process_count == 1:
      return jax.device_put(local_batch, self.batch_sharding)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()}

  # --- steps --------------------------------------------------------------------------------
  def train_step(self, *, graphdef, tx, loss_spec, abstract_state):
    """(placed state, placed batch) -> (state, metrics): compiled, the state donated."""
    fn = functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx, loss_spec=loss_spec)
    if self.mode == 'pmap':
      return jax.pmap(functools.partial(fn, axis_name=PMAP_AXIS), axis_name=PMAP_AXIS,
                      donate_argnums=0)
    # loss.logits_chunk_pages counts pages per device, as under pmap: here the loss sees the
    # global batch, whose (strided) chunks then hold that many pages on each device, so the
    # number of chunks, and of the head-gradient all-reduces they bring, stays that of pmap.
    fn = functools.partial(fn, loss_spec=dataclasses.replace(
        loss_spec, logits_chunk_pages=loss_spec.logits_chunk_pages * self.num_devices))
    shardings = self.state_shardings(abstract_state)
    if self.fsdp > 1:
      # Gather the sharded params for the forward pass (their gradients are reduce-scattered
      # back by out_shardings); left to itself, GSPMD spread the param sharding into the
      # activations' head axes and replicated them back and forth (2.3x slower at fsdp=8).
      fn = functools.partial(fn, gather_params=lambda p: jax.lax.with_sharding_constraint(
          p, jax.tree.map(lambda _: self.replicated, p)))
    return jax.jit(self._kernels_split(fn), in_shardings=(shardings, self.batch_sharding),
                   out_shardings=(shardings, self.replicated), donate_argnums=0)

  # --- evaluation ---------------------------------------------------------------------------
  def eval_step(self, *, graphdef, loss_spec):
    """(params, host batch) -> step.eval_step's metrics, compiled for this layout. jit: over the
    mesh, the params sharded as the state (FSDP: they stay split; the step gathers them for its
    forward pass, as train_step does), the batch split over data x fsdp, the metrics replicated.
    pmap: a plain jit of one replica's params (what eval_params gives)."""
    if self.mode == 'pmap':
      return jit_eval_step(graphdef=graphdef, loss_spec=loss_spec)
    # loss.logits_chunk_pages counts pages per device, as in train_step.
    fn = functools.partial(step_lib.eval_step, graphdef=graphdef, loss_spec=dataclasses.replace(
        loss_spec, logits_chunk_pages=loss_spec.logits_chunk_pages * self.num_devices))
    return self._on_mesh(lambda params, batch: fn(self._gathered(params), batch), batch_args=1)

  def generate(self, *, graphdef, settings: decoding.DecodeSettings, ids: decoding.TokenIds):
    """(params, features_BxPxF, feature_mask_BxP, rng) -> decoding.generate's dict, compiled for
    this layout as eval_step is (jit: the pages split over the mesh, the rng replicated)."""
    if self.mode == 'pmap':
      return jit_generate(graphdef=graphdef, settings=settings, ids=ids)
    fn = _generate_fn(graphdef, settings, ids)
    return self._on_mesh(lambda params, *args: fn(self._gathered(params), *args), batch_args=2)

  def _gathered(self, params):
    """FSDP: the params all-gathered inside the step (a sharding constraint), so activations are
    split by batch only; the stored params stay sharded."""
    if self.fsdp == 1:
      return params
    return jax.lax.with_sharding_constraint(params, jax.tree.map(lambda _: self.replicated, params))

  def _kernels_split(self, fn):
    """fn with every attention kernel call split over the mesh by pages (shard_map): GSPMD
    cannot partition a Pallas kernel (sparse_dispatch.kernel_mesh, read while jit traces fn)."""
    def traced(*args):
      with sparse_dispatch.kernel_mesh(self.mesh):
        return fn(*args)
    return traced

  def _on_mesh(self, fn, *, batch_args: int):
    """fn(params, *batch arrays, *replicated args) jitted over the mesh, outputs replicated. The
    param shardings follow each leaf's shape (fsdp_spec), so they are fixed at the first call.
    The returned function places its inputs: host batches split over the mesh, params (sharded
    already: no copy) as the state, the rest replicated."""
    jitted = {}

    def call(params, *args):
      if not jitted:
        jitted['params'] = self.state_shardings(params)
        jitted['fn'] = jax.jit(self._kernels_split(fn), in_shardings=(
            jitted['params'], *[self.batch_sharding] * batch_args,
            *[self.replicated] * (len(args) - batch_args)), out_shardings=self.replicated)
      placed = [self._to_global(params, jitted['params'])]
      placed += [self._to_global(a, self.batch_sharding) for a in args[:batch_args]]
      placed += [self._replicate(a) for a in args[batch_args:]]
      return jitted['fn'](*placed)
    return call

  def _replicate(self, x):
    return placement.replicate(x, self.replicated, self.process_count)

  def _to_global(self, tree, shardings):
    return placement.to_global(tree, shardings, self.process_count)

  def metrics_to_host(self, metrics) -> dict:
    # pmap returns one (equal, psum'd) copy per device.
    return jax.device_get(self.unreplicate(metrics))


def jit_train_step(*, graphdef, tx, loss_spec):
  """(state, batch) -> (state, metrics) on one device, jitted; the input state is donated."""
  fn = functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx, loss_spec=loss_spec)
  return jax.jit(fn, donate_argnums=0)


def jit_eval_step(*, graphdef, loss_spec):
  """(params, batch) -> metrics, jitted."""
  return jax.jit(functools.partial(step_lib.eval_step, graphdef=graphdef, loss_spec=loss_spec))


def _generate_fn(graphdef, settings: decoding.DecodeSettings, ids: decoding.TokenIds):
  """(params, features_BxPxF, feature_mask_BxP, rng) -> decoding.generate's dict (one while_loop
  with a KV cache, then one annotating forward pass); not compiled."""

  def fn(params, features, feature_mask, rng):
    model = nnx.merge(graphdef, params['model'])
    return decoding.generate(model, features, feature_mask, settings=settings, ids=ids, rng=rng)
  return fn


def jit_generate(*, graphdef, settings: decoding.DecodeSettings, ids: decoding.TokenIds):
  """_generate_fn on one device, jitted."""
  return jax.jit(_generate_fn(graphdef, settings, ids))
