"""The bad-input table: commands a new user might run with one bad input. Each must exit nonzero
within SECONDS of CPU time (before any compile: a train step's takes more; CPU time, not wall
time, so a loaded machine does not fail the table) with exactly one line on stderr, naming the
culprit (file, record, field or flag), and leave a finished run's checkpoints and training
history byte for byte as they were.

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
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from support import REPO

from phase1_jax import config as config_lib
from phase1_jax import specs
from phase1_jax.data import prepare
from phase1_jax.training import state as state_lib
from phase1_jax.training.checkpoint import Checkpointer

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
  cleanups: list = dataclasses.field(default_factory=list)   # run after the case, pass or fail

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
  seconds: float = SECONDS                  # it must fail within this much CPU time
  run_unchanged: bool = True                # the run's checkpoints and history stay as they were
  ulimit_kb: int | None = None              # run under `ulimit -f`: files past it fail (EFBIG)


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


def output_under_a_file(b: Bench) -> list:
  """G of one page, --output a path whose folder is a file."""
  (b.tmp / 'file').write_text('not a folder')
  return ['--workdir', b.workdir, '--output', b.tmp / 'file' / 'pages.jsonl', '--num_samples=1']


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


TINY_STEP = 8   # tiny_run's one checkpoint: one epoch of configs/tiny.py, 8 steps


def add_altered_step(workdir: Path, *, none_good: bool = False):
  """Adds step 16 to the run, the best and newest: step 8's state with every parameter + 1 and a
  better best_metric. Then gives it step 8's array data: a step that reads without error but
  whose arrays are not the ones saved (test_checkpoint.alter_state_data says why bytes
  overwritten in place are not a reliable way). `none_good`: step 8 gets step 16's, too."""
  config = config_lib.load_file(CONFIGS / 'tiny.py')
  best = config.checkpoint.best_metric
  tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), TINY_STEP)
  directory = workdir / 'checkpoints'
  with Checkpointer(directory, async_save=False, best_metric=best,
                    best_mode=config_lib.METRIC_MODES[best]) as ckpt:
    target = state_lib.abstract_train_state(specs.model_spec(config), tx)
    state, extra = ckpt.restore(TINY_STEP, target)
    value = json.loads((directory / str(TINY_STEP) / 'metrics' / 'metrics').read_text())[best]
    better = value + (1 if config_lib.METRIC_MODES[best] == 'max' else -1)
    ckpt.save(2 * TINY_STEP, state.replace(params=jax.tree.map(lambda x: x + 1, state.params)),
              metrics={best: better}, extra={**extra, 'epoch': 2})
  old, new = directory / str(TINY_STEP) / 'state', directory / str(2 * TINY_STEP) / 'state'
  saved = shutil.copytree(new, workdir / 'state_16')
  shutil.rmtree(new)
  shutil.copytree(old, new)
  if none_good:
    shutil.rmtree(old)
    shutil.copytree(saved, old)
  shutil.rmtree(saved)


def altered_best_step(b: Bench) -> list:
  """E on a run whose best step's data was altered; its evaluation_results.json kept aside."""
  add_altered_step(b.workdir)
  shutil.copy(b.workdir / 'evaluation_results.json', b.tmp)
  return ['--config', CONFIGS / 'tiny.py', '--workdir', b.workdir]


def no_results_written(b: Bench):
  """evaluate reported no metrics: evaluation_results.json is the one the run wrote."""
  assert ((b.workdir / 'evaluation_results.json').read_bytes() ==
          (b.tmp / 'evaluation_results.json').read_bytes())


def no_good_step(b: Bench) -> list:
  """T on a run whose every step's data was altered: nothing to resume from or fall back to."""
  add_altered_step(b.workdir, none_good=True)
  return train()(b)


# The resumed epoch (2 steps of 16 pages, 8 val pages) writes its histograms (~230 kB in all,
# the first thing past LOG_LIMIT_KB) before the epoch's record or checkpoint: those stay as they
# were. No train records (log_every_steps) for the history to keep either.
LOG_LIMIT_KB = 150
SHORT_EPOCH = ('--config.data.train_samples=16', '--config.data.val_samples=8',
               '--config.train.log_every_steps=100')


def failed_recently(b: Bench):
  """The trainer exited within SECONDS of its failed write: the event file's last change."""
  events = max((b.workdir / 'tensorboard').iterdir(), key=lambda p: p.stat().st_mtime)
  assert time.time() - events.stat().st_mtime < SECONDS


def full_checkpoint_disk(b: Bench) -> list:
  """T with asynchronous saves every step, the run's checkpoints on a 3 MB tmpfs filled to 64 kB
  short of full: step 9's save fails (reported at step 10's). Mounting needs root: skipped
  where it is refused."""
  checkpoints, aside = b.workdir / 'checkpoints', b.tmp / 'checkpoints'
  shutil.move(checkpoints, aside)
  checkpoints.mkdir()
  try:
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3M', 'tmpfs', checkpoints], check=True,
                   capture_output=True, text=True)
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f'cannot mount a tmpfs: {getattr(e, "stderr", None) or e}'.strip())
  b.cleanups.append(lambda: subprocess.run(['umount', checkpoints], check=True))
  shutil.copytree(aside, checkpoints, dirs_exist_ok=True)
  (checkpoints / 'filler').write_bytes(b'\0' * (shutil.disk_usage(checkpoints).free - 64_000))
  return train('--config.checkpoint.async_save=True', '--config.checkpoint.every_steps=1',
               '--config.train.log_every_steps=100')(b)


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
    # Their output cannot be written: its folder is checked before anything loads.
    Case('generate_output_unwritable', GENERATE, output_under_a_file,
         ('pages.jsonl', 'cannot write')),
    # The size limit shows only when the results are written, after the evaluation has compiled
    # and run (20.7 CPU s in a CI run on a shared 2-core 2 GHz Xeon): a longer budget.
    Case('evaluate_results_past_file_size_limit', EVALUATE,
         lambda b: ['--config', CONFIGS / 'tiny.py', '--workdir', b.workdir],
         ('evaluation_results.json', 'File too large'), ulimit_kb=1, seconds=60),
    # prepare: nothing left behind. (--grid is gone; '0,4,16' once left a half-written --out.)
    Case('prepare_retired_grid_flag', PREPARE, prepare_pages('--grid', 'a,b,c'), ("'grid'",),
         no_output),
    Case('prepare_retired_grid_numbers', PREPARE, prepare_pages('--grid', '0,4,16'), ("'grid'",),
         no_output),
    Case('prepare_binary_pages', PREPARE, binary_pages, ('a.html', 'not text'), no_output),
    # Checkpoints whose data was altered (checksums): never evaluated, never resumed from.
    Case('altered_checkpoint_evaluate', EVALUATE, altered_best_step,
         ('checkpoints/16', 'step 16 fails its checksum'), no_results_written),
    Case('altered_checkpoints_resume', TRAIN, no_good_step,
         ('no readable checkpoint', 'step 16 fails its checksum')),
    # Writers that fail: a log file past the file size limit, a full disk under async saves.
    # Both must train first; the bar for them is the time after the failure (after=).
    Case('dead_log_writer', TRAIN, train(*SHORT_EPOCH), ('tensorboard/events.out.tfevents',
                                                         'File too large'),
         failed_recently, seconds=60, ulimit_kb=LOG_LIMIT_KB),
    Case('async_save_disk_full', TRAIN, full_checkpoint_disk,
         ('cannot write checkpoint step 9', 'No space left on device',
          'older checkpoints are intact'), seconds=60),
]


# ------------------------------------------------------------------------------------ the table

@pytest.fixture(scope='module')
def corpus_and_dataset(tmp_path_factory):
  """A small HTML corpus with features per page, and the dataset prepare makes of it (several
  shards per split)."""
  from support import write_corpus
  root = tmp_path_factory.mktemp('bad_inputs')
  write_corpus(str(root / 'pages'), n_pages=40, features=str(root / 'pages' / 'features'))
  prepare.prepare(str(root / 'pages'), str(root / 'dataset'), vocab_size=320, val_fraction=0.2,
                  records_per_shard=8, features_dir=str(root / 'pages' / 'features'),
                  progress=False)
  return root / 'pages', root / 'dataset'


def run_state(workdir: Path) -> dict:
  """{path: sha256} of the run's committed checkpoints and history: what no bad input may change.
  (A save that failed leaves its uncommitted step directory, removed when the checkpoints are
  next opened.)"""
  def committed(p: Path) -> bool:
    return p.is_file() and not any('.orbax-checkpoint-tmp' in part for part in p.parts)
  paths = [p for p in sorted((workdir / 'checkpoints').rglob('*')) if committed(p)]
  paths.append(workdir / 'training_history.json')
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def run(module: str, args: list, ulimit_kb: int | None = None
        ) -> tuple[subprocess.CompletedProcess, float]:
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(REPO / '.jax_cache')}
  command = [sys.executable, '-m', module, *map(str, args)]
  if ulimit_kb:   # as test_fault_tolerance.start_cli
    command = ['bash', '-c', f'trap "" XFSZ; ulimit -f {ulimit_kb}; exec "$@"', 'bash', *command]
    # No compilation-cache writes: one cut short by the limit would stay in the shared cache.
    env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = str(2**62)
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)   # the command's, once it is reaped
  return proc, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(case, tiny_run, corpus_and_dataset, tmp_path):
  """The case's command fails fast, with one stderr line naming the culprit, changing nothing."""
  corpus, dataset = corpus_and_dataset
  bench = Bench(Path(shutil.copytree(tiny_run, tmp_path / 'run')), tmp_path / 'case', dataset,
                corpus)
  bench.tmp.mkdir()
  try:
    args = case.setup(bench)
    before = run_state(bench.workdir)
    proc, seconds = run(case.module, args, case.ulimit_kb)
    lines = proc.stderr.splitlines()   # not stripped: a progress bar's residue is a line
    assert proc.returncode not in (0, None), proc.stdout + proc.stderr
    assert len(lines) == 1, proc.stderr
    assert all(word in lines[0] for word in case.names), lines[0]
    assert seconds < case.seconds, f'{seconds:.1f} CPU s: {lines[0]}'
    if case.run_unchanged:
      assert run_state(bench.workdir) == before
    if case.after is not None:
      case.after(bench)
  finally:
    for cleanup in bench.cleanups:
      cleanup()


def test_resume_falls_back_past_an_altered_step(tiny_run, tmp_path):
  """Not a failure, so not a row: T on a run whose newest (and best) step was altered names
  that step, moves it aside and resumes from step 8, the one before. With num_epochs=1 nothing
  is left to train: the run goes straight to its final evaluation, of step 8."""
  workdir = Path(shutil.copytree(tiny_run, tmp_path / 'run'))
  add_altered_step(workdir)
  proc, _ = run(TRAIN, ['--config', CONFIGS / 'tiny.py', '--config.train.num_epochs=1',
                        '--workdir', workdir])
  assert proc.returncode == 0, proc.stderr
  assert 'checkpoints/16: step 16 fails its checksum' in proc.stderr, proc.stderr
  assert 'Restored older checkpoint step 8' in proc.stderr, proc.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['16.unreadable', '8']
  assert json.loads((workdir / 'evaluation_results.json').read_text())['checkpoint_step'] == 8
