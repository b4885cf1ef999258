"""Fault tolerance of the training job: exact resume after signals and SIGKILLs, the NaN guard,
corrupt and incompatible checkpoints, an unusable workdir or disk, log files that cannot be written.

One uninterrupted reference run (in process, module fixture) is what every interrupted run must
reproduce bit for bit: parameters, optimizer state, history records and TensorBoard scalars.
"""
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support import REPO
from tensorboardX.proto.event_pb2 import Event, SessionLog

from phase1_jax import config as config_lib
from phase1_jax import specs
from phase1_jax.data import pipeline
from phase1_jax.inference import evaluation
from phase1_jax.training import faults, loop, parallel
from phase1_jax.training import state as state_lib
from phase1_jax.training.checkpoint import Checkpointer, CheckpointMismatchError

# The run every test here repeats: tiny model, 3 epochs x 8 steps, no BLEU decoding (compiles).
OVERRIDES = {'train.num_epochs': 3, 'eval.bleu_samples': 0, 'checkpoint.best_metric': 'val_loss',
             'checkpoint.every_steps': 3}
STEPS_PER_EPOCH, TOTAL_STEPS = 8, 24
# Fields that measure time, not the computation.
TIMING_KEYS = ('tokens_per_second', 'epoch_seconds', 'train_seconds', 'bleu_decode_seconds',
               'decode_seconds')


def make_config(**overrides):
  config = config_lib.load_file(REPO / 'configs' / 'tiny.py')
  for path, value in {**OVERRIDES, **overrides}.items():
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def final_state(config, workdir):
  """(step, state) of the newest checkpoint in `workdir`."""
  tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), STEPS_PER_EPOCH)
  with Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    step = ckpt.latest_step()
    state, _ = ckpt.restore(step, state_lib.abstract_train_state(specs.model_spec(config), tx))
  return step, jax.device_get(state)


def history(workdir):
  records = json.load(open(os.path.join(workdir, 'training_history.json')))
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def read_events(path):
  """The complete records of a TFRecord event file ([len u64][crc u32][data][crc u32]...); a
  record cut short by a kill is ignored, as TensorBoard does."""
  with open(path, 'rb') as f:
    data = f.read()
  events, pos = [], 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack('<Q', data[pos:pos + 8])
    if pos + 12 + length + 4 > len(data):
      break
    events.append(Event.FromString(data[pos + 12:pos + 12 + length]))
    pos += 12 + length + 4
  return events


def tensorboard_scalars(workdir):
  """{(tag, step): value} as TensorBoard shows it: files in creation order, and a restart marker
  (SessionLog START at step s) drops the earlier files' events at steps >= s. Fails on a (tag,
  step) logged twice in one run segment."""
  tb = os.path.join(workdir, 'tensorboard')
  files = sorted(os.listdir(tb), key=lambda f: int(f.rsplit('.', 1)[-1]))
  points, segment = {}, set()
  for name in files:
    for event in read_events(os.path.join(tb, name)):
      if event.HasField('session_log') and event.session_log.status == SessionLog.START:
        points = {k: v for k, v in points.items() if k[1] < event.step}
        segment = set()
      for value in event.summary.value:
        if value.HasField('simple_value'):
          key = (value.tag, event.step)
          assert key not in segment, f'{key} logged twice in {name}'
          segment.add(key)
          points[key] = value.simple_value
  return points


def assert_same_run(config, workdir, reference_dir):
  """Bit-identical final state, the same history records, the same TensorBoard scalars."""
  step, state = final_state(config, workdir)
  ref_step, ref_state = final_state(config, reference_dir)
  assert step == ref_step == TOTAL_STEPS
  chex.assert_trees_all_equal(state, ref_state)
  assert history(workdir) == history(reference_dir)
  got, want = tensorboard_scalars(workdir), tensorboard_scalars(reference_dir)
  timing = lambda points: {k: v for k, v in points.items() if k[0].split('/')[-1] not in
                           TIMING_KEYS}
  assert timing(got) == timing(want)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted run: (config, workdir)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  config = make_config()
  loop.train_and_evaluate(config, workdir)
  return config, workdir


class HookedBatches:
  """An epoch's grain iterator whose batches pass through hook(global_step, batch) first."""

  def __init__(self, inner, epoch, hook):
    self.inner, self.epoch, self.hook = inner, epoch, hook

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.inner)
    step = self.epoch * STEPS_PER_EPOCH + self.inner.get_state()['next_index']
    return self.hook(step, batch)

  # grain's checkpoint handler saves non-DatasetIterators as bytes (its DataLoader protocol).
  def get_state(self):
    return json.dumps(self.inner.get_state()).encode()

  def set_state(self, state):
    self.inner.set_state(json.loads(state))

  def start_prefetch(self):
    pass


@pytest.fixture
def hook_batches(monkeypatch):
  """hook_batches(fn): the training loop's batches go through fn(global_step, batch)."""
  real = pipeline.train_iterator

  def install(hook):
    monkeypatch.setattr(pipeline, 'train_iterator', lambda source, *, epoch, **kw: HookedBatches(
        real(source, epoch=epoch, **kw), epoch, hook))
  return install


def nan_features(batch):
  return {**batch, 'features': np.full_like(batch['features'], np.nan)}


# ------------------------------------------------------------------------------ NaN guard
@pytest.mark.parametrize('accumulate', [1, 2])
def test_nonfinite_step_changes_nothing(accumulate):
  """A NaN batch leaves params and the whole optimizer state (moments, count, a MultiSteps
  accumulator) bit-identical and is flagged; with it skipped, the run continues as if the batch
  had not been there (dropout off: masks depend on the step number)."""
  config = make_config(**{'train.accumulate_grad_batches': accumulate, 'model.dropout_rate': 0.0})
  tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), STEPS_PER_EPOCH)
  graphdef, state = state_lib.create_train_state(specs.model_spec(config), tx, seed=config.seed)
  step = parallel.jit_train_step(graphdef=graphdef, tx=tx,
                                 loss_spec=specs.loss_spec(config))
  source = pipeline.make_source(specs.data_spec(config), 'train')
  seed = int(np.random.default_rng().integers(1000))
  b1, b2, b3 = list(pipeline.train_iterator(source, batch_size=8, seed=seed, epoch=0))[:3]
  clean, _ = step(jax.tree.map(jnp.copy, state), b1)
  clean, _ = step(clean, b2)
  clean, _ = step(clean, b3)

  state, m = step(state, b1)
  assert int(m['nonfinite']) == 0
  before = jax.device_get(state)
  state, m = step(state, nan_features(b2))
  assert int(m['nonfinite']) == 1 and not np.isfinite(float(m['loss']))
  after = jax.device_get(state)
  chex.assert_trees_all_equal(after.params, before.params)
  chex.assert_trees_all_equal(after.opt_state, before.opt_state)
  assert int(after.step) == int(before.step) + 1
  state, _ = step(state, b2)
  state, _ = step(state, b3)
  chex.assert_tree_all_finite(state.params)
  chex.assert_trees_all_equal(jax.device_get(state.params), jax.device_get(clean.params))
  chex.assert_trees_all_equal(optax.tree_utils.tree_get(jax.device_get(state.opt_state), 'mu'),
                              optax.tree_utils.tree_get(jax.device_get(clean.opt_state), 'mu'))


def test_nan_batches_skipped_counted_and_logged(tmp_path, hook_batches):
  bad = {3, 10, 11}
  hook_batches(lambda step, batch: nan_features(batch) if step in bad else batch)
  config = make_config(**{'train.num_epochs': 2})
  loop.train_and_evaluate(config, str(tmp_path))
  records = {r['step']: r for r in history(tmp_path) if r['kind'] == 'train'}
  # Skipped steps are logged whatever log_every_steps says, with the running count.
  assert {s: records[s]['nonfinite_steps'] for s in sorted(bad)} == {3: 1, 10: 2, 11: 3}
  assert records[16]['nonfinite_steps'] == 3
  _, state = final_state(config, tmp_path)
  chex.assert_tree_all_finite(state.params)
  with Checkpointer(tmp_path / 'checkpoints') as ckpt:
    _, extra = ckpt.restore(16, jax.eval_shape(lambda: state))
  assert extra['nonfinite'] == {'consecutive': 0, 'total': 3}


def test_too_many_consecutive_nonfinite_steps_stop_with_last_good_checkpoint(tmp_path,
                                                                             hook_batches):
  hook_batches(lambda step, batch: nan_features(batch) if step >= 5 else batch)
  config = make_config(**{'train.max_consecutive_nonfinite': 2})
  with pytest.raises(faults.NonFiniteError, match=r'^step 6: 2 consecutive steps .*'
                     r'train\.max_consecutive_nonfinite=2'):
    loop.train_and_evaluate(config, str(tmp_path))
  step, state = final_state(config, tmp_path)
  assert step == 3   # every_steps=3: step 6 was not saved, its NaN count stopped the run first
  chex.assert_tree_all_finite(state.params)


# ------------------------------------------------------------------ signals, exact resume
@pytest.mark.parametrize('signal_step', [11, 8])
def test_sigterm_saves_current_step_and_resume_is_exact(tmp_path, hook_batches, reference,
                                                        signal_step):
  """SIGTERM while step `signal_step` runs: that step finishes, is checkpointed (step 11 mid-epoch
  with the data position; step 8, an epoch's last, after its evaluation) and Preempted is raised.
  The resumed run ends bit-identical to the uninterrupted one."""
  def hook(step, batch):
    if step == signal_step:
      signal.raise_signal(signal.SIGTERM)
    return batch
  hook_batches(hook)
  config = make_config(**{'checkpoint.every_steps': 0})  # only the signal saves mid-epoch
  workdir = str(tmp_path)
  with pytest.raises(faults.Preempted, match=rf'^SIGTERM: stopped after step {signal_step};') as e:
    loop.train_and_evaluate(config, workdir)
  assert e.value.step == signal_step
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # handlers restored
  with Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    assert ckpt.latest_step() == signal_step
    tx, _ = state_lib.make_optimizer(specs.optimizer_spec(config), STEPS_PER_EPOCH)
    _, extra = ckpt.restore(signal_step,
                            state_lib.abstract_train_state(specs.model_spec(config), tx))
  assert (extra['epoch'], extra['epoch_step']) == divmod(signal_step, STEPS_PER_EPOCH)
  hook_batches(lambda step, batch: batch)
  loop.train_and_evaluate(config, workdir)
  assert_same_run(config, workdir, reference[1])


def test_second_sigint_during_the_save_does_not_lose_it(tmp_path, hook_batches, reference,
                                                        monkeypatch):
  """SIGINT at step 11, and again while that step's checkpoint is written (inside Orbax's save,
  as it takes the data position): the save completes and the run stops as for one SIGINT; the
  resumed run is the uninterrupted one."""
  def hook(step, batch):
    if step == 11:
      signal.raise_signal(signal.SIGINT)
    return batch
  hook_batches(hook)
  taken = []
  real_get_state = HookedBatches.get_state

  def get_state(self):   # called by the checkpoint save only
    if not taken:
      taken.append(True)
      signal.raise_signal(signal.SIGINT)
    return real_get_state(self)
  monkeypatch.setattr(HookedBatches, 'get_state', get_state)
  config = make_config(**{'checkpoint.every_steps': 0})  # only the signal saves mid-epoch
  workdir = str(tmp_path)
  try:
    with pytest.raises(faults.Preempted, match=r'^SIGINT: stopped after step 11;'):
      loop.train_and_evaluate(config, workdir)
  except KeyboardInterrupt:   # would end the whole pytest session
    pytest.fail('the second SIGINT interrupted the save')
  assert taken and checkpoint_dirs(workdir) == ([8, 11], [])
  hook_batches(lambda step, batch: batch)
  loop.train_and_evaluate(config, workdir)
  assert_same_run(config, workdir, reference[1])


def test_third_sigint_abandons_the_save():
  with faults.StopSignals() as stop:
    signal.raise_signal(signal.SIGINT)
    with stop.saving():
      signal.raise_signal(signal.SIGINT)   # waits for the save
      with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert stop.requested == 'SIGINT'


INTERRUPTED = """
import signal, sys
from absl import app
from phase1_jax import config_validation, train
from phase1_jax.training import faults, loop

def interrupted_twice(config, workdir, **kwargs):   # Ctrl-C twice while training, outside a save
  with faults.StopSignals():
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGINT)
loop.train_and_evaluate = interrupted_twice   # train.main imports it when it runs
sys.argv = ['train', '--config', 'configs/tiny.py']
app.run(train.main, flags_parser=config_validation.parse_flags)
"""


def test_cli_second_sigint_outside_a_save_is_one_line():
  proc = subprocess.run([sys.executable, '-c', INTERRUPTED], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == faults.INTERRUPTED_EXIT_CODE == 130, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      'interrupted: stopped without saving; the last committed checkpoint is kept. Run the same '
      'command again to resume from it.']


# ------------------------------------------------------------------ incompatible or bad input
@pytest.mark.parametrize('field,value', [('model.num_layers', 3), ('model.d_model', 64),
                                         ('model.vocab_size', 400)])
def test_incompatible_checkpoint_is_named(reference, field, value):
  """num_layers=3 has the same parameter shapes (one unique block, scanned): only the config saved
  in the checkpoint can tell. Resume and evaluate both refuse, naming path and field."""
  _, workdir = reference
  config = make_config(**{field: value})
  with pytest.raises(CheckpointMismatchError, match=rf'{workdir}/checkpoints/\d+: checkpoint was '
                     rf'trained with {field}=\d+ but the config has {field}={value}$'):
    loop.train_and_evaluate(config, workdir)
  with pytest.raises(CheckpointMismatchError, match=field):
    evaluation.evaluate_checkpoint(specs.run_spec(config), workdir)


def test_unwritable_workdir_fails_before_anything(tmp_path):
  (tmp_path / 'file').write_text('not a directory')
  with pytest.raises(faults.WorkdirError, match=rf'^{tmp_path}/file/run: workdir is not writable'):
    loop.train_and_evaluate(make_config(), str(tmp_path / 'file' / 'run'))


def test_garbled_history_is_one_line_and_changes_nothing(tmp_path, reference):
  """A finished run's history garbled: resume stops before compiling, with one line naming the
  file; the file and the checkpoints stay as they were."""
  workdir = tmp_path / 'run'
  shutil.copytree(os.path.join(reference[1], 'checkpoints'), workdir / 'checkpoints')
  (workdir / 'training_history.json').write_text('[{"kind": "train", "step": 2,')
  before = tree_digest(workdir)
  with open(tmp_path / 'log.txt', 'w') as log:
    started = time.monotonic()
    rc = start_cli(str(workdir), log).wait(timeout=300)
  lines = (tmp_path / 'log.txt').read_text().strip().splitlines()
  assert rc == 1 and time.monotonic() - started < 30, lines
  assert lines[-1].startswith(f'error: {workdir}/training_history.json: cannot read the training '
                              'history (not valid JSON: '), lines
  assert not [line for line in lines[:-1] if 'error' in line.lower()], lines
  assert tree_digest(workdir) == before


def tree_digest(directory):
  """{relative path: sha256} of every file under `directory`."""
  digests = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return digests


def test_cli_unwritable_workdir_is_one_line(tmp_path):
  (tmp_path / 'file').write_text('not a directory')
  with open(tmp_path / 'log.txt', 'w') as log:
    rc = start_cli(str(tmp_path / 'file' / 'run'), log).wait(timeout=300)
  lines = (tmp_path / 'log.txt').read_text().strip().splitlines()
  assert rc == 1 and lines[-1] == (f'error: {tmp_path}/file/run: workdir is not writable '
                                   '(Not a directory)'), lines


# ------------------------------------------------------------------------ kills (subprocesses)
def start_cli(workdir, log, ulimit_kb=None, **overrides):
  """`python -m phase1_jax.train` on the reference config (+ overrides), output to `log`; with
  `ulimit_kb`, under `ulimit -f`: a file growing past it fails to write with EFBIG."""
  # One device, as the in-process reference run has (the CLI would split a CPU host per core).
  overrides = {'parallel.cpu_devices': 1, **overrides}
  flags = [f'--config.{k}={v}' for k, v in {**OVERRIDES, **overrides}.items()]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'JAX_COMPILATION_CACHE_DIR': str(REPO / '.jax_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
  command = [sys.executable, '-m', 'phase1_jax.train', '--config', 'configs/tiny.py',
             '--workdir', workdir, *flags]
  if ulimit_kb:
    command = ['bash', '-c', f'trap "" XFSZ; ulimit -f {ulimit_kb}; exec "$@"', 'bash', *command]
    # No compilation-cache writes: JAX writes entries in place, and one cut short by the limit
    # would stay in the shared cache.
    env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = str(2**62)
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def checkpoint_dirs(workdir):
  """(committed steps, uncommitted step directories) in workdir/checkpoints."""
  try:
    names = os.listdir(os.path.join(workdir, 'checkpoints'))
  except FileNotFoundError:
    return [], []
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if 'tmp' in n]


def modified_since(workdir, name, started):
  try:
    return os.stat(os.path.join(workdir, 'checkpoints', name)).st_mtime >= started
  except FileNotFoundError:   # committed (renamed) meanwhile
    return False


def wait_for(proc, condition, timeout=240):
  """Polls `condition()` every few ms while `proc` runs; True when it held, False if proc ended."""
  deadline = time.monotonic() + timeout
  while proc.poll() is None:
    if condition():
      return True
    assert time.monotonic() < deadline, 'trainer made no progress'
    time.sleep(0.003)
  return False


@pytest.mark.slow
def test_sigkills_sigterm_and_a_truncated_checkpoint_then_the_same_run(tmp_path, reference):
  """10 SIGKILLs at random steps (some while an async save is being written), a SIGTERM, and a
  truncated newest checkpoint; the run that finishes is the uninterrupted one, bit for bit.
  Checkpoints every step (async, as by default), so each kill loses at most one step."""
  config, reference_dir = reference
  workdir, log_path = str(tmp_path / 'run'), tmp_path / 'log.txt'
  kill = {'checkpoint.every_steps': 1, 'checkpoint.async_save': True}
  rng = np.random.default_rng(20261126)   # fixed: the same kill plan every time
  killed_during_save, kills = 0, []
  with open(log_path, 'w') as log:
    for _ in range(10):
      started = time.time()
      proc = start_cli(workdir, log, **kill)
      target = (checkpoint_dirs(workdir)[0] or [0])[-1] + int(rng.integers(1, 3))
      during_save = rng.random() < 0.5

      def reached(target=target, during_save=during_save, started=started):
        committed, partial = checkpoint_dirs(workdir)
        if during_save:   # as soon as this process's save of the step after target is under way
          return any(int(n.split('.')[0]) > target and modified_since(workdir, n, started)
                     for n in partial)
        # Between saves, or one step later at the latest: the plan's 15 steps of progress then
        # cannot overrun the run's 24 and end it before its last kill.
        last = (committed or [0])[-1]
        return last >= target + 1 or (last >= target and not partial)
      assert wait_for(proc, reached), f'the run ended before its kill:\n{log_path.read_text()}'
      proc.send_signal(signal.SIGKILL)
      assert proc.wait() == -signal.SIGKILL
      committed, partial = checkpoint_dirs(workdir)
      kills.append(f'{committed[-1] if committed else 0}{"+save" if partial else ""}')
      killed_during_save += bool(partial)

    proc = start_cli(workdir, log, **kill)
    start = (checkpoint_dirs(workdir)[0] or [0])[-1]
    assert wait_for(proc, lambda: (checkpoint_dirs(workdir)[0] or [0])[-1] >= start + 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == faults.PREEMPTED_EXIT_CODE
  last = log_path.read_text().strip().splitlines()[-1]
  assert last.startswith('preempted: SIGTERM: stopped after step '), last
  stopped_at = int(last.split('after step ')[1].split(';')[0])
  committed, partial = checkpoint_dirs(workdir)
  assert committed[-1] == stopped_at and not partial   # waited for the async commit

  # Truncate the newest checkpoint's array data: the restart falls back to the step before.
  data_dir = os.path.join(workdir, 'checkpoints', str(stopped_at), 'state', 'd')
  victim = max((os.path.join(data_dir, f) for f in os.listdir(data_dir)), key=os.path.getsize)
  with open(victim, 'r+b') as f:
    f.truncate(os.path.getsize(victim) // 2)
  with open(log_path, 'w') as log:
    proc = start_cli(workdir, log, **kill)
    assert proc.wait(timeout=600) == 0, log_path.read_text()
  out = log_path.read_text()
  assert f'checkpoints/{stopped_at}: cannot restore step {stopped_at}' in out, out
  assert f'Restored older checkpoint step {committed[-2]}' in out, out
  assert not checkpoint_dirs(workdir)[1]   # uncommitted saves were cleaned up
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', f'{stopped_at}.unreadable'))
  print(f'SIGKILLs after committed steps {kills} (+save: an uncommitted save was left)')
  assert killed_during_save >= 1
  assert_same_run(config, workdir, reference_dir)


def test_cli_log_file_size_limit_is_one_line_and_resume_is_exact(tmp_path, reference):
  """Under `ulimit -f 480` the TensorBoard event file hits the limit at the last epoch's
  histograms (EFBIG; the checkpoints' files are smaller). tensorboardX's writer thread died there
  and left the trainer blocked forever; now it stops at once with one line naming the file. The
  committed checkpoints and the history stay, and the resumed run is the uninterrupted one."""
  config, reference_dir = reference
  workdir, log_path = str(tmp_path / 'run'), tmp_path / 'log.txt'
  with open(log_path, 'w') as log:
    rc = start_cli(workdir, log, ulimit_kb=480).wait(timeout=300)
  ended = time.time()
  out = log_path.read_text()
  (events,) = os.listdir(os.path.join(workdir, 'tensorboard'))
  events = os.path.join(workdir, 'tensorboard', events)
  error = f'error: {events}: cannot write TensorBoard events (File too large)'
  assert rc == 1 and out.strip().splitlines()[-1] == error, out[-3000:]
  assert 'Traceback' not in out, out[-3000:]
  assert [line for line in out.splitlines() if line.startswith('error:')] == [error]
  assert ended - os.path.getmtime(events) < 10   # cut back to whole records when it failed
  committed, partial = checkpoint_dirs(workdir)
  assert committed[-1] == TOTAL_STEPS - 3 and not partial, (committed, partial)
  steps = [r['step'] for r in history(workdir)]
  assert steps[-1] == TOTAL_STEPS and sorted(steps) == steps   # written up to the failure
  loop.train_and_evaluate(config, workdir)
  assert_same_run(config, workdir, reference_dir)
