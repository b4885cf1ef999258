"""phase1_jax.config_validation on a prepared dataset: the 'files' source's checks and the dataset
configs (html.py, pixels*.py) against a readable, unreadable or mismatched directory."""
from __future__ import annotations

import os

import pytest
from support import REPO, files_config

from phase1_jax import config as config_lib
from phase1_jax import config_validation


@pytest.mark.parametrize('field,value,words', [
    ('data.path', '', 'data.path'), ('data.path', '/no/such/dir', 'dataset.json: not found'),
    ('model.vocab_size', 100, 'model.vocab_size'), ('data.feature_dim', 64, 'data.feature_dim'),
    ('model.num_element_types', 10, 'model.num_element_types'),
    ('train.batch_size', 1000, 'train.batch_size')])
def test_files_config_errors_name_the_field(prepared, field, value, words):
  config = files_config(prepared[1])
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=words) as info:
    config_validation.validate(config)
  assert '\n' not in str(info.value) and str(info.value).startswith('config.')


def test_html_config_reads_the_prepared_directory(prepared):
  _, out, meta, _, _ = prepared
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'html.py'), out)
  assert config.data.name == 'files' and config.data.path == out
  assert config.model.vocab_size % 128 == 0 and config.model.vocab_size >= meta['vocab_size']
  assert config.data.feature_dim == meta['feature_dim']
  config.data.grid_rows, config.data.grid_cols = 4, 4
  config.train.batch_size = 4
  config_validation.validate(config)
  with pytest.raises(config_lib.ConfigError, match='data.path'):
    config_validation.validate(config_lib.load_file(os.path.join(REPO, 'configs', 'html.py')))


@pytest.mark.parametrize('name', ['html.py', 'pixels_small.py', 'pixels.py'])
def test_dataset_configs_name_an_unreadable_or_mismatched_dataset_in_one_line(prepared, tmp_path,
                                                                               name):
  garbage = tmp_path / 'garbage'
  garbage.mkdir()
  (garbage / 'dataset.json').write_text('{not json')
  for path, words in ((str(garbage), 'dataset.json: unreadable'),
                      (prepared[1], 'data.patch_size' if name != 'html.py' else None)):
    config = config_lib.load_file(os.path.join(REPO, 'configs', name), path)   # never raises
    if words is None:     # html.py on a features dataset: fits
      continue
    with pytest.raises(config_lib.ConfigError, match=words) as info:
      config_validation.validate(config)
    assert '\n' not in str(info.value)
