"""The boundary between the config tree and the code: `run_spec(config)` validates the config
once and reads it into small frozen specs, resolving every `auto` (attention kind, compute dtype,
layer scanning) here.

Below this module nothing reads the ConfigDict: the model takes a ModelSpec (model/spec.py), the
optimizer an OptimizerSpec, the data pipeline a DataSpec, the mesh a MeshSpec, evaluation an
EvalSpec, the training loop the whole RunSpec. The CLIs (train, evaluate, generate) and
`training.loop.train_and_evaluate` are the only callers.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import ml_collections

from phase1_jax import config as config_lib
from phase1_jax import config_validation
from phase1_jax.config import ConfigError
from phase1_jax.data import pipeline, records, render, synthetic
from phase1_jax.inference.decoding import DecodeSettings
from phase1_jax.inference.evaluation import EvalSpec
from phase1_jax.inference.visual_evaluation import RenderEvalSpec
from phase1_jax.losses import TASKS
from phase1_jax.model import cpu_attention
from phase1_jax.model.attention import AttentionSpec
from phase1_jax.model.spec import ModelSpec
from phase1_jax.training import host
from phase1_jax.training.host import DistributedSpec, HostSpec
from phase1_jax.training.parallel import MeshSpec
from phase1_jax.training.run import CheckpointSpec, TrainSpec
from phase1_jax.training.state import OptimizerSpec
from phase1_jax.training.step import LossSpec

# The deepest stack that auto unrolls: the unrolled step measured faster on CPU and GPU
# (docs/performance.md); its compile time grows with depth.
MAX_AUTO_UNROLLED_LAYERS = 12


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything a training or evaluation run reads, resolved. `config` is the tree as a plain
  dict (config.json, checkpoints' saved config); `architecture` what a restored checkpoint's
  saved config must match (config.ARCHITECTURE_FIELDS)."""
  exp_name: str
  seed: int
  model: ModelSpec
  optimizer: OptimizerSpec
  loss: LossSpec
  data: pipeline.DataSpec
  mesh: MeshSpec
  train: TrainSpec
  checkpoint: CheckpointSpec
  eval: EvalSpec
  config: Mapping[str, Any] = dataclasses.field(compare=False)
  architecture: Mapping[str, Any] = dataclasses.field(compare=False)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with: its workdir's config.json over today's defaults (so a
  run saved before a config section existed still loads), less config.RETIRED_FIELDS."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no config.json (is {workdir} a training workdir?)')
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path}: unreadable ({e})') from None
  if not isinstance(saved, dict):
    raise ConfigError(f'{path}: holds a JSON {type(saved).__name__}, expected the config object')
  try:
    for field in config_lib.RETIRED_FIELDS:
      *sections, name = field.split('.')
      node = saved
      for section in sections:
        node = node.get(section, {})
      node.pop(name, None)
    config = config_lib.base_config()
    config.update(ml_collections.ConfigDict(saved))
  except (AttributeError, TypeError, KeyError, ValueError) as e:   # a section or value mangled
    raise ConfigError(f'{path}: not a training config ({" ".join(str(e).split())})') from None
  return config


# --------------------------------------------------------------------------- autos

def compute_dtype(name: str) -> str:
  """'auto' is bfloat16 on GPU/TPU and float32 on CPU (XLA:CPU has no fast bf16 matmul)."""
  if name == 'auto':
    return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  return name


def attention_kind(name: str) -> str:
  """'auto': `fused_cpu` on a CPU with a C++ compiler (its kernel is built on first use), `dense`
  on a CPU without one, `dot_product` on a GPU/TPU (cuDNN's fused attention on a GPU)."""
  if name != 'auto':
    return name
  if jax.default_backend() != 'cpu':
    return 'dot_product'
  return 'fused_cpu' if cpu_attention.compiler_available() else 'dense'


def scan_layers(value: bool | None, num_layers: int) -> bool:
  """None (auto): unrolled up to MAX_AUTO_UNROLLED_LAYERS applications, scanned beyond."""
  return num_layers > MAX_AUTO_UNROLLED_LAYERS if value is None else value


# --------------------------------------------------------------------------- sections

def run_spec(config: ml_collections.ConfigDict, *, validated: bool = False,
             start_distributed: bool = False) -> RunSpec:
  """The config validated (one-line ConfigError on the first bad field; `validated`: the CLI
  already did, before importing this stack) and read into specs. Resolving an `auto` starts
  JAX's backends, so with `start_distributed` (training) a multi-process run's jax.distributed
  starts here first."""
  if not validated:
    config_validation.validate(config)
  if start_distributed:
    host.initialize_distributed(distributed_spec(config))
  loss = loss_spec(config)   # reads the dataset's metadata: once, shared with eval
  return RunSpec(
      exp_name=config.exp_name, seed=config.seed, model=model_spec(config),
      optimizer=optimizer_spec(config), loss=loss, data=data_spec(config),
      mesh=mesh_spec(config), train=train_spec(config), checkpoint=checkpoint_spec(config),
      eval=eval_spec(config, loss), config=config.to_dict(),
      architecture=config_lib.architecture(config))


def attention_spec(config: ml_collections.ConfigDict) -> AttentionSpec:
  a = config.model.attention
  return AttentionSpec.of(attention_kind(a.kind), window_size=a.window_size, top_k=a.top_k,
                          block_size=a.block_size or None)


def model_spec(config: ml_collections.ConfigDict) -> ModelSpec:
  """The decoder the config describes; with pixel input (data.patch_size > 0) it reads
  data.max_patches patches per page through an encoder of model.encoder_layers layers."""
  m, d = config.model, config.data
  return ModelSpec(
      vocab_size=m.vocab_size, num_semantic_classes=m.num_semantic_classes,
      num_element_types=m.num_element_types, feature_dim=d.feature_dim,
      max_seq_len=d.max_seq_len, d_model=m.d_model, num_heads=m.num_heads,
      num_layers=m.num_layers, num_unique_layers=m.num_unique_layers, mlp_dim=m.mlp_dim,
      dropout_rate=m.dropout_rate, dtype=compute_dtype(m.compute_dtype),
      attention=attention_spec(config), tie_detail_head=m.tie_detail_head,
      scan_layers=scan_layers(m.scan_layers, m.num_layers), remat=m.remat,
      remat_policy=m.remat_policy, patch_size=d.patch_size,
      max_patches=d.max_patches if d.patch_size else 0, encoder_layers=m.encoder_layers,
      patch_labels=config.loss.patch_weight > 0, patch_words=config.loss.patch_words_weight > 0)


def optimizer_spec(config: ml_collections.ConfigDict) -> OptimizerSpec:
  t = config.train
  return OptimizerSpec(
      learning_rate=t.learning_rate, num_epochs=t.num_epochs, warmup_steps=t.warmup_steps,
      end_learning_rate_ratio=t.end_learning_rate_ratio, weight_decay=t.weight_decay,
      adam_b1=t.adam_b1, adam_b2=t.adam_b2, grad_clip_norm=t.grad_clip_norm,
      accumulate_grad_batches=t.accumulate_grad_batches)


def page_spec(config: ml_collections.ConfigDict) -> synthetic.PageSpec:
  d, m = config.data, config.model
  return synthetic.PageSpec(
      max_seq_len=d.max_seq_len, num_semantic_classes=m.num_semantic_classes,
      num_element_types=m.num_element_types, grid_rows=d.grid_rows, grid_cols=d.grid_cols,
      feature_dim=d.feature_dim, feature_noise=d.feature_noise, text_visibility=d.text_visibility,
      min_sections=d.min_sections, max_sections=d.max_sections,
      max_elements_per_section=d.max_elements_per_section,
      max_words_per_element=d.max_words_per_element)


def data_spec(config: ml_collections.ConfigDict) -> pipeline.DataSpec:
  """P, the patches per page a batch holds, is data.max_patches for pixel input (data.patch_size
  > 0), else the layout grid's grid_rows * grid_cols."""
  d = config.data
  return pipeline.DataSpec(
      name=d.name, page=page_spec(config),
      num_patches=d.max_patches if d.patch_size > 0 else d.grid_rows * d.grid_cols,
      path=d.path, seed=d.seed, train_samples=d.train_samples, val_samples=d.val_samples,
      patch_labels=config.loss.patch_weight > 0,
      patch_words=config.loss.patch_words_weight > 0)


def loss_spec(config: ml_collections.ConfigDict) -> LossSpec:
  loss = config.loss
  return LossSpec(loss.weighting, tuple((task, loss[f'{task}_weight']) for task in TASKS),
                  pipeline.element_open_tag_ids(data_spec(config)), loss.logits_chunk_pages,
                  loss.patch_weight, config.model.num_semantic_classes, loss.patch_words_weight,
                  loss.patch_words_form)


def mesh_spec(config: ml_collections.ConfigDict) -> MeshSpec:
  p = config.parallel
  return MeshSpec(mode=p.mode, data=p.data, fsdp=p.fsdp, batch_size=config.train.batch_size,
                  eval_batch_size=config.eval.batch_size)


def distributed_spec(config: ml_collections.ConfigDict) -> DistributedSpec:
  p = config.parallel
  return DistributedSpec(mode=p.distributed, coordinator_address=p.coordinator_address,
                         num_processes=p.num_processes, process_id=p.process_id)


def host_spec(config: ml_collections.ConfigDict) -> HostSpec:
  p = config.parallel
  return HostSpec(cpu_devices=p.cpu_devices, keep_freed_host_memory=p.keep_freed_host_memory,
                  batch_size=config.train.batch_size, num_processes=p.num_processes)


def train_spec(config: ml_collections.ConfigDict) -> TrainSpec:
  t = config.train
  return TrainSpec(
      batch_size=t.batch_size, num_epochs=t.num_epochs, data_seed=config.data.seed,
      log_every_steps=t.log_every_steps, histogram_every_epochs=t.histogram_every_epochs,
      early_stopping_patience=t.early_stopping_patience,
      stop_when_targets_met=t.stop_when_targets_met,
      max_consecutive_nonfinite=t.max_consecutive_nonfinite,
      accumulate_grad_batches=t.accumulate_grad_batches)


def checkpoint_spec(config: ml_collections.ConfigDict) -> CheckpointSpec:
  c = config.checkpoint
  return CheckpointSpec(best_metric=c.best_metric, best_mode=config_lib.METRIC_MODES[c.best_metric],
                        max_to_keep=c.max_to_keep, every_steps=c.every_steps,
                        async_save=c.async_save)


def decode_settings(config: ml_collections.ConfigDict) -> DecodeSettings:
  d = config.decode
  return DecodeSettings(max_len=d.max_len or config.data.max_seq_len, strategy=d.strategy,
                        temperature=d.temperature, top_k=d.top_k, top_p=d.top_p,
                        beam_size=d.beam_size, length_penalty=d.length_penalty,
                        candidates=d.candidates)


def render_eval_spec(config: ml_collections.ConfigDict) -> RenderEvalSpec | None:
  """None when eval.render_samples is 0; ConfigError (one line) when no browser runs."""
  e = config.eval
  if not e.render_samples:
    return None
  settings = records.read_metadata(config.data.path).get('render') or {}
  spec = render.RenderSpec(width=int(settings.get('width', 1024)),
                           max_height=int(settings.get('max_height', 2048)),
                           javascript=bool(settings.get('javascript', False)),
                           browser=e.render_browser or None)
  try:
    spec = dataclasses.replace(spec, browser=render.check_available(spec))
  except render.RenderUnavailable as err:
    raise ConfigError(f'eval.render_samples={e.render_samples} renders pages: {err} '
                                 '(or set --config.eval.render_samples=0)') from None
  return RenderEvalSpec(e.render_samples, min(e.render_pictures, e.render_samples),
                        e.render_workers, spec)


def eval_spec(config: ml_collections.ConfigDict, loss: LossSpec | None = None) -> EvalSpec:
  """`loss`: the run's LossSpec when already built (default: loss_spec(config))."""
  e = config.eval
  return EvalSpec(
      batch_size=e.batch_size, bleu_samples=e.bleu_samples,
      element_threshold=e.element_threshold,
      targets={'bleu': e.bleu_target, 'element_f1': e.element_f1_target,
               'semantic_accuracy': e.semantic_accuracy_target},
      decode=decode_settings(config), decode_seed=config.decode.seed,
      loss=loss or loss_spec(config),
      vocab_size=config.model.vocab_size, generated_headline=bool(config.data.patch_size),
      render=render_eval_spec(config))
