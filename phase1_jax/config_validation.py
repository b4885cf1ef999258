"""Validation of a config tree: `validate(config)` raises `ConfigError` naming the first field that
breaks a rule, with one line, before anything compiles; `parse_flags` gives the CLIs the same
one-line error for a `--config.a.b` override of a field that does not exist.
"""
from __future__ import annotations

import difflib
import math
import os
import re

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
  REMAT_POLICIES,
  RETIRED_FIELDS,
  ConfigError,
  base_config,
  flatten,
  load_file,
)
from phase1_jax.data import vocab


def _fail(field: str, rule: str, value) -> ConfigError:
  return ConfigError(f'config.{field}={value!r}: {rule}')


def unknown_field(path: str) -> ConfigError:
  """The error for a field base_config() lacks: what replaced it, or the closest known name."""
  if path in RETIRED_FIELDS:
    return ConfigError(f'config.{path}: no longer exists: {RETIRED_FIELDS[path]}')
  close = difflib.get_close_matches(path, flatten(base_config().to_dict()), n=1)
  return ConfigError(f'config.{path}: unknown field' + (f' (did you mean {close[0]}?)' if close
                                                         else ''))


HELP_FLAGS = ('--help', '-help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')


def parse_flags(argv):
  """absl's flag parsing for the CLIs (app.run(main, flags_parser=parse_flags)): a bad flag exits
  with one line (`error: ...`) naming the culprit, not a traceback or absl's two-line usage note:
  a config file that cannot load (config.load_file's line), an override of a field the config
  lacks, a value of the wrong type, an unknown flag."""
  from absl import flags
  spec = _config_file_arg(argv)
  if spec is not None and not os.path.isfile(spec.split(':', 1)[0]):
    # ml_collections defers a missing file's error to the config's first use, in 4 lines.
    raise SystemExit(f'error: --config {spec}: no such config file')
  try:
    return flags.FLAGS(argv)
  except SystemExit:  # absl exits 1 after printing --help; asking for help is not an error
    if any(a.split('=')[0] in HELP_FLAGS for a in argv[1:]):
      raise SystemExit(0) from None
    raise
  except Exception as e:  # noqa: BLE001 - named in one line below, or raised as it is
    line = _flag_error(argv, spec, e)
    if line is None:
      raise
    raise SystemExit(f'error: {line}') from None


def _config_file_arg(argv) -> str | None:
  """The value of --config (path[:argument]) in argv, or None."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith('--config='):
      return arg.removeprefix('--config=')
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _flag_error(argv, spec: str | None, error: Exception) -> str | None:
  """One line for a failed flag parse, or None for an error it does not know (raised as is)."""
  from absl import flags
  if spec is not None:     # the file itself first: load it again outside ml_collections' wrapper
    try:
      load_file(*spec.split(':', 1))
    except ConfigError as e:
      return str(e)
  if isinstance(error, (AttributeError, KeyError)):
    found = re.search(r"'(\w+)", str(error))   # ml_collections: "'name'\nDid you mean..."
    for arg in argv[1:]:
      path = arg.removeprefix('--config.').split('=')[0]
      if found and arg.startswith('--config.') and found.group(1) in path.split('.'):
        return str(unknown_field(path))
  if isinstance(error, flags.Error):
    return ' '.join(str(error).split())
  return None


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
    """A finite number in the interval (inf and NaN never pass: inf noise or weights train on
    nothing but non-finite losses)."""
    v = get(path)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
      interval = f'{"(" if lo_open else "["}{lo}, {hi}{")" if hi_open or hi == math.inf else "]"}'
      raise _fail(path, f'must be a finite number in {interval}', v)

  def one_of(path, allowed):
    if get(path) not in allowed:
      raise _fail(path, f'must be one of {", ".join(map(str, allowed))}', get(path))

  # A typo in a config file adds a new field silently (files build unlocked ConfigDicts).
  known = flatten(base_config().to_dict())
  for path in flatten(config.to_dict()):
    if path not in known:
      raise unknown_field(path)

  def boolean(*paths):
    for p in paths:
      if not isinstance(get(p), bool):
        raise _fail(p, 'must be True or False', get(p))

  name = get('exp_name')
  if not isinstance(name, str) or not name or '/' in name or name.strip() != name:
    raise _fail('exp_name', 'must be a non-empty name without "/" or surrounding spaces', name)
  if get('model.scan_layers') is not None:   # None: auto, by depth
    boolean('model.scan_layers')
  if get('parallel.keep_freed_host_memory') is not None:   # None: auto, by platform
    boolean('parallel.keep_freed_host_memory')
  boolean('model.tie_detail_head', 'model.remat',
          'train.stop_when_targets_met', 'checkpoint.async_save')
  one_of('data.name', DATA_NAMES)
  if not isinstance(config.data.path, str):
    raise _fail('data.path', 'must be a directory path (a string)', config.data.path)
  positive('data.train_samples', 'data.val_samples', 'data.max_seq_len', 'data.grid_rows',
           'data.grid_cols', 'data.feature_dim', 'data.min_sections', 'data.max_sections',
           'data.max_elements_per_section')
  positive('data.max_words_per_element', 'seed', 'data.seed', allow_zero=True)
  in_range('data.feature_noise', 0, float('inf'))
  in_range('data.text_visibility', 0, 1)
  if config.data.min_sections > config.data.max_sections:
    raise _fail('data.min_sections', f'must be <= data.max_sections ({config.data.max_sections})',
                config.data.min_sections)
  if config.data.name == 'synthetic' and config.data.max_sections > config.data.grid_rows:
    raise _fail('data.max_sections', f'must be <= data.grid_rows ({config.data.grid_rows}): '
                'each section needs a row of patches', config.data.max_sections)
  positive('data.patch_size', 'data.max_patches', allow_zero=True)
  _validate_pixel_input(config.data)

  positive('model.vocab_size', 'model.num_semantic_classes', 'model.num_element_types',
           'model.d_model', 'model.num_heads', 'model.num_layers', 'model.num_unique_layers',
           'model.mlp_dim')
  m = config.model
  if config.data.name == 'synthetic':
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
  positive('model.encoder_layers', allow_zero=True)
  if m.encoder_layers and not config.data.patch_size:
    raise _fail('model.encoder_layers', 'must be 0 unless data.patch_size > 0 (the encoder reads '
                'pixel patches)', m.encoder_layers)
  in_range('model.dropout_rate', 0, 1, hi_open=True)
  one_of('model.compute_dtype', COMPUTE_DTYPES)
  one_of('model.remat_policy', REMAT_POLICIES)
  one_of('model.attention.kind', ATTENTION_KINDS)
  positive('model.attention.window_size')
  positive('model.attention.top_k', 'model.attention.block_size', allow_zero=True)

  one_of('loss.weighting', LOSS_WEIGHTINGS)
  positive('loss.logits_chunk_pages', allow_zero=True)
  in_range('loss.patch_weight', 0, float('inf'))
  if config.loss.patch_weight and not config.data.patch_size:
    raise _fail('loss.patch_weight', 'must be 0 unless data.patch_size > 0 (patch labels come '
                'with screenshots)', config.loss.patch_weight)
  for name in ('detail', 'semantic', 'element', 'consistency'):
    in_range(f'loss.{name}_weight', 0, float('inf'))

  positive('train.batch_size', 'train.num_epochs', 'train.accumulate_grad_batches',
           'train.log_every_steps', 'train.histogram_every_epochs')
  positive('train.warmup_steps', 'train.early_stopping_patience', allow_zero=True)
  positive('train.max_consecutive_nonfinite')
  in_range('train.learning_rate', 0, 1, lo_open=True)
  in_range('train.end_learning_rate_ratio', 0, 1)
  in_range('train.weight_decay', 0, 1)
  in_range('train.adam_b1', 0, 1, hi_open=True)
  in_range('train.adam_b2', 0, 1, hi_open=True)
  in_range('train.grad_clip_norm', 0, float('inf'), lo_open=True)
  if config.data.name == 'files':
    _validate_files(config)
  elif config.data.train_samples < config.train.batch_size:
    raise _fail('train.batch_size', f'must be <= data.train_samples ({config.data.train_samples})',
                config.train.batch_size)

  positive('eval.batch_size')
  positive('eval.bleu_samples', 'eval.render_samples', 'eval.render_pictures', allow_zero=True)
  positive('eval.render_workers')
  _validate_render_eval(config)
  in_range('eval.element_threshold', 0, 1, lo_open=True, hi_open=True)
  for name in ('bleu', 'element_f1', 'semantic_accuracy'):
    in_range(f'eval.{name}_target', 0, 1)

  one_of('decode.strategy', DECODE_STRATEGIES)
  positive('decode.max_len', 'decode.top_k', 'decode.seed', allow_zero=True)
  if config.decode.max_len > config.data.max_seq_len:
    raise _fail('decode.max_len', f'must be <= data.max_seq_len ({config.data.max_seq_len}): the '
                'model has no position embedding beyond it', config.decode.max_len)
  in_range('decode.temperature', 0, float('inf'), lo_open=True)
  in_range('decode.top_p', 0, 1, lo_open=True)
  positive('decode.beam_size')
  in_range('decode.length_penalty', 0, float('inf'))

  one_of('parallel.mode', PARALLEL_MODES)
  positive('parallel.fsdp')
  positive('parallel.data', 'parallel.process_id', 'parallel.cpu_devices', allow_zero=True)
  one_of('parallel.distributed', DISTRIBUTED)
  positive('parallel.num_processes')
  if not isinstance(config.parallel.coordinator_address, str):
    raise _fail('parallel.coordinator_address', "must be 'host:port' (a string)",
                config.parallel.coordinator_address)
  if config.parallel.distributed == 'manual':
    if ':' not in config.parallel.coordinator_address:
      raise _fail('parallel.coordinator_address', "must be 'host:port' with "
                  "parallel.distributed='manual'", config.parallel.coordinator_address)
    if config.parallel.process_id >= config.parallel.num_processes:
      raise _fail('parallel.process_id', f'must be < parallel.num_processes '
                  f'({config.parallel.num_processes})', config.parallel.process_id)

  positive('checkpoint.max_to_keep')
  positive('checkpoint.every_steps', allow_zero=True)
  one_of('checkpoint.best_metric', tuple(METRIC_MODES))
  best = config.checkpoint.best_metric
  if best in ('bleu', 'targets_score') and config.eval.bleu_samples == 0:
    raise _fail('checkpoint.best_metric', f'{best} needs eval.bleu_samples > 0', best)


def _validate_render_eval(config: ml_collections.ConfigDict) -> None:
  """eval.render_samples > 0 renders decoded pages of a prepared dataset with a tokenizer."""
  e = config.eval
  if not isinstance(e.render_browser, str):
    raise _fail('eval.render_browser', "must be a path (a string; '' finds Chromium)",
                e.render_browser)
  if not e.render_samples:
    return
  if e.render_samples > e.bleu_samples:
    raise _fail('eval.render_samples', f'must be <= eval.bleu_samples ({e.bleu_samples}): the '
                'decoded pages are the ones rendered', e.render_samples)
  if config.data.name != 'files':
    raise _fail('eval.render_samples', "must be 0 unless data.name='files': rendering needs the "
                "pages' markup text (a prepared dataset's tokenizer)", e.render_samples)


def _validate_pixel_input(d: ml_collections.ConfigDict) -> None:
  """data.patch_size > 0 (pixel patches): a files dataset, patches per page, F = 2 + 3 ps^2."""
  if not d.patch_size:
    if d.max_patches:
      raise _fail('data.max_patches', 'must be 0 unless data.patch_size > 0 (pixel input)',
                  d.max_patches)
    return
  if d.name != 'files':
    raise _fail('data.patch_size', "must be 0 unless data.name='files': pixel patches come from "
                'a prepared pixel dataset (synthetic pages are features)', d.patch_size)
  if d.max_patches < 1:
    raise _fail('data.max_patches', 'must be >= 1 with data.patch_size > 0 (patches per page)',
                d.max_patches)
  want = 2 + 3 * d.patch_size ** 2
  if d.feature_dim != want:
    raise _fail('data.feature_dim', f'must be {want} with data.patch_size={d.patch_size} '
                '(2 + 3 * patch_size**2: row, column, RGB pixels)', d.feature_dim)


def _validate_files(config: ml_collections.ConfigDict) -> None:
  """data.name='files': the prepared directory exists and fits the model's sizes."""
  from phase1_jax.data import records  # grain and friends load only for file datasets

  d, m = config.data, config.model
  if not d.path:
    raise _fail('data.path', "must name a prepared dataset directory (data.name='files')", d.path)
  try:
    meta = records.read_metadata(d.path, complete=True)
  except records.DatasetError as e:
    raise _fail('data.path', str(e), d.path) from None
  where = f'{d.path}/{records.METADATA_FILE}'
  for field, value, key in (('model.num_semantic_classes', m.num_semantic_classes,
                             'semantic_classes'),
                            ('model.num_element_types', m.num_element_types, 'element_types')):
    if value != len(meta[key]):
      raise _fail(field, f'must be {len(meta[key])} (the {key} of {where})', value)
  if records.input_kind(meta) == 'pixels':
    if d.patch_size != meta['patch_size']:
      raise _fail('data.patch_size', f'must be {meta["patch_size"]} (the patch_size of {where}, '
                  'a pixel dataset)', d.patch_size)
  elif d.patch_size:
    raise _fail('data.patch_size', f'must be 0: {where} holds features, not pixel patches',
                d.patch_size)
  if m.vocab_size < meta['vocab_size']:
    raise _fail('model.vocab_size', f'must be >= {meta["vocab_size"]} (the vocab_size of {where})',
                m.vocab_size)
  if d.feature_dim != meta['feature_dim']:
    raise _fail('data.feature_dim', f'must be {meta["feature_dim"]} (the feature_dim of {where})',
                d.feature_dim)
  if config.eval.render_samples and not os.path.isfile(os.path.join(d.path,
                                                                    records.TOKENIZER_FILE)):
    raise _fail('eval.render_samples', f'must be 0: {d.path} has no {records.TOKENIZER_FILE} to '
                'turn token ids into markup to render', config.eval.render_samples)
  n = {s: meta['splits'][s]['num_records'] for s in ('train', 'val')}
  if not n['val']:
    raise _fail('data.path', f'{where}: the val split is empty (prepare with --val_fraction > 0)',
                d.path)
  if n['train'] < config.train.batch_size:
    raise _fail('train.batch_size', f'must be <= the {n["train"]} train records of {where}',
                config.train.batch_size)
