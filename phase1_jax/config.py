"""The config tree: its defaults (the seed's) and its validation.

Every config file in `configs/` starts from `base_config()` and overrides fields. `validate(config)`
runs before anything compiles and raises `ConfigError` with one line naming the first bad field.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from phase1_jax.data import vocab

ATTENTION_KINDS = ('dense', 'dot_product', 'window', 'window_topk')
COMPUTE_DTYPES = ('auto', 'float32', 'bfloat16')
# The names of model/decoder.py's REMAT_POLICIES (config does not import the model).
REMAT_POLICIES = ('nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable')
LOSS_WEIGHTINGS = ('fixed', 'uncertainty')
METRIC_MODES = {'val_loss': 'min', 'element_f1': 'max', 'semantic_accuracy': 'max', 'bleu': 'max',
                'targets_score': 'max'}


class ConfigError(ValueError):
  """A config field breaks a rule; the message is one line naming the field."""


def base_config() -> ml_collections.ConfigDict:
  """The seed's defaults (d_model 768, 6 layers, 12 heads, vocab 50000, ...)."""
  c = ml_collections.ConfigDict()
  c.exp_name = 'phase1_decoder'
  c.seed = 0

  c.data = d = ml_collections.ConfigDict()
  d.kind = 'synthetic'
  d.seed = 0                    # the page generator's seed: page i of a split is f(seed, i)
  d.train_samples = 5000
  d.val_samples = 1000
  d.max_seq_len = 256           # decoder length T (targets incl. EOS); longer pages drop sections
  d.grid_rows = 16              # the rendered layout is grid_rows x grid_cols patches
  d.grid_cols = 4
  d.feature_dim = 64
  d.feature_noise = 0.5         # std of the Gaussian noise added to every patch feature
  d.text_visibility = 0.8       # probability that a word of an element is rendered into its patches
  d.min_sections = 1
  d.max_sections = 8
  d.max_elements_per_section = 3
  d.max_words_per_element = 2

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 50000
  m.num_semantic_classes = 50
  m.num_element_types = 30
  m.d_model = 768
  m.num_heads = 12
  m.num_layers = 6              # layer applications
  m.num_unique_layers = 3       # distinct blocks; application i uses block i % num_unique_layers
  m.mlp_dim = 3072
  m.dropout_rate = 0.1
  m.compute_dtype = 'auto'      # auto: bfloat16 on GPU/TPU, float32 on CPU (measured faster there)
  m.tie_detail_head = True
  # True: lax.scan over the applications, compile time flat in depth: the default, for deep
  # stacks and GPU/TPU. The CPU configs (small, bench_cpu, long) set False: a Python loop over
  # few applications runs the step faster on CPU (measured: README, benchmarks/train_step.py).
  m.scan_layers = True
  m.remat = False
  # With remat: what a layer application keeps for the backward pass (nothing_saveable: only its
  # input; dots_saveable / dots_with_no_batch_dims_saveable: also matmul outputs).
  m.remat_policy = 'nothing_saveable'
  m.attention = ml_collections.ConfigDict()
  m.attention.kind = 'dense'      # dense | dot_product | window | window_topk
  m.attention.window_size = 256   # window kinds: each token sees itself and window_size - 1 before
  m.attention.top_k = 4           # window_topk: earlier key blocks selected per query block
  m.attention.block_size = 0      # window kinds: 0 picks a default from window_size

  c.loss = loss = ml_collections.ConfigDict()
  loss.weighting = 'fixed'
  loss.detail_weight = 0.4
  loss.semantic_weight = 0.3
  loss.element_weight = 0.2
  loss.consistency_weight = 0.1
  # > 0: the training detail cross-entropy walks the vocabulary this many entries at a time, so
  # no B x T x V float32 logits exist (large vocabularies); 0: plain full logits.
  loss.vocab_chunk_size = 0

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 16
  t.num_epochs = 50
  t.learning_rate = 1e-4
  t.end_learning_rate_ratio = 0.1   # cosine decays to learning_rate * this
  t.warmup_steps = 500
  t.weight_decay = 0.01
  t.adam_b1 = 0.9
  t.adam_b2 = 0.98
  t.grad_clip_norm = 1.0
  t.accumulate_grad_batches = 1
  t.log_every_steps = 20
  t.histogram_every_epochs = 1
  t.early_stopping_patience = 5     # epochs without improvement of checkpoint.best_metric
  t.stop_when_targets_met = False   # end training at the first epoch whose eval passes every target

  c.eval = e = ml_collections.ConfigDict()
  e.batch_size = 64
  e.bleu_samples = 200          # validation pages decoded greedily for BLEU each epoch (0: skip)
  e.element_threshold = 0.5
  e.bleu_target = 0.30
  e.element_f1_target = 0.85
  e.semantic_accuracy_target = 0.85

  c.checkpoint = k = ml_collections.ConfigDict()
  k.max_to_keep = 2
  k.best_metric = 'targets_score'
  k.async_save = True
  return c


def load_file(path: str | os.PathLike, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of a config file, as `--config path[:arg]` would give (no flags needed)."""
  spec = importlib.util.spec_from_file_location(f'_config_{os.path.basename(path)}', path)
  if spec is None:
    raise FileNotFoundError(f'{path}: no such config file')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def _fail(field: str, rule: str, value) -> ConfigError:
  return ConfigError(f'config.{field}={value!r}: {rule}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field that breaks a rule (cheap: runs before compiling)."""
  def get(path):
    node = config
    for part in path.split('.'):
      if part not in node:
        raise ConfigError(f'config.{path}: missing field')
      node = node[part]
    return node

  def positive(*paths, allow_zero=False):
    for p in paths:
      v = get(p)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (v == 0 and not allow_zero):
        kind = 'non-negative' if allow_zero else 'positive'
        raise _fail(p, f'must be a {kind} integer', v)

  def in_range(path, lo, hi, lo_open=False, hi_open=False):
    v = get(path)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
      interval = f'{"(" if lo_open else "["}{lo}, {hi}{")" if hi_open else "]"}'
      raise _fail(path, f'must be in {interval}', v)

  def one_of(path, allowed):
    if get(path) not in allowed:
      raise _fail(path, f'must be one of {", ".join(map(str, allowed))}', get(path))

  one_of('data.kind', ('synthetic',))
  positive('data.train_samples', 'data.val_samples', 'data.max_seq_len', 'data.grid_rows',
           'data.grid_cols', 'data.feature_dim', 'data.min_sections', 'data.max_sections',
           'data.max_elements_per_section')
  positive('data.max_words_per_element', 'seed', 'data.seed', allow_zero=True)
  in_range('data.feature_noise', 0, float('inf'))
  in_range('data.text_visibility', 0, 1)
  if config.data.min_sections > config.data.max_sections:
    raise _fail('data.min_sections', f'must be <= data.max_sections ({config.data.max_sections})',
                config.data.min_sections)
  if config.data.max_sections > config.data.grid_rows:
    raise _fail('data.max_sections', f'must be <= data.grid_rows ({config.data.grid_rows}): '
                'each section needs a row of patches', config.data.max_sections)

  positive('model.vocab_size', 'model.num_semantic_classes', 'model.num_element_types',
           'model.d_model', 'model.num_heads', 'model.num_layers', 'model.num_unique_layers',
           'model.mlp_dim')
  m = config.model
  if config.data.kind == 'synthetic':
    for field, least, most in (('vocab_size', vocab.NUM_TOKENS, None),
                               ('num_semantic_classes', 1, len(vocab.SEMANTIC_CLASSES)),
                               ('num_element_types', 1, len(vocab.ELEMENT_TYPES))):
      if m[field] < least:
        raise _fail(f'model.{field}', f'must be >= {least} (the synthetic pages use that many)',
                    m[field])
      if most is not None and m[field] > most:
        raise _fail(f'model.{field}', f'must be <= {most} (the synthetic pages know that many)',
                    m[field])
  if m.d_model % m.num_heads:
    raise _fail('model.num_heads', f'must divide model.d_model ({m.d_model})', m.num_heads)
  if m.num_unique_layers > m.num_layers:
    raise _fail('model.num_unique_layers', f'must be <= model.num_layers ({m.num_layers})',
                m.num_unique_layers)
  in_range('model.dropout_rate', 0, 1, hi_open=True)
  one_of('model.compute_dtype', COMPUTE_DTYPES)
  one_of('model.remat_policy', REMAT_POLICIES)
  one_of('model.attention.kind', ATTENTION_KINDS)
  positive('model.attention.window_size')
  positive('model.attention.top_k', 'model.attention.block_size', allow_zero=True)

  one_of('loss.weighting', LOSS_WEIGHTINGS)
  positive('loss.vocab_chunk_size', allow_zero=True)
  for name in ('detail', 'semantic', 'element', 'consistency'):
    in_range(f'loss.{name}_weight', 0, float('inf'))

  positive('train.batch_size', 'train.num_epochs', 'train.accumulate_grad_batches',
           'train.log_every_steps', 'train.histogram_every_epochs')
  positive('train.warmup_steps', 'train.early_stopping_patience', allow_zero=True)
  in_range('train.learning_rate', 0, 1, lo_open=True)
  in_range('train.end_learning_rate_ratio', 0, 1)
  in_range('train.weight_decay', 0, 1)
  in_range('train.adam_b1', 0, 1, hi_open=True)
  in_range('train.adam_b2', 0, 1, hi_open=True)
  in_range('train.grad_clip_norm', 0, float('inf'), lo_open=True)
  if config.data.train_samples < config.train.batch_size:
    raise _fail('train.batch_size', f'must be <= data.train_samples ({config.data.train_samples})',
                config.train.batch_size)

  positive('eval.batch_size')
  positive('eval.bleu_samples', allow_zero=True)
  in_range('eval.element_threshold', 0, 1, lo_open=True, hi_open=True)
  for name in ('bleu', 'element_f1', 'semantic_accuracy'):
    in_range(f'eval.{name}_target', 0, 1)

  positive('checkpoint.max_to_keep')
  one_of('checkpoint.best_metric', tuple(METRIC_MODES))
  best = config.checkpoint.best_metric
  if best in ('bleu', 'targets_score') and config.eval.bleu_samples == 0:
    raise _fail('checkpoint.best_metric', f'{best} needs eval.bleu_samples > 0', best)
