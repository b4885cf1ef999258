"""TrainState (params + optimizer state + step + RNG) and the optimizer, built from the config."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from phase1_jax.losses import TASKS
from phase1_jax.model import attention, cpu_attention
from phase1_jax.model.phase1 import Phase1Decoder


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes; a pytree of arrays (checkpointed whole).

  step: micro-batches consumed (int32). params: {'model': nnx.State of the decoder's Params,
  'loss_log_vars': float32[4] (uncertainty weighting; unused with fixed weights)}.
  rng: raw uint32 key data; the dropout key of step s is fold_in(rng, s), so a resumed run
  draws the same masks as an uninterrupted one.
  """
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


def compute_dtype(name: str):
  """'auto' is bfloat16 on GPU/TPU and float32 on CPU (XLA:CPU has no fast bf16 matmul)."""
  if name == 'auto':
    name = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  return jnp.dtype(name)


def attention_kind(name: str) -> str:
  """'auto': `fused_cpu` on a CPU with a C++ compiler (its kernel is built on first use; the
  train step measured 1.15-1.17x `dense`), `dense` on a CPU without one, `dot_product` on a
  GPU/TPU (cuDNN's fused attention on a GPU)."""
  if name != 'auto':
    return name
  if jax.default_backend() != 'cpu':
    return 'dot_product'
  return 'fused_cpu' if cpu_attention.compiler_available() else 'dense'


# The deepest stack that auto unrolls: the unrolled step measured faster on CPU (4 applications)
# and on a GPU (6); its compile time grows with depth (CPU: 1.6-1.9x from 2 to 12 applications).
MAX_AUTO_UNROLLED_LAYERS = 12


def scan_layers(value: bool | None, num_layers: int) -> bool:
  """None (auto): unrolled up to MAX_AUTO_UNROLLED_LAYERS applications, scanned beyond."""
  return num_layers > MAX_AUTO_UNROLLED_LAYERS if value is None else value


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> Phase1Decoder:
  """The decoder the config describes; with pixel input (data.patch_size > 0) it reads
  data.max_patches patches per page through an encoder of model.encoder_layers layers."""
  m, d = config.model, config.data
  kind = attention_kind(m.attention.kind)
  return Phase1Decoder(
      vocab_size=m.vocab_size, num_semantic_classes=m.num_semantic_classes,
      num_element_types=m.num_element_types, feature_dim=config.data.feature_dim,
      max_seq_len=config.data.max_seq_len, d_model=m.d_model, num_heads=m.num_heads,
      num_layers=m.num_layers, num_unique_layers=m.num_unique_layers, mlp_dim=m.mlp_dim,
      dropout_rate=m.dropout_rate, dtype=compute_dtype(m.compute_dtype),
      attention_kind=kind, attention_options=attention.kind_options(
          kind, window_size=m.attention.window_size, top_k=m.attention.top_k,
          block_size=m.attention.block_size or None),
      tie_detail_head=m.tie_detail_head,
      scan_layers=scan_layers(m.scan_layers, m.num_layers), remat=m.remat,
      remat_policy=m.remat_policy, patch_size=d.patch_size,
      max_patches=d.max_patches if d.patch_size else 0, encoder_layers=m.encoder_layers,
      patch_labels=config.loss.patch_weight > 0, rngs=rngs)


def _decay_mask(params):
  """Weight decay on matrices (kernels, embeddings) only: not on biases, norms, loss weights."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """(tx, schedule): clip -> AdamW on a warmup-cosine schedule, accumulated over
  `accumulate_grad_batches` micro-batches. The schedule counts optimizer updates."""
  t = config.train
  total = max(1, steps_per_epoch * t.num_epochs // t.accumulate_grad_batches)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=min(t.warmup_steps, total - 1),
      decay_steps=total, end_value=t.learning_rate * t.end_learning_rate_ratio)
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip_norm),
      optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, weight_decay=t.weight_decay,
                  mask=_decay_mask))
  if t.accumulate_grad_batches > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=t.accumulate_grad_batches)
  return tx, schedule


def create_train_state(config: ml_collections.ConfigDict, tx, *,
                       abstract: bool = False) -> tuple[nnx.GraphDef, TrainState]:
  """A fresh state from config.seed. Returns the model's graphdef (static) and the state.

  With `abstract`, the state's shapes and dtypes only (jax.ShapeDtypeStruct leaves): nothing is
  initialized or allocated. A run that resumes, or an evaluation, needs only that (the restore
  target), and a concrete fresh state would hold a second copy of the parameters and moments in
  device memory while the checkpoint's are read.
  """
  def fresh():
    model = build_model(config, rngs=nnx.Rngs(config.seed))
    graphdef, model_params = nnx.split(model, nnx.Param)
    params = {'model': model_params, 'loss_log_vars': jnp.zeros((len(TASKS),), jnp.float32)}
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 1))
    return graphdef, TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                                rng=rng)

  # A GraphDef is a pytree without leaves: eval_shape hands it back as it is.
  return jax.eval_shape(fresh) if abstract else fresh()


def abstract_train_state(config: ml_collections.ConfigDict, tx) -> TrainState:
  """Shapes and dtypes of the state, without allocating it (the restore target)."""
  return create_train_state(config, tx, abstract=True)[1]
