"""The bad-input table: commands a new user might run with one bad input. Each must exit nonzero
within SECONDS with exactly one line on stderr, naming the culprit (file, record, field or flag),
and leave a finished run's checkpoints and training history byte for byte as they were.

Adding a case is a row, and usually a setup function: `setup(bench)` makes the bad input and
returns the command's arguments; `names` are the words the stderr line must hold. A setup gets a
Bench: `workdir`, a private copy of a finished run (conftest's tiny_run: one epoch of
configs/tiny.py; the table checks its checkpoints/ and training_history.json), `tmp`, a private
folder, and `dataset()` / `corpus`, a private copy of a small prepared dataset and its HTML
pages. `after(bench)` may check more once the command has failed. The setup runs before the
run's state is taken: a case may damage the run itself (a checkpoint file, say), and the command
must then leave it as the setup did (or set run_unchanged=False where moving it aside is right).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from phase1_jax.data import prepare

SECONDS = 10.0
CONFIGS = REPO / 'configs'
TRAIN, EVALUATE, GENERATE, PREPARE = ('phase1_jax.train', 'phase1_jax.evaluate',
                                      'phase1_jax.generate', 'phase1_jax.data.prepare')


@dataclasses.dataclass
class Bench:
  """What a case's setup works on (see the module docstring)."""
  workdir: Path
  tmp: Path
  clean_dataset: Path
  corpus: Path

  def dataset(self) -> Path:
    """A private copy of the prepared dataset, to damage."""
    return Path(shutil.copytree(self.clean_dataset, self.tmp / 'dataset'))


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  module: str                               # run as python -m <module>
  setup: Callable[[Bench], list]            # makes the bad input; returns the arguments
  names: tuple[str, ...]                    # what the one stderr line must hold
  after: Callable[[Bench], None] | None = None   # more checks once the command has failed
  seconds: float = SECONDS                  # it must fail within this
  run_unchanged: bool = True                # the run's checkpoints and history stay as they were


# ------------------------------------------------------------------------------------- setups

def train(*args) -> Callable[[Bench], list]:
  """T: the tiny config resuming the finished run, with `args` (flags or --config.* overrides)."""
  return lambda b: ['--config', CONFIGS / 'tiny.py', *args, '--workdir', b.workdir]


def config_file(text: str, arg: str = '') -> Callable[[Bench], list]:
  """Train with a config file of `text` (bad.py), `--config bad.py[:arg]`."""
  def setup(b):
    (b.tmp / 'bad.py').write_text(text)
    return ['--config', f'{b.tmp / "bad.py"}{arg}', '--workdir', b.workdir]
  return setup


def on_dataset(damage: Callable[[Path], None]) -> Callable[[Bench], list]:
  """Train configs/html.py on a copy of the prepared dataset that `damage` spoiled."""
  def setup(b):
    path = b.dataset()
    damage(path)
    return ['--config', f'{CONFIGS / "html.py"}:{path}', '--config.train.batch_size=4',
            '--workdir', b.workdir]
  return setup


def truncate_shard(path: Path):
  shard = path / 'train' / 'train-00001.array_record'
  os.truncate(shard, os.path.getsize(shard) // 2)


def garble_shard(path: Path):
  """16 bytes overwritten inside the records (they fill the file's start; the footer its end)."""
  shard = path / 'train' / 'train-00001.array_record'
  data = shard.read_bytes()
  end = data.index(b'\0' * 64)
  with open(shard, 'r+b') as f:
    f.seek(end // 2)
    f.write(b'\xa5' * 16)


def metadata_text(text: str) -> Callable[[Path], None]:
  """dataset.json replaced by `text`."""
  return lambda path: (path / 'dataset.json').write_text(text)


def without_splits(path: Path):
  meta = json.loads((path / 'dataset.json').read_text())
  del meta['splits']
  (path / 'dataset.json').write_text(json.dumps(meta))


def generate(*args, config_json: str | None = None) -> Callable[[Bench], list]:
  """G: decode with the finished run, with `args`; `config_json` replaces its config.json."""
  def setup(b):
    if config_json is not None:
      (b.workdir / 'config.json').write_text(config_json)
    return ['--workdir', b.workdir, '--output', b.tmp / 'pages.jsonl', *args]
  return setup


def bad_features(b: Bench) -> list:
  np.save(b.tmp / 'bad.npy', np.zeros((2, 5, 3), np.float32))
  return ['--workdir', b.workdir, '--features', b.tmp / 'bad.npy']


def prepare_pages(*args, html: str | None = None) -> Callable[[Bench], list]:
  """P: prepare the corpus (or `html`, a folder under tmp) into tmp/out, with `args`."""
  def setup(b):
    folder = b.corpus if html is None else b.tmp / html
    return ['--html_dir', folder, '--features_dir', b.corpus / 'features', '--out',
            b.tmp / 'out', *args]
  return setup


def binary_pages(b: Bench) -> list:
  """A folder of files of random bytes named .html (and features for them)."""
  rng = np.random.default_rng(0)
  (b.tmp / 'junk').mkdir()
  for name, size in (('a', 200_000), ('b', 30_000)):
    (b.tmp / 'junk' / f'{name}.html').write_bytes(rng.bytes(size))
    np.save(b.tmp / 'junk' / f'{name}.npy', np.zeros((4, 16), np.float32))
  return ['--html_dir', b.tmp / 'junk', '--features_dir', b.tmp / 'junk', '--out', b.tmp / 'out']


def no_output(b: Bench):
  """A failed prepare leaves no --out (nor its .incomplete): the same command can run again."""
  assert not os.path.exists(b.tmp / 'out') and not os.path.exists(b.tmp / 'out.incomplete')


SYNTAX_ERROR = 'def get_config(:\n  pass\n'
NO_GET_CONFIG = 'X = 1\n'
STRING_EPOCHS = ("from phase1_jax.config import base_config\n\n\ndef get_config():\n"
                 "  config = base_config()\n  config.train.num_epochs = '3'\n  return config\n")

CASES = [
    # A prepared dataset that is damaged: named before anything compiles.
    Case('truncated_shard', TRAIN, on_dataset(truncate_shard),
         ('train-00001.array_record', 'not a readable ArrayRecord shard')),
    Case('garbled_shard', TRAIN, on_dataset(garble_shard),
         ('train-00001.array_record', 'corrupt')),
    Case('dataset_json_without_splits', TRAIN, on_dataset(without_splits),
         ('dataset.json', "'splits'")),
    Case('dataset_json_list', TRAIN, on_dataset(metadata_text('[1, 2, 3]')),
         ('dataset.json', 'JSON list')),
    Case('dataset_json_garbage', TRAIN, on_dataset(metadata_text('{not json')),
         ('dataset.json', 'unreadable')),
    # Config files and flags.
    Case('config_syntax_error', TRAIN, config_file(SYNTAX_ERROR), ('bad.py:1', 'SyntaxError')),
    Case('config_without_get_config', TRAIN, config_file(NO_GET_CONFIG),
         ('bad.py', 'no get_config')),
    Case('config_string_for_int', TRAIN, config_file(STRING_EPOCHS),
         ('bad.py:6', "'num_epochs'")),
    Case('config_argument_refused', TRAIN, lambda b: ['--config', f'{CONFIGS / "full.py"}:20k',
                                                      '--workdir', b.workdir],
         ('full.py', '20k', 'must be one of')),
    Case('config_file_missing', TRAIN, lambda b: ['--config', b.tmp / 'nope.py'],
         ('nope.py', 'no such config file')),
    Case('flag_value_of_wrong_type', TRAIN, train("--config.train.num_epochs='3'"),
         ('--config.train.num_epochs', 'invalid literal')),
    Case('unknown_flag', TRAIN, train('--workdri=x'), ("'workdri'",)),
    Case('unknown_field', TRAIN, train('--config.model.attention.kindd=dense'),
         ('config.model.attention.kindd', 'model.attention.kind?')),
    Case('bad_field_value', TRAIN, train('--config.model.num_heads=3'),
         ('config.model.num_heads=3', 'must divide')),
    Case('non_finite_float', TRAIN, train('--config.data.feature_noise=inf'),
         ('config.data.feature_noise=inf', 'finite')),
    # The mesh: fsdp over more devices than the host has (2 CPU devices, or one accelerator).
    Case('fsdp_larger_than_devices', TRAIN,
         train('--config.parallel.cpu_devices=2', '--config.parallel.fsdp=8'),
         ('config.parallel.fsdp=8', 'devices', 'fits')),
    # evaluate and generate.
    Case('evaluate_without_checkpoints', EVALUATE,
         lambda b: ['--config', CONFIGS / 'tiny.py', '--workdir', b.tmp],
         ('checkpoints',)),
    Case('generate_garbled_config_json', GENERATE, generate(config_json='{"model": {'),
         ('config.json', 'unreadable')),
    Case('generate_negative_num_samples', GENERATE, generate('--num_samples=-1'),
         ('--num_samples=-1',)),
    Case('generate_features_of_wrong_width', GENERATE, bad_features,
         ('bad.npy', 'feature_dim 3 != data.feature_dim 16')),
    # prepare: nothing left behind. (--grid is gone; '0,4,16' once left a half-written --out.)
    Case('prepare_retired_grid_flag', PREPARE, prepare_pages('--grid', 'a,b,c'), ("'grid'",),
         no_output),
    Case('prepare_retired_grid_numbers', PREPARE, prepare_pages('--grid', '0,4,16'), ("'grid'",),
         no_output),
    Case('prepare_binary_pages', PREPARE, binary_pages, ('a.html', 'not text'), no_output),
]


# ------------------------------------------------------------------------------------ the table

@pytest.fixture(scope='module')
def corpus_and_dataset(tmp_path_factory):
  """A small HTML corpus with features per page, and the dataset prepare makes of it (several
  shards per split)."""
  from tests.test_html_data import write_corpus
  root = tmp_path_factory.mktemp('bad_inputs')
  write_corpus(str(root / 'pages'), n_pages=40, features=str(root / 'pages' / 'features'))
  prepare.prepare(str(root / 'pages'), str(root / 'dataset'), vocab_size=320, val_fraction=0.2,
                  records_per_shard=8, features_dir=str(root / 'pages' / 'features'),
                  progress=False)
  return root / 'pages', root / 'dataset'


def run_state(workdir: Path) -> dict:
  """{path: sha256} of the run's checkpoints and history: what no bad input may change."""
  paths = [p for p in sorted((workdir / 'checkpoints').rglob('*')) if p.is_file()]
  paths.append(workdir / 'training_history.json')
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def run(module: str, args: list) -> tuple[subprocess.CompletedProcess, float]:
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(REPO / '.jax_cache')}
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, '-m', module, *map(str, args)], capture_output=True,
                        text=True, cwd=REPO, timeout=300, env=env)
  return proc, time.perf_counter() - start


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(case, tiny_run, corpus_and_dataset, tmp_path):
  """The case's command fails fast, with one stderr line naming the culprit, changing nothing."""
  corpus, dataset = corpus_and_dataset
  bench = Bench(Path(shutil.copytree(tiny_run, tmp_path / 'run')), tmp_path / 'case', dataset,
                corpus)
  bench.tmp.mkdir()
  args = case.setup(bench)
  before = run_state(bench.workdir)
  proc, seconds = run(case.module, args)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode not in (0, None), proc.stdout + proc.stderr
  assert len(lines) == 1, proc.stderr
  assert all(word in lines[0] for word in case.names), lines[0]
  assert seconds < case.seconds, f'{seconds:.1f} s: {lines[0]}'
  if case.run_unchanged:
    assert run_state(bench.workdir) == before
  if case.after is not None:
    case.after(bench)
