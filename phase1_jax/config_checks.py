"""The rules on a config's own values, one checker per section (check_data, check_model, ...):
each raises `ConfigError` naming the first bad field. `config_validation.validate` runs them in the
tree's order, with the checks that need the outside (the prepared dataset, base_config's names).
"""
from __future__ import annotations

import math

import ml_collections

from phase1_jax.config import (
  ATTENTION_KINDS,
  COMPUTE_DTYPES,
  DATA_NAMES,
  DECODE_STRATEGIES,
  DISTRIBUTED,
  LOSS_WEIGHTINGS,
  METRIC_MODES,
  PARALLEL_MODES,
  PATCH_WORD_FORMS,
  REMAT_POLICIES,
  ConfigError,
)
from phase1_jax.data import vocab


def fail(field: str, rule: str, value) -> ConfigError:
  """The one-line error of a field that breaks a rule: `config.field=value: rule`."""
  return ConfigError(f'config.{field}={value!r}: {rule}')


class Fields:
  """Checks of one config's fields by dotted path ('model.d_model'): each raises ConfigError
  naming the field (`config.path=value: rule`), or `config.path: missing field`."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def get(self, path):
    node = self.config
    for part in path.split('.'):
      if part not in node:
        raise ConfigError(f'config.{path}: missing field')
      node = node[part]
    return node

  def positive(self, *paths, allow_zero=False):
    for p in paths:
      v = self.get(p)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (v == 0 and not allow_zero):
        kind = 'non-negative' if allow_zero else 'positive'
        raise fail(p, f'must be a {kind} integer', v)

  def in_range(self, path, lo, hi, lo_open=False, hi_open=False):
    """A finite number in the interval (inf and NaN never pass: inf noise or weights train on
    nothing but non-finite losses)."""
    v = self.get(path)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
      interval = f'{"(" if lo_open else "["}{lo}, {hi}{")" if hi_open or hi == math.inf else "]"}'
      raise fail(path, f'must be a finite number in {interval}', v)

  def one_of(self, path, allowed):
    if self.get(path) not in allowed:
      raise fail(path, f'must be one of {", ".join(map(str, allowed))}', self.get(path))

  def boolean(self, *paths):
    for p in paths:
      if not isinstance(self.get(p), bool):
        raise fail(p, 'must be True or False', self.get(p))


def check_switches(f: Fields) -> None:
  """exp_name (a directory name) and the True/False fields of every section."""
  name = f.get('exp_name')
  if not isinstance(name, str) or not name or '/' in name or name.strip() != name:
    raise fail('exp_name', 'must be a non-empty name without "/" or surrounding spaces', name)
  if f.get('model.scan_layers') is not None:   # None: auto, by depth
    f.boolean('model.scan_layers')
  if f.get('parallel.keep_freed_host_memory') is not None:   # None: auto, by platform
    f.boolean('parallel.keep_freed_host_memory')
  f.boolean('model.tie_detail_head', 'model.remat',
            'train.stop_when_targets_met', 'checkpoint.async_save')


def check_data(f: Fields) -> None:
  """config.data: sizes of the synthetic pages and, for pixel input, the patch layout."""
  config = f.config
  f.one_of('data.name', DATA_NAMES)
  if not isinstance(config.data.path, str):
    raise fail('data.path', 'must be a directory path (a string)', config.data.path)
  f.positive('data.train_samples', 'data.val_samples', 'data.max_seq_len', 'data.grid_rows',
             'data.grid_cols', 'data.feature_dim', 'data.min_sections', 'data.max_sections',
             'data.max_elements_per_section')
  f.positive('data.max_words_per_element', 'seed', 'data.seed', allow_zero=True)
  f.in_range('data.feature_noise', 0, float('inf'))
  f.in_range('data.text_visibility', 0, 1)
  if config.data.min_sections > config.data.max_sections:
    raise fail('data.min_sections', f'must be <= data.max_sections ({config.data.max_sections})',
               config.data.min_sections)
  if config.data.name == 'synthetic' and config.data.max_sections > config.data.grid_rows:
    raise fail('data.max_sections', f'must be <= data.grid_rows ({config.data.grid_rows}): '
               'each section needs a row of patches', config.data.max_sections)
  f.positive('data.patch_size', 'data.max_patches', allow_zero=True)
  _validate_pixel_input(config.data)


def check_model(f: Fields) -> None:
  """config.model: sizes (the synthetic pages' vocabulary and classes fit), numerics, attention."""
  config = f.config
  f.positive('model.vocab_size', 'model.num_semantic_classes', 'model.num_element_types',
             'model.d_model', 'model.num_heads', 'model.num_layers', 'model.num_unique_layers',
             'model.mlp_dim')
  m = config.model
  if config.data.name == 'synthetic':
    for field, least, most in (('vocab_size', vocab.NUM_TOKENS, None),
                               ('num_semantic_classes', 1, len(vocab.SEMANTIC_CLASSES)),
                               ('num_element_types', 1, len(vocab.ELEMENT_TYPES))):
      if m[field] < least:
        raise fail(f'model.{field}', f'must be >= {least} (the synthetic pages use that many)',
                   m[field])
      if most is not None and m[field] > most:
        raise fail(f'model.{field}', f'must be <= {most} (the synthetic pages know that many)',
                   m[field])
  if m.d_model % m.num_heads:
    raise fail('model.num_heads', f'must divide model.d_model ({m.d_model})', m.num_heads)
  if m.num_unique_layers > m.num_layers:
    raise fail('model.num_unique_layers', f'must be <= model.num_layers ({m.num_layers})',
               m.num_unique_layers)
  f.positive('model.encoder_layers', allow_zero=True)
  if m.encoder_layers and not config.data.patch_size:
    raise fail('model.encoder_layers', 'must be 0 unless data.patch_size > 0 (the encoder reads '
               'pixel patches)', m.encoder_layers)
  f.in_range('model.dropout_rate', 0, 1, hi_open=True)
  f.one_of('model.compute_dtype', COMPUTE_DTYPES)
  f.one_of('model.remat_policy', REMAT_POLICIES)
  f.one_of('model.attention.kind', ATTENTION_KINDS)
  f.positive('model.attention.window_size')
  f.positive('model.attention.top_k', 'model.attention.block_size', allow_zero=True)


def check_loss(f: Fields) -> None:
  """config.loss: non-negative weights; the patch head only with pixel input."""
  config = f.config
  f.one_of('loss.weighting', LOSS_WEIGHTINGS)
  f.one_of('loss.patch_words_form', PATCH_WORD_FORMS)
  f.positive('loss.logits_chunk_pages', allow_zero=True)
  for name in ('patch_weight', 'patch_words_weight'):
    f.in_range(f'loss.{name}', 0, float('inf'))
    if config.loss[name] and not config.data.patch_size:
      raise fail(f'loss.{name}', 'must be 0 unless data.patch_size > 0 (patch labels and words '
                 'come with screenshots)', config.loss[name])
  for name in ('detail', 'semantic', 'element', 'consistency'):
    f.in_range(f'loss.{name}_weight', 0, float('inf'))


def check_train(f: Fields) -> None:
  """config.train: the optimizer's settings (the batch against the dataset: validate())."""
  f.positive('train.batch_size', 'train.num_epochs', 'train.accumulate_grad_batches',
             'train.log_every_steps', 'train.histogram_every_epochs')
  f.positive('train.warmup_steps', 'train.early_stopping_patience', allow_zero=True)
  f.positive('train.max_consecutive_nonfinite')
  f.in_range('train.learning_rate', 0, 1, lo_open=True)
  f.in_range('train.end_learning_rate_ratio', 0, 1)
  f.in_range('train.weight_decay', 0, 1)
  f.in_range('train.adam_b1', 0, 1, hi_open=True)
  f.in_range('train.adam_b2', 0, 1, hi_open=True)
  f.in_range('train.grad_clip_norm', 0, float('inf'), lo_open=True)


def check_eval(f: Fields) -> None:
  """config.eval: sample counts, rendered evaluation (_validate_render_eval), the targets."""
  f.positive('eval.batch_size')
  f.positive('eval.bleu_samples', 'eval.render_samples', 'eval.render_pictures', allow_zero=True)
  f.positive('eval.render_workers')
  _validate_render_eval(f.config)
  f.in_range('eval.element_threshold', 0, 1, lo_open=True, hi_open=True)
  for name in ('bleu', 'element_f1', 'semantic_accuracy'):
    f.in_range(f'eval.{name}_target', 0, 1)


def check_decode(f: Fields) -> None:
  """config.decode: the strategy and its settings; no longer than the model's positions."""
  config = f.config
  f.one_of('decode.strategy', DECODE_STRATEGIES)
  f.positive('decode.max_len', 'decode.top_k', 'decode.seed', allow_zero=True)
  if config.decode.max_len > config.data.max_seq_len:
    raise fail('decode.max_len', f'must be <= data.max_seq_len ({config.data.max_seq_len}): the '
               'model has no position embedding beyond it', config.decode.max_len)
  f.in_range('decode.temperature', 0, float('inf'), lo_open=True)
  f.in_range('decode.top_p', 0, 1, lo_open=True)
  f.positive('decode.beam_size')
  f.in_range('decode.candidates', 2, float('inf'))
  f.in_range('decode.length_penalty', 0, float('inf'))


def check_parallel(f: Fields) -> None:
  """config.parallel: the device layout and, when manual, the multi-process settings."""
  f.one_of('parallel.mode', PARALLEL_MODES)
  f.positive('parallel.fsdp')
  f.positive('parallel.data', 'parallel.process_id', 'parallel.cpu_devices', allow_zero=True)
  f.one_of('parallel.distributed', DISTRIBUTED)
  f.positive('parallel.num_processes')
  p = f.config.parallel
  if not isinstance(p.coordinator_address, str):
    raise fail('parallel.coordinator_address', "must be 'host:port' (a string)",
               p.coordinator_address)
  if p.distributed == 'manual':
    if ':' not in p.coordinator_address:
      raise fail('parallel.coordinator_address', "must be 'host:port' with "
                 "parallel.distributed='manual'", p.coordinator_address)
    if p.process_id >= p.num_processes:
      raise fail('parallel.process_id', f'must be < parallel.num_processes '
                 f'({p.num_processes})', p.process_id)


def check_checkpoint(f: Fields) -> None:
  """config.checkpoint: retention, cadence, and a best_metric that evaluation computes."""
  f.positive('checkpoint.max_to_keep')
  f.positive('checkpoint.every_steps', allow_zero=True)
  f.one_of('checkpoint.best_metric', tuple(METRIC_MODES))
  best = f.config.checkpoint.best_metric
  if best in ('bleu', 'targets_score') and f.config.eval.bleu_samples == 0:
    raise fail('checkpoint.best_metric', f'{best} needs eval.bleu_samples > 0', best)


def _validate_render_eval(config: ml_collections.ConfigDict) -> None:
  """eval.render_samples > 0 renders decoded pages of a prepared dataset with a tokenizer."""
  e = config.eval
  if not isinstance(e.render_browser, str):
    raise fail('eval.render_browser', "must be a path (a string; '' finds Chromium)",
               e.render_browser)
  if not e.render_samples:
    return
  if e.render_samples > e.bleu_samples:
    raise fail('eval.render_samples', f'must be <= eval.bleu_samples ({e.bleu_samples}): the '
               'decoded pages are the ones rendered', e.render_samples)
  if config.data.name != 'files':
    raise fail('eval.render_samples', "must be 0 unless data.name='files': rendering needs the "
               "pages' markup text (a prepared dataset's tokenizer)", e.render_samples)


def _validate_pixel_input(d: ml_collections.ConfigDict) -> None:
  """data.patch_size > 0 (pixel patches): a files dataset, patches per page, F = 2 + 3 ps^2."""
  if not d.patch_size:
    if d.max_patches:
      raise fail('data.max_patches', 'must be 0 unless data.patch_size > 0 (pixel input)',
                 d.max_patches)
    return
  if d.name != 'files':
    raise fail('data.patch_size', "must be 0 unless data.name='files': pixel patches come from "
               'a prepared pixel dataset (synthetic pages are features)', d.patch_size)
  if d.max_patches < 1:
    raise fail('data.max_patches', 'must be >= 1 with data.patch_size > 0 (patches per page)',
               d.max_patches)
  want = 2 + 3 * d.patch_size ** 2
  if d.feature_dim != want:
    raise fail('data.feature_dim', f'must be {want} with data.patch_size={d.patch_size} '
               '(2 + 3 * patch_size**2: row, column, RGB pixels)', d.feature_dim)
