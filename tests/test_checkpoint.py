"""Tests for phase1_jax.training.checkpoint (tiny states, CPU only)."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import chex
import flax.struct
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import load_config, tiny_setup

from phase1_jax import specs
from phase1_jax.training import checkpoint as checkpoint_lib
from phase1_jax.training import checkpoint_compat as compat
from phase1_jax.training import state as state_lib
from phase1_jax.training.checkpoint import Checkpointer, CheckpointError, CheckpointMismatchError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class TrainState:
  params: dict
  step: jax.Array
  key: jax.Array


def make_state(seed: int = 0, d_model: int = 4) -> TrainState:
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {
      'embed': {
          'table': jax.random.normal(k1, (5, d_model), jnp.float32)
      },
      'layers': {
          '0': {
              'kernel': jax.random.normal(k2, (d_model, d_model), jnp.float32),
              'bias': jnp.zeros((d_model,), jnp.float32)
          }
      },
  }
  return TrainState(params=params, step=jnp.array(seed, jnp.int32), key=jax.random.key_data(k3))


def abstract(state):
  return jax.eval_shape(lambda: state)


def save_steps(directory, losses, d_model=4, **kwargs):
  """Saves steps 1..len(losses) with val_loss metrics; returns the last state."""
  with Checkpointer(directory, async_save=False, **kwargs) as ckpt:
    for step, loss in enumerate(losses, start=1):
      state = make_state(step, d_model)
      assert ckpt.save(step, state, metrics={'val_loss': loss}, extra={'epoch': step})
  return state


def largest_file(root):
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  return max(files, key=os.path.getsize)


def test_round_trip_values_types_and_extra(tmp_path):
  state = make_state(7)
  extra = {'epoch': 3, 'patience_left': 2, 'history_len': 10, 'best': 0.5}
  with Checkpointer(tmp_path / 'ckpt') as ckpt:  # async save
    assert ckpt.save(10, state, extra=extra)
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 10
    restored, restored_extra = ckpt.restore(10, abstract(state))
  assert type(restored) is TrainState
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert isinstance(b, jax.Array) and a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert restored.key.dtype == jnp.uint32
  assert restored_extra == extra


def test_keeps_latest_and_best_min_mode(tmp_path):
  save_steps(tmp_path, [5, 1, 3, 4, 6], max_to_keep=1)
  with Checkpointer(tmp_path) as ckpt:  # reopened: state comes from disk
    assert ckpt.all_steps() == [2, 5]
    assert ckpt.latest_step() == 5
    assert ckpt.best_step() == 2
  assert not [p for p in os.listdir(tmp_path) if 'tmp' in p]


def test_keeps_latest_and_best_max_mode_and_steps_without_metrics(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2, best_metric='bleu', best_mode='max',
                    async_save=False) as ckpt:
    ckpt.save(1, make_state(1), metrics={'bleu': 0.9})
    ckpt.save(2, make_state(2), metrics={'bleu': 0.1})
    ckpt.save(3, make_state(3))  # no metrics at all
    ckpt.save(4, make_state(4), metrics={'val_loss': 2.0})  # best metric missing
    ckpt.save(5, make_state(5), metrics={'bleu': float('nan')})
    assert ckpt.all_steps() == [1, 4, 5]
    assert ckpt.best_step() == 1
    assert not ckpt.save(5, make_state(5))  # existing step: no-op, no error


def test_best_step_none_without_metrics(tmp_path):
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    assert ckpt.best_step() is None and ckpt.latest_step() is None
    ckpt.save(1, make_state(1))
    assert ckpt.best_step() is None


def test_missing_step_and_empty_dir_raise_file_not_found(tmp_path):
  directory = tmp_path / 'ckpt'
  with Checkpointer(directory) as ckpt:
    with pytest.raises(FileNotFoundError, match=str(directory)):
      ckpt.restore(3, abstract(make_state()))
    assert ckpt.restore_latest_good(abstract(make_state())) is None
  save_steps(directory, [1.0])
  with Checkpointer(directory) as ckpt:
    with pytest.raises(FileNotFoundError, match=r'step 9 .*steps present: \[1\]'):
      ckpt.restore(9, abstract(make_state()))


# Orbax's aborted async reads can outlive the failed restore and hit a closed
# event loop ("Exception ignored ... Event loop is closed"): harmless noise.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('where,how', [('d', 'truncate'), ('d', 'zero'), ('', 'truncate')])
def test_corrupt_step_raises_and_falls_back(tmp_path, where, how):
  save_steps(tmp_path, [3.0, 2.0])
  # state/d/ holds the array data; for tiny states the largest file under
  # state/ is the _METADATA JSON, which is a second way to be corrupt.
  victim = largest_file(tmp_path / '2' / 'state' / where)
  size = os.path.getsize(victim)
  with open(victim, 'r+b') as f:
    if how == 'truncate':
      f.truncate(size // 2)
    else:
      f.write(b'\0' * size)
  target = abstract(make_state())
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match=str(tmp_path / '2')) as info:
      ckpt.restore(2, target)
    assert '\n' not in str(info.value)
    step, state, extra = ckpt.restore_latest_good(target)
    # The unreadable step is set aside, so a resumed run can save step 2 again.
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    assert ckpt.save(2, make_state(2))
  assert step == 1 and extra == {'epoch': 1}
  assert sorted(os.listdir(tmp_path)) == ['1', '2', '2.unreadable']
  np.testing.assert_array_equal(state.params['embed']['table'],
                                make_state(1).params['embed']['table'])


def test_all_steps_corrupt_raises(tmp_path):
  save_steps(tmp_path, [1.0])
  os.remove(tmp_path / '1' / 'state' / '_METADATA')
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match='no readable checkpoint'):
      ckpt.restore_latest_good(abstract(make_state()))


def test_shape_mismatch_names_leaf(tmp_path):
  save_steps(tmp_path, [1.0])
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match=r"'params/embed/table'.*\[5, 4\].*\[5, 8\]") as info:
      ckpt.restore(1, abstract(make_state(d_model=8)))
    assert str(tmp_path / '1') in str(info.value)
    # A mismatch is a config error: no silent fallback to older steps.
    with pytest.raises(CheckpointError, match='embed/table'):
      ckpt.restore_latest_good(abstract(make_state(d_model=8)))
    # A leaf the checkpoint does not have is named too.
    bigger = make_state()
    bigger = bigger.replace(params={**bigger.params, 'head': jnp.zeros((2,))})
    with pytest.raises(CheckpointError, match="'params/head' is missing"):
      ckpt.restore(1, abstract(bigger))


def test_dtype_mismatch(tmp_path):
  save_steps(tmp_path, [1.0])
  wrong = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) if x.dtype == jnp.float32 else x,
      abstract(make_state()))
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match='float32.*bfloat16'):
      ckpt.restore(1, wrong)


def test_grain_iterator_round_trip(tmp_path):

  def make_iter():
    return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())

  it = make_iter()
  for _ in range(3):
    next(it)
  state = make_state()
  with Checkpointer(tmp_path) as ckpt:  # async: iterator state must be captured at save()
    assert ckpt.save(3, state, data_iterator=it, extra={'epoch': 0})
    expected = next(it)
    ckpt.wait_until_finished()
    fresh = make_iter()
    _, extra = ckpt.restore(3, abstract(state), data_iterator=fresh)
    np.testing.assert_array_equal(next(fresh), expected)
    np.testing.assert_array_equal(expected, np.arange(12, 16))
    assert extra == {'epoch': 0}
    # Restoring without an iterator ignores the saved position.
    ckpt.restore(3, abstract(state))
    # A step saved without an iterator cannot fill one.
    ckpt.save(4, state)
    with pytest.raises(CheckpointError, match='without a data iterator'):
      ckpt.restore(4, abstract(state), data_iterator=make_iter())


DISK_FULL = '''
import resource, signal, sys
import numpy as np
from phase1_jax.training.checkpoint import Checkpointer, CheckpointError
directory, mode = sys.argv[1:]
state = {'w': np.random.default_rng().standard_normal((256, 256)).astype(np.float32)}
with Checkpointer(directory, async_save=False) as ckpt:
  ckpt.save(1, state)
# Files may not grow past 20 kB from here on: writes fail with EFBIG, like a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
ckpt = Checkpointer(directory, async_save=mode == 'async')
try:
  ckpt.save(2, {'w': state['w'] + 1})
  ckpt.save(3, {'w': state['w'] + 2})   # async: step 2's failure surfaces here
  ckpt.wait_until_finished()
except CheckpointError as e:
  print(e)
ckpt.close()   # the failure was reported: no second error
np.save(sys.argv[1] + '.npy', state['w'][:2])
'''


@pytest.mark.parametrize('mode', ['sync', 'async'])
def test_disk_full_is_one_line_and_keeps_older_steps(tmp_path, mode):
  """A save that cannot be written (file size limit: EFBIG, as ENOSPC would) raises one line
  naming the directory, the step that failed and the cause, and nothing else is printed (no
  tracebacks from Orbax's writer threads); the step before stays restorable, the partial one is
  removed when the directory is opened again."""
  directory = str(tmp_path / 'ckpt')
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-c', DISK_FULL, directory, mode], capture_output=True,
                        text=True, env=env, timeout=300)
  out = proc.stdout.strip().splitlines()
  assert proc.returncode == 0 and len(out) == 1, proc.stderr[-3000:]
  for noise in ('Traceback', 'Event loop is closed', 'exception was never retrieved', 'ERROR'):
    assert noise not in proc.stderr, proc.stderr[-3000:]
  assert re.fullmatch(rf'{directory}: cannot write checkpoint step 2 \(.*File too large.*\); '
                      'older checkpoints are intact', out[0]), out[0]
  expected = np.load(directory + '.npy')
  state = {'w': jax.ShapeDtypeStruct((256, 256), jnp.float32)}
  with Checkpointer(directory) as ckpt:
    assert ckpt.all_steps() == [1]
    restored, _ = ckpt.restore(1, state)
  np.testing.assert_array_equal(np.asarray(restored['w'])[:2], expected)
  assert os.listdir(directory) == ['1']


def test_tensorstore_errors_are_one_short_line_and_never_logged():
  """A full disk while tensorstore opens an array (many small arrays, as a training state has):
  its error carries the array's spec (~1 kB of JSON) after the cause, which the error line
  leaves out; the "Future exception was never retrieved" asyncio logs for such errors (no
  Python frames, racy) are dropped like Orbax's own."""
  path = '/w/checkpoints/9.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/'
  spec = '{\\"context\\":{\\"cache_pool\\":{}},' + '\\"x\\":1,' * 200 + '}'
  error = ValueError(f'RESOURCE_EXHAUSTED: Error opening "zarr" driver: Error writing "b/.zarray" '
                     f'in OCDBT database at local file "{path}": Failed to write 217 bytes to '
                     f"file 4: No space left on device [tensorstore_spec='{spec}'] "
                     "[os_error_code='28']")
  line = checkpoint_lib._one_line(error)
  assert 'tensorstore_spec' not in line and len(line) < 330, line
  assert line.endswith("No space left on device [os_error_code='28']"), line
  record = logging.LogRecord('asyncio', logging.ERROR, 'base_events.py', 1, 'Future exception was '
                             f'never retrieved\nfuture: <Future finished exception={error!r}>',
                             None, None)
  assert not checkpoint_lib._QUIET.filter(record)
  other = logging.LogRecord('asyncio', logging.ERROR, 'base_events.py', 1, 'Future exception was '
                            "never retrieved\nfuture: <Future exception=ValueError('x')>", None,
                            None)
  assert checkpoint_lib._QUIET.filter(other)


def test_uncommitted_saves_removed_on_open(tmp_path):
  """What a kill during a save leaves (a tmp step directory, with or without Orbax's timestamp
  suffix) is deleted when the directory is opened; committed steps and other files stay."""
  save_steps(tmp_path, [1.0])
  for name in ('2.orbax-checkpoint-tmp', '3.orbax-checkpoint-tmp-1764100000'):
    os.makedirs(tmp_path / name / 'state.orbax-checkpoint-tmp')
  (tmp_path / 'notes.orbax-checkpoint-tmp.txt').write_text('not a step')
  with Checkpointer(tmp_path) as ckpt:
    assert sorted(os.listdir(tmp_path)) == ['1', 'notes.orbax-checkpoint-tmp.txt']
    assert ckpt.all_steps() == [1]
    _, extra = ckpt.restore(1, abstract(make_state()))
  assert extra == {'epoch': 1}


# ------------------------------------------------------------------------------- checksums
def alter_state_data(step_dir, donor_dir):
  """Gives `step_dir` the array data of `donor_dir` (a step of the same tree), a checkpoint that
  reads without error but whose arrays are not the ones saved. (Overwriting bytes inside Orbax's
  files gives either this or a decode error, depending on where they land: OCDBT checksums its
  index nodes, where arrays under 100 bytes live, not the zstd-compressed data.)"""
  shutil.rmtree(os.path.join(step_dir, 'state'))
  shutil.copytree(os.path.join(donor_dir, 'state'), os.path.join(step_dir, 'state'))


def test_altered_array_is_named_set_aside_and_skipped(tmp_path):
  """Altered array data that still decodes: the checksum names the step and the first leaf in
  one line, restore_latest_good moves the step aside and restores the one before."""
  save_steps(tmp_path, [3.0, 2.0, 1.0])
  alter_state_data(tmp_path / '3', tmp_path / '1')
  target = abstract(make_state())
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError) as info:
      ckpt.restore(3, target)
    assert not isinstance(info.value, CheckpointMismatchError)   # corruption, not a config error
    assert str(info.value) == (f"{tmp_path / '3'}: step 3 fails its checksum: leaf "
                               "'params/embed/table' differs from the saved data (corrupt or "
                               "altered)")
    step, state, _ = ckpt.restore_latest_good(target)
    assert step == 2 and ckpt.all_steps() == [1, 2]
  assert sorted(os.listdir(tmp_path)) == ['1', '2', '3.unreadable']
  chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(make_state(2)))


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_overwritten_bytes_never_restore_altered_arrays(tmp_path):
  """A corrupted checkpoint: 16 bytes in the middle of the largest data file inverted. Whether they
  land in compressed data, an index node or a file the merged index does not read, restore
  either refuses the step (naming it) or returns exactly the arrays that were saved."""
  save_steps(tmp_path, [1.0], d_model=64)
  victim = largest_file(tmp_path / '1' / 'state' / 'ocdbt.process_0' / 'd')
  middle = os.path.getsize(victim) // 2
  with open(victim, 'r+b') as f:
    f.seek(middle)
    data = f.read(16)
    f.seek(middle)
    f.write(bytes(b ^ 0xff for b in data))
  with Checkpointer(tmp_path) as ckpt:
    try:
      state, _ = ckpt.restore(1, abstract(make_state(d_model=64)))
    except CheckpointError as e:
      assert str(e).startswith(f"{tmp_path / '1'}: ") and '\n' not in str(e)
    else:
      chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(make_state(1, 64)))


def test_altered_extra_is_named(tmp_path):
  """The extra JSON (epoch, counters, the run's config) is checksummed too."""
  save_steps(tmp_path, [1.0])
  path = tmp_path / '1' / 'extra' / 'metadata'
  path.write_text(json.dumps({**json.loads(path.read_text()), 'epoch': 7}))
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match=r'/1: step 1 fails its checksum: the extra JSON'):
      ckpt.restore(1, abstract(make_state()))


def test_checksums_cover_typed_keys_bfloat16_and_numpy(tmp_path):
  state = {'key': jax.random.key(3), 'w': jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3),
           'n': np.arange(4, dtype=np.int32)}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    restored, _ = ckpt.restore(1, abstract(state))
  np.testing.assert_array_equal(jax.random.key_data(restored['key']),
                                jax.random.key_data(state['key']))
  sums = json.loads((tmp_path / '1' / 'extra' / 'metadata').read_text())['checksums']
  assert sorted(sums['state']) == ['key', 'n', 'w'] and all(sums['state'].values())
  assert sums['algorithm'] == 'crc32' and sums['extra']


def test_checksums_of_another_algorithm_verify(tmp_path, monkeypatch):
  """A step records its checksum algorithm; restore verifies with that one."""
  monkeypatch.setattr(compat, 'DIGEST_ALGORITHM', 'sha256')
  save_steps(tmp_path, [2.0, 1.0])
  monkeypatch.undo()
  alter_state_data(tmp_path / '2', tmp_path / '1')
  with Checkpointer(tmp_path) as ckpt:
    _, extra = ckpt.restore(1, abstract(make_state()))
    assert extra == {'epoch': 1}
    with pytest.raises(CheckpointError, match="step 2 fails its checksum: leaf 'params/embed"):
      ckpt.restore(2, abstract(make_state()))
  assert len(json.loads((tmp_path / '1' / 'extra' / 'metadata').read_text())['checksums']['extra']
             ) == 64


def test_checkpoint_without_checksums_restores_with_one_warning(tmp_path, caplog):
  """Steps written before checksums existed (no checksums item) restore unverified."""
  with Checkpointer(tmp_path, async_save=False, checksums=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, make_state(step), extra={'epoch': step})
  assert 'checksums' not in (tmp_path / '1' / 'extra' / 'metadata').read_text()
  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path) as ckpt:
    for step in (1, 2):
      state, extra = ckpt.restore(step, abstract(make_state()))
      assert extra == {'epoch': step}
  np.testing.assert_array_equal(state.params['embed']['table'],
                                make_state(2).params['embed']['table'])
  warnings = [r.getMessage() for r in caplog.records if 'without checksums' in r.getMessage()]
  assert warnings == [f"{tmp_path / '1'}: saved without checksums (an older version); its data "
                      'is not verified']


def test_evaluate_and_generate_refuse_an_altered_best_step(tmp_path):
  """`python -m phase1_jax.evaluate` on a workdir whose best step was altered exits with one
  line naming that step and writes no metrics; generate (in process) refuses it too."""
  from phase1_jax import config as config_lib
  from phase1_jax.inference import generation
  from phase1_jax.training import state as state_lib
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py'))
  tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), 8)
  _, state = state_lib.create_train_state(specs.model_spec(config), tx, seed=config.seed)
  workdir = tmp_path / 'run'
  best = config.checkpoint.best_metric   # step 8 is the best, 16 the latest
  good, bad = (1.0, 2.0) if config_lib.METRIC_MODES[best] == 'min' else (2.0, 1.0)
  with Checkpointer(workdir / 'checkpoints', async_save=False) as ckpt:
    ckpt.save(8, state, metrics={best: good}, extra={'epoch': 1})
    ckpt.save(16, state.replace(params=jax.tree.map(lambda x: x + 1, state.params)),
              metrics={best: bad}, extra={'epoch': 2})
  alter_state_data(workdir / 'checkpoints' / '8', workdir / 'checkpoints' / '16')
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-m', 'phase1_jax.evaluate', '--config',
                         'configs/tiny.py', '--workdir', str(workdir)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
  assert re.fullmatch(rf"error: {workdir}/checkpoints/8: step 8 fails its checksum: leaf '.*' "
                      r'differs from the saved data \(corrupt or altered\)', lines[0]), lines
  assert not os.path.exists(workdir / 'evaluation_results.json')
  with pytest.raises(CheckpointError, match=rf'^{workdir}/checkpoints/8: step 8 fails'):
    generation.generate_pages(specs.run_spec(config), str(workdir), num_samples=1)
  assert not os.path.exists(workdir / 'generations.jsonl')


# ------------------------------------------------------------- a trained state (the tiny config)

def test_checkpoint_round_trip_is_exact(tmp_path):
  config = load_config('tiny')
  tx, _, state, step, batches = tiny_setup(config, steps_per_epoch=8)
  for batch in batches[:3]:
    state, _ = step(state, batch)
  expected = jax.device_get(state)
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(3, state, extra={'epoch': 0})
    restored, extra = ckpt.restore(3, state_lib.abstract_train_state(specs.model_spec(config), tx))
  assert extra == {'epoch': 0}
  chex.assert_trees_all_equal(jax.device_get(restored), expected)
  chex.assert_trees_all_equal_structs(restored, expected)
