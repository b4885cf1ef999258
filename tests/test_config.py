"""phase1_jax.config: the shipped configs validate; each bad value raises a one-line ConfigError
naming its field."""
from __future__ import annotations

import ml_collections
import pytest
from support import REPO

from phase1_jax import config as config_lib
from phase1_jax import specs
from phase1_jax.config import ConfigError, base_config
from phase1_jax.config_validation import validate
from phase1_jax.data import vocab


def load_config_file(name, *args):
  return config_lib.load_file(REPO / 'configs' / f'{name}.py', *args)


def test_full_config_sizes():
  assert load_config_file('full').data.train_samples == 5000
  assert load_config_file('full', '10k').data.train_samples == 10000
  with pytest.raises(ValueError, match='configs/full.py:20k'):
    load_config_file('full', '20k')


def test_base_config_validates():
  config = base_config()
  validate(config)
  assert config.model.d_model == 768 and config.model.num_layers == 6


def test_small_config_validates():
  config = load_config_file('small')
  validate(config)
  assert config.model.d_model == 128 and config.model.num_unique_layers == 2


def test_long_gpu_config_is_window_attention_over_full_16k_pages():
  """configs/long_gpu.py, the GPU long-page config: T >= 16k, `window` attention in bfloat16,
  which a GPU runs as the Pallas kernel; its pages fill most of T (with short pages the
  `dot_product` comparison would skip the padding by its key lengths)."""
  from phase1_jax.data import pipeline
  from phase1_jax.model import sparse_dispatch
  config = load_config_file('long_gpu')
  validate(config)
  model = specs.model_spec(config)
  t = config.data.max_seq_len
  assert t >= 16384 and model.attention.kind == 'window' and model.dtype == 'bfloat16'
  assert sparse_dispatch.implementation(
      'window', t=t, s=t, head_dim=model.d_model // model.num_heads, dtype=model.dtype,
      window_size=model.attention.window_size, block_size=model.attention.block_size,
      backend='gpu') == 'pallas'
  config.data.train_samples = 4
  source = pipeline.make_source(specs.data_spec(config), 'train')
  batch = next(iter(pipeline.train_iterator(source, batch_size=4, seed=0, epoch=0)))
  assert batch['inputs'].shape == (4, t)
  assert batch['target_mask'].sum(1).min() > 0.85 * t


# html.py and pixels*.py need a prepared directory (tests/test_config_validation.py validates
# html.py on one, tests/test_encoder.py the pixel configs on a pixel dataset's dataset.json).
CONFIG_FILES = sorted(p.stem for p in (REPO / 'configs').glob('*.py')
                      if p.stem not in ('__init__', 'html', 'pixels', 'pixels_small'))


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_every_config_file_validates(name):
  config = load_config_file(name)
  validate(config)
  # The synthetic vocabulary fits in the model's.
  assert config.model.vocab_size >= vocab.NUM_TOKENS


def test_base_config_is_fresh_each_call():
  a = base_config()
  a.model.num_heads = 5
  assert base_config().model.num_heads == 12


def set_field(config, path, value):
  *parents, leaf = path.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


# (overrides applied in order, the field the message must name)
BAD = {
    'heads_do_not_divide_d_model': ([('model.d_model', 128), ('model.num_heads', 5)],
                                    'model.num_heads'),
    'more_unique_layers_than_layers': ([('model.num_layers', 2), ('model.num_unique_layers', 3)],
                                       'model.num_unique_layers'),
    'more_sections_than_rows': ([('data.grid_rows', 4), ('data.max_sections', 5)],
                                'data.max_sections'),
    'min_sections_above_max': ([('data.min_sections', 9)], 'data.min_sections'),
    'unknown_decode_strategy': ([('decode.strategy', 'nucleus')], 'decode.strategy'),
    'decode_longer_than_positions': ([('decode.max_len', 257)], 'decode.max_len'),
    'zero_temperature': ([('decode.temperature', 0.0)], 'decode.temperature'),
    'top_p_zero': ([('decode.top_p', 0.0)], 'decode.top_p'),
    'beam_of_zero': ([('decode.beam_size', 0)], 'decode.beam_size'),
    'negative_length_penalty': ([('decode.length_penalty', -0.5)], 'decode.length_penalty'),
    'one_mbr_candidate': ([('decode.candidates', 1)], 'decode.candidates'),
    'more_classes_than_pages_know': ([('model.num_semantic_classes', 51)],
                                     'model.num_semantic_classes'),
    'more_element_types_than_pages_know': ([('model.num_element_types', 31)],
                                           'model.num_element_types'),
    'negative_batch_size': ([('train.batch_size', -1)], 'train.batch_size'),
    'zero_batch_size': ([('train.batch_size', 0)], 'train.batch_size'),
    'negative_eval_batch_size': ([('eval.batch_size', -4)], 'eval.batch_size'),
    'batch_larger_than_train_set': ([('data.train_samples', 8)], 'train.batch_size'),
    'sparse_attention': ([('model.attention.kind', 'sparse')], 'model.attention.kind'),
    'zero_window': ([('model.attention.window_size', 0)], 'model.attention.window_size'),
    'negative_top_k': ([('model.attention.top_k', -1)], 'model.attention.top_k'),
    'targets_score_without_bleu': ([('eval.bleu_samples', 0)], 'checkpoint.best_metric'),
    'unknown_weighting': ([('loss.weighting', 'x')], 'loss.weighting'),
    'negative_loss_weight': ([('loss.semantic_weight', -0.1)], 'loss.semantic_weight'),
    'threshold_above_one': ([('eval.element_threshold', 1.5)], 'eval.element_threshold'),
    'threshold_zero': ([('eval.element_threshold', 0.0)], 'eval.element_threshold'),
    'unknown_best_metric': ([('checkpoint.best_metric', 'foo')], 'checkpoint.best_metric'),
    'bleu_metric_without_bleu': ([('eval.bleu_samples', 0), ('checkpoint.best_metric', 'bleu')],
                                 'checkpoint.best_metric'),
    'zero_learning_rate': ([('train.learning_rate', 0.0)], 'train.learning_rate'),
    'float16_compute': ([('model.compute_dtype', 'float16')], 'model.compute_dtype'),
    'dropout_one': ([('model.dropout_rate', 1.0)], 'model.dropout_rate'),
    'adam_b2_one': ([('train.adam_b2', 1.0)], 'train.adam_b2'),
    'negative_noise': ([('data.feature_noise', -0.5)], 'data.feature_noise'),
    'visibility_above_one': ([('data.text_visibility', 1.1)], 'data.text_visibility'),
    'bool_as_int': ([('model.num_layers', True)], 'model.num_layers'),
    'target_above_one': ([('eval.bleu_target', 30.0)], 'eval.bleu_target'),
    'unknown_data_name': ([('data.name', 'webdataset')], 'data.name'),
}


@pytest.mark.parametrize('overrides,field', list(BAD.values()), ids=list(BAD))
def test_bad_value_raises_config_error_naming_field(overrides, field):
  config = base_config()
  for path, value in overrides:
    set_field(config, path, value)
  with pytest.raises(ConfigError) as info:
    validate(config)
  message = str(info.value)
  assert f'config.{field}=' in message, message
  assert '\n' not in message and message.strip() == message
  assert isinstance(info.value, ValueError)


def test_first_bad_field_is_reported():
  config = base_config()
  config.loss.weighting = 'x'
  config.train.learning_rate = 0.0
  with pytest.raises(ConfigError, match=r'config\.loss\.weighting='):
    validate(config)


def test_missing_field_named():
  config = base_config()
  del config.eval['element_threshold']
  with pytest.raises(ConfigError, match=r'config\.eval\.element_threshold'):
    validate(config)


def test_vocab_smaller_than_synthetic_vocabulary_rejected():
  config = base_config()
  config.model.vocab_size = 64
  with pytest.raises(ConfigError, match=r'config\.model\.vocab_size='):
    validate(config)


def test_compute_dtypes_listed():
  assert set(config_lib.COMPUTE_DTYPES) == {'auto', 'float32', 'bfloat16'}
  for name in config_lib.COMPUTE_DTYPES:
    config = base_config()
    config.model.compute_dtype = name
    validate(config)


def test_scan_layers_auto_unrolls_shallow_stacks_and_explicit_values_stand():
  """None (the default) unrolls up to 12 applications and scans deeper stacks; True/False
  override it at any depth, as flags or in a file."""
  config = base_config()
  assert config.model.scan_layers is None
  validate(config)
  limit = specs.MAX_AUTO_UNROLLED_LAYERS
  assert [specs.scan_layers(None, n) for n in (1, limit, limit + 1)] == [False, False, True]
  for value in (True, False):
    config.model.scan_layers = value
    validate(config)
    for n in (1, limit + 1):
      assert specs.scan_layers(config.model.scan_layers, n) is value


def _wrong_value(value):
  """A value of the field's type (or a neighbour) that breaks every rule a field of it can have."""
  if isinstance(value, bool):
    return 'yes'
  if isinstance(value, (int, float)):
    return -1.5
  return 7   # strings: not a string at all ('' is a fine value of some of them)


@pytest.mark.parametrize('path', sorted(config_lib.flatten(base_config().to_dict())))
def test_every_field_is_validated(path):
  """Each leaf of the config tree has a rule: a wrong value of it is reported naming it."""
  tree = base_config().to_dict()
  *parents, leaf = path.split('.')
  node = tree
  for p in parents:
    node = node[p]
  node[leaf] = _wrong_value(node[leaf])
  with pytest.raises(ConfigError) as info:
    validate(ml_collections.ConfigDict(tree))
  assert str(info.value).startswith(f'config.{path}='), str(info.value)


def test_unknown_field_named_with_suggestion():
  config = base_config()
  config.train.batch_sise = 8  # a typo in a config file adds a field
  with pytest.raises(ConfigError, match=r'^config\.train\.batch_sise: unknown field \(did you '
                     r'mean train\.batch_size\?\)$'):
    validate(config)


def test_retired_field_names_its_replacement():
  config = base_config()
  config.loss.vocab_chunk_size = 2048
  with pytest.raises(ConfigError, match=r'^config\.loss\.vocab_chunk_size: no longer exists: use '
                     r'loss\.logits_chunk_pages'):
    validate(config)


@pytest.mark.parametrize('path,value', [('checkpoint.every_steps', -1),
                                        ('train.max_consecutive_nonfinite', 0),
                                        ('exp_name', 'a/b'), ('checkpoint.async_save', 1)])
def test_fault_tolerance_fields(path, value):
  tree = base_config().to_dict()
  *parents, leaf = path.split('.')
  node = tree
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=rf'^config\.{path}='):
    validate(ml_collections.ConfigDict(tree))


FLOAT_FIELDS = sorted(p for p, v in config_lib.flatten(base_config().to_dict()).items()
                      if isinstance(v, float))


@pytest.mark.parametrize('value', [float('inf'), float('-inf'), float('nan')])
@pytest.mark.parametrize('path', FLOAT_FIELDS)
def test_non_finite_floats_are_refused(path, value):
  """inf passed the [0, inf] rules (data.feature_noise=inf then trained on NaN losses)."""
  config = base_config()
  set_field(config, path, value)
  with pytest.raises(ConfigError, match=rf'^config\.{path}={value}: must be a finite number'):
    validate(config)


@pytest.mark.parametrize('text,args,message', [
    ('def get_config(:\n  pass\n', (), r'bad\.py:1: SyntaxError: invalid syntax$'),
    ('import nope_no_such_module\n', (), r"bad\.py:1: ModuleNotFoundError: No module named"),
    ('X = 1\n', (), r'bad\.py: defines no get_config\(\)'),
    ('def get_config():\n  return {}\n', (), r'bad\.py: get_config\(\) returned dict, not a '),
    ('from phase1_jax.config import base_config\ndef get_config():\n  c = base_config()\n'
     "  c.train.num_epochs = '3'\n  return c\n", (), r"bad\.py:4: TypeError: .*'num_epochs'"),
    ('def get_config():\n  return 1\n', ('x',), r'bad\.py: TypeError: get_config\(\) takes 0 '),
    ('import json\ndef get_config():\n  return json.loads("{")\n', (),
     r'bad\.py:3: JSONDecodeError: Expecting property name')])
def test_config_file_errors_are_one_line_naming_the_file(tmp_path, text, args, message):
  (tmp_path / 'bad.py').write_text(text)
  with pytest.raises(ConfigError, match=message) as info:
    config_lib.load_file(tmp_path / 'bad.py', *args)
  assert str(info.value).startswith(str(tmp_path / 'bad.py')) and '\n' not in str(info.value)


def test_missing_config_file_is_named():
  with pytest.raises(ConfigError, match=r'nope\.py: no such config file'):
    config_lib.load_file(REPO / 'configs' / 'nope.py')


@pytest.mark.parametrize('cli', ['train', 'evaluate', 'generate'])
def test_cli_help_exits_zero(cli):
  """--help prints the flags and succeeds (absl alone exits 1)."""
  import subprocess
  import sys
  done = subprocess.run([sys.executable, '-m', f'phase1_jax.{cli}', '--help'],
                        capture_output=True, text=True, timeout=120, cwd=REPO)
  assert done.returncode == 0, done.stderr
  assert '--workdir' in done.stdout + done.stderr
