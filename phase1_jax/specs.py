"""The boundary between the config tree and the code: the config is read here, once, into small
frozen specs, and every `auto` is resolved here (attention kind, compute dtype, layer scanning).

Below this module nothing reads the ConfigDict: the model takes a ModelSpec (model/spec.py), the
optimizer an OptimizerSpec (training/state.py). The CLIs and Trainer call `model_spec(config)`
and friends after `config_validation.validate(config)` has checked the tree.
"""
from __future__ import annotations

import jax
import ml_collections

from phase1_jax.model import cpu_attention
from phase1_jax.model.attention import AttentionSpec
from phase1_jax.model.spec import ModelSpec
from phase1_jax.training.state import OptimizerSpec

# The deepest stack that auto unrolls: the unrolled step measured faster on CPU and GPU
# (docs/performance.md); its compile time grows with depth.
MAX_AUTO_UNROLLED_LAYERS = 12


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
      patch_labels=config.loss.patch_weight > 0)


def optimizer_spec(config: ml_collections.ConfigDict) -> OptimizerSpec:
  t = config.train
  return OptimizerSpec(
      learning_rate=t.learning_rate, num_epochs=t.num_epochs, warmup_steps=t.warmup_steps,
      end_learning_rate_ratio=t.end_learning_rate_ratio, weight_decay=t.weight_decay,
      adam_b1=t.adam_b1, adam_b2=t.adam_b2, grad_clip_norm=t.grad_clip_norm,
      accumulate_grad_batches=t.accumulate_grad_batches)
