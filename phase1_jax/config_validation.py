"""Validation of a config tree: `validate(config)` raises `ConfigError` naming the first field that
breaks a rule, with one line, before anything compiles; `parse_flags` gives the CLIs the same
one-line error for a `--config.a.b` override of a field that does not exist. The rules on the
fields' values are config_checks' (one checker per section); here: the driver, unknown fields and
the prepared dataset on disk.
"""
from __future__ import annotations

import difflib
import os
import re

import ml_collections

from phase1_jax.config import RETIRED_FIELDS, ConfigError, base_config, flatten, load_file
from phase1_jax.config_checks import (
  Fields,
  check_checkpoint,
  check_data,
  check_decode,
  check_eval,
  check_loss,
  check_model,
  check_parallel,
  check_switches,
  check_train,
  fail,
)


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
  """Raises ConfigError naming the first field that breaks a rule (cheap: runs before compiling).
  The order is fixed, so a config with several bad fields always names the same one: unknown
  fields, the True/False switches, then the sections in the tree's order."""
  _check_known(config)
  f = Fields(config)
  check_switches(f)
  check_data(f)
  check_model(f)
  check_loss(f)
  check_train(f)
  _check_dataset(config)
  check_eval(f)
  check_decode(f)
  check_parallel(f)
  check_checkpoint(f)


def _check_known(config: ml_collections.ConfigDict) -> None:
  """A typo in a config file adds a new field silently (files build unlocked ConfigDicts)."""
  known = flatten(base_config().to_dict())
  for path in flatten(config.to_dict()):
    if path not in known:
      raise unknown_field(path)


def _check_dataset(config: ml_collections.ConfigDict) -> None:
  """The pages training draws its batches from: a prepared directory is read and must fit the
  model (_validate_files); the synthetic training set must hold one batch."""
  if config.data.name == 'files':
    _validate_files(config)
  elif config.data.train_samples < config.train.batch_size:
    raise fail('train.batch_size', f'must be <= data.train_samples ({config.data.train_samples})',
               config.train.batch_size)


def _validate_files(config: ml_collections.ConfigDict) -> None:
  """data.name='files': the prepared directory exists and fits the model's sizes."""
  from phase1_jax.data import records  # grain and friends load only for file datasets

  d, m = config.data, config.model
  if not d.path:
    raise fail('data.path', "must name a prepared dataset directory (data.name='files')", d.path)
  try:
    meta = records.read_metadata(d.path, complete=True)
  except records.DatasetError as e:
    raise fail('data.path', str(e), d.path) from None
  where = f'{d.path}/{records.METADATA_FILE}'
  for field, value, key in (('model.num_semantic_classes', m.num_semantic_classes,
                             'semantic_classes'),
                            ('model.num_element_types', m.num_element_types, 'element_types')):
    if value != len(meta[key]):
      raise fail(field, f'must be {len(meta[key])} (the {key} of {where})', value)
  if records.input_kind(meta) == 'pixels':
    if d.patch_size != meta['patch_size']:
      raise fail('data.patch_size', f'must be {meta["patch_size"]} (the patch_size of {where}, '
                 'a pixel dataset)', d.patch_size)
  elif d.patch_size:
    raise fail('data.patch_size', f'must be 0: {where} holds features, not pixel patches',
               d.patch_size)
  if m.vocab_size < meta['vocab_size']:
    raise fail('model.vocab_size', f'must be >= {meta["vocab_size"]} (the vocab_size of {where})',
               m.vocab_size)
  if d.feature_dim != meta['feature_dim']:
    raise fail('data.feature_dim', f'must be {meta["feature_dim"]} (the feature_dim of {where})',
               d.feature_dim)
  if config.eval.render_samples and not os.path.isfile(os.path.join(d.path,
                                                                    records.TOKENIZER_FILE)):
    raise fail('eval.render_samples', f'must be 0: {d.path} has no {records.TOKENIZER_FILE} to '
               'turn token ids into markup to render', config.eval.render_samples)
  n = {s: meta['splits'][s]['num_records'] for s in ('train', 'val')}
  if not n['val']:
    raise fail('data.path', f'{where}: the val split is empty (prepare with --val_fraction > 0)',
               d.path)
  if n['train'] < config.train.batch_size:
    raise fail('train.batch_size', f'must be <= the {n["train"]} train records of {where}',
               config.train.batch_size)
