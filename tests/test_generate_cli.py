"""`python -m phase1_jax.generate`: JSON Lines valid against the package's schema, features from
the validation split or a .npy file, decoding flags, one-line errors."""
import json
import os
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

from phase1_jax import config as config_lib
from phase1_jax import config_validation, specs
from phase1_jax.config import ConfigError
from phase1_jax.data import pipeline, vocab
from phase1_jax.inference import generation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = json.load(open(generation.SCHEMA_PATH))


@pytest.fixture(scope='module')
def workdir(tiny_run):
  """One epoch of configs/tiny.py (conftest's session run, shared with the bad-input table)."""
  return tiny_run


def run_generate(*args):
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': os.path.join(REPO, '.jax_cache')}
  return subprocess.run([sys.executable, '-m', 'phase1_jax.generate', *args], capture_output=True,
                        text=True, cwd=REPO, timeout=300, env=env)


def read_lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def check_record(record):
  jsonschema.validate(record, SCHEMA)
  assert set(e['type'] for e in record['elements']) <= set(vocab.ELEMENT_TYPES)
  assert all(s['semantic_class'] in vocab.SEMANTIC_CLASSES for s in record['sections'])
  tokens = record['markup'].split(' ') if record['markup'] else []
  assert len(tokens) == len(record['token_ids'])
  # Sections tile the markup in order.
  assert [s['start'] for s in record['sections']] == [0] + [s['end'] for s in
                                                            record['sections'][:-1]]
  if tokens:
    assert record['sections'][-1]['end'] == len(tokens)
  assert ' '.join(s['markup'] for s in record['sections']) == record['markup']


def test_cli_beam_search_writes_schema_valid_lines(workdir, tmp_path):
  out = tmp_path / 'beam.jsonl'
  proc = run_generate('--workdir', workdir, '--num_samples', '5', '--strategy', 'beam',
                      '--beam_size', '3', '--output', str(out))
  assert proc.returncode == 0, proc.stderr
  assert f'Wrote 5 pages to {out}' in proc.stdout
  records = read_lines(out)
  assert [r['source'] for r in records] == [f'val:{i}' for i in range(5)]
  for r in records:
    check_record(r)
    assert r['settings']['strategy'] == 'beam' and r['settings']['beam_size'] == 3
  # A trained model writes real pages: markup with element tags, more than one section class
  # or element type across pages.
  assert any(r['markup'] for r in records)
  assert len({e['type'] for r in records for e in r['elements']}) >= 1


def test_cli_mbr_writes_one_of_its_candidates(workdir, tmp_path):
  """--strategy mbr keeps, for each page, the greedy page or one of the seeded samples."""
  out, greedy = tmp_path / 'mbr.jsonl', tmp_path / 'greedy.jsonl'
  proc = run_generate('--workdir', workdir, '--num_samples', '4', '--strategy', 'mbr',
                      '--candidates', '3', '--temperature', '1.5', '--output', str(out))
  assert proc.returncode == 0, proc.stderr
  assert run_generate('--workdir', workdir, '--num_samples', '4', '--output',
                      str(greedy)).returncode == 0
  for r, g in zip(read_lines(out), read_lines(greedy), strict=True):
    check_record(r)
    assert r['settings']['strategy'] == 'mbr' and r['settings']['candidates'] == 3
    assert r['source'] == g['source']
    if r['token_ids'] == g['token_ids']:
      assert r['score'] == pytest.approx(g['score'], rel=1e-5, abs=1e-5)


def test_features_file_decodes_like_the_same_validation_pages(workdir, tmp_path):
  """Pages given as a .npy of the validation split's features (all patches valid there) decode
  to the same records as the split itself; sampling with one seed twice is identical."""
  config = specs.load_run_config(workdir)
  source = pipeline.make_source(specs.data_spec(config), 'val')
  pages = [source[i] for i in range(3)]
  assert all(p['feature_mask'].all() for p in pages)
  np.save(tmp_path / 'pages.npy', np.stack([p['features'] for p in pages]).astype(np.float16))
  from_val, _ = generation.generate_pages(specs.run_spec(config), workdir, num_samples=3,
                                          output=str(tmp_path / 'val.jsonl'))
  from_file, n = generation.generate_pages(specs.run_spec(config), workdir, num_samples=None,
                                           output=str(tmp_path / 'file.jsonl'),
                                           features_path=str(tmp_path / 'pages.npy'))
  assert n == 3
  val, file = read_lines(from_val), read_lines(from_file)
  assert [r['source'] for r in file] == ['pages.npy:0', 'pages.npy:1', 'pages.npy:2']
  for a, b in zip(val, file):
    check_record(b)
    # float16 storage rounds the features: markup may differ on near ties, but rarely.
    assert a['settings'] == b['settings']
  assert sum(a['markup'] == b['markup'] for a, b in zip(val, file)) >= 2
  config.decode.strategy, config.decode.temperature, config.decode.seed = 'sample', 1.2, 7
  runs = [read_lines(generation.generate_pages(specs.run_spec(config), workdir, num_samples=4,
                                               output=str(tmp_path / f's{i}.jsonl'))[0])
          for i in range(2)]
  assert runs[0] == runs[1]
  for r in runs[0]:
    check_record(r)


@pytest.mark.parametrize('make,message', [
    (lambda: np.zeros((2, 5, 3), np.float32), 'feature_dim 3 != data.feature_dim 16'),
    (lambda: np.full((2, 5, 16), np.nan, np.float32), 'page 0 has non-finite features'),
    (lambda: np.zeros((2, 2, 5, 16), np.float32), 'features must be [pages, patches, 16]'),
])
def test_bad_features_file_is_one_line(workdir, tmp_path, make, message):
  path = tmp_path / 'bad.npy'
  np.save(path, make())
  proc = run_generate('--workdir', workdir, '--features', str(path))
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: {path}: ') and message in last, proc.stderr


def test_missing_workdir_is_one_line(tmp_path):
  proc = run_generate('--workdir', str(tmp_path / 'nope'))
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith('error: '), proc.stderr
  assert 'config.json' in proc.stderr


def test_config_of_an_older_run_gets_todays_defaults(tmp_path):
  """A config.json saved before a section existed (here: decode) loads with its defaults."""
  saved = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py')).to_dict()
  del saved['decode']
  saved['model']['d_model'] = 48
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config = specs.load_run_config(str(tmp_path))
  assert config.model.d_model == 48 and config.decode.strategy == 'greedy'
  config_validation.validate(config)


def test_config_of_an_older_run_drops_retired_fields(tmp_path):
  """A config.json holding a field since retired (config.RETIRED_FIELDS) still loads."""
  saved = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py')).to_dict()
  saved['loss']['vocab_chunk_size'] = 2048
  del saved['loss']['logits_chunk_pages']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config = specs.load_run_config(str(tmp_path))
  assert 'vocab_chunk_size' not in config.loss and config.loss.logits_chunk_pages == 0
  config_validation.validate(config)


@pytest.mark.parametrize('text,words', [('{"model": {', 'unreadable'), ('[1]', 'JSON list'),
                                        ('{"model": 3}', 'not a training config')])
def test_damaged_config_json_is_one_line(tmp_path, text, words):
  (tmp_path / 'config.json').write_text(text)
  with pytest.raises(ConfigError, match=words) as info:
    specs.load_run_config(str(tmp_path))
  assert str(info.value).startswith(str(tmp_path / 'config.json')) and '\n' not in str(info.value)


@pytest.mark.parametrize('n', [0, -1])
def test_num_samples_below_one_is_refused_before_anything_loads(tmp_path, n):
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py'))
  with pytest.raises(generation.InputError, match=rf'^--num_samples={n}: must be >= 1'):
    generation.generate_pages(specs.run_spec(config), str(tmp_path / 'nothing_here'), num_samples=n)
