"""Data-parallel and sharded training on 8 forced CPU devices (in a subprocess: the device count
is fixed when JAX starts), and a two-process run through jax.distributed."""
import json
import os
import socket
import subprocess
import sys

import pytest

from phase1_jax import config as config_lib
from phase1_jax import specs
from phase1_jax.training import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGHT = '--xla_force_host_platform_device_count=8'


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  env = {**os.environ, 'XLA_FLAGS': EIGHT, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'parallel_worker.py'), 'all',
                         str(tmp_path_factory.mktemp('ckpt'))], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT '))
  return json.loads(line[len('RESULT '):])


@pytest.mark.parametrize('layout', ['pmap', 'jit_fsdp1', 'jit_fsdp2'])
def test_every_layout_trains_like_one_device(eight_devices, layout):
  """3 steps from the same init and data (pages of different lengths, so devices hold different
  token counts; uncertainty weighting): the same losses and parameters as one device."""
  r = eight_devices['equivalence']
  assert r['devices'] == 8
  got = r[layout]
  assert got['step'] == 3
  for a, b in zip(got['losses'], r['reference_losses'], strict=True):
    assert abs(a - b) <= 1e-5 * abs(b)
  # Parameters moved by ~1e-2; they agree to float32 noise. The key biases, whose gradient is
  # exactly zero in exact arithmetic (softmax is shift-invariant), are compared through what the
  # model computes: the logits.
  assert got['moved'] > 1e-3
  assert got['max_param_diff'] < 2e-5, got
  assert got['logits_diff'] < 5e-5, got


def test_shardings_follow_the_config(eight_devices):
  r = eight_devices['equivalence']
  assert r['jit_fsdp1']['mesh'] == {'data': 8, 'fsdp': 1}
  assert r['jit_fsdp1']['embedding_spec'] == 'P()'          # replicated
  assert r['jit_fsdp2']['mesh'] == {'data': 4, 'fsdp': 2}
  # The [320, 32] embedding is split along its largest axis over the 2 fsdp devices.
  assert r['jit_fsdp2']['embedding_spec'] == "P('fsdp', None)"
  assert r['jit_fsdp2']['embedding_shard_shape'] == [160, 32]
  assert r['jit_fsdp2']['batch_spec'] == "P(('data', 'fsdp'),)"


def test_checkpoint_from_8_devices_restores_on_1_and_on_4x2(eight_devices):
  r = eight_devices['checkpoint']
  assert r['one_device_step'] == 2
  want = r['uninterrupted'][0]
  assert abs(r['one_device'][0] - want) <= 1e-5 * want
  assert abs(r['mesh_4x2'][0] - want) <= 1e-5 * want
  assert r['mesh_4x2_embedding_spec'] == "P('fsdp', None)"


def test_bad_layouts_are_one_line_config_errors(eight_devices):
  r = eight_devices['errors']
  assert r['batch'] == ('config.train.batch_size=12: must be divisible by the data-parallel size '
                        'data x fsdp = 8')
  assert r['mesh'] == ('config.parallel.data=16: mesh data x fsdp = 16 x 1 needs 16 devices, '
                       '8 present')
  assert r['pmap_fsdp'].startswith('config.parallel.fsdp=2: pmap replicates the state')


def test_eval_batch_the_mesh_cannot_split_is_one_line_error(eight_devices):
  """From DataParallel, and from load_trained before it looks for a checkpoint."""
  r = eight_devices['errors']
  want = ('config.eval.batch_size=12: must be divisible by the data-parallel size data x fsdp = '
          '2 x 4 = 8 (evaluation splits each batch over the mesh: e.g. 8 or 16)')
  assert r['eval_batch'] == want
  assert r['eval_batch_load'] == want


def test_fsdp_checkpoint_evaluates_on_its_mesh_like_one_device(eight_devices):
  """A checkpoint trained with fsdp=4 (data=2), evaluated by load_trained + Evaluator on that
  mesh with the params still split, scores as on a 1 x 1 mesh and on the plain one-device
  path: losses to float noise, the decoded BLEU and every F1 / accuracy exactly."""
  r = eight_devices['evaluation']
  assert r['mesh'] == {'data': 2, 'fsdp': 4} and r['step'] == 3
  sharding = r['sharding']
  assert sharding['embedding_spec'] == "P('fsdp', None)"
  assert sharding['embedding_shape'] == [320, 32]
  assert sharding['embedding_shard_shape'] == [80, 32]   # each device holds a quarter
  assert sharding['split_leaves'] > sharding['leaves'] // 2
  metrics = r['metrics']['mesh_2x4']
  assert metrics['generated_pages'] == 8 and 'bleu' in metrics and 'val_loss' in metrics
  for name in ('mesh_1x1', 'one_device'):
    diffs = r[f'{name}_diffs']
    assert diffs['loss_rel'] <= 1e-5, diffs
    assert diffs['other_abs'] <= 1e-6, diffs


def test_mesh_larger_than_devices_in_process():
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py'))
  config.parallel.data = 2
  with pytest.raises(config_lib.ConfigError, match=r'config\.parallel\.data=2: .* 1 present'):
    parallel.DataParallel(specs.mesh_spec(config))


def test_fsdp_larger_than_the_devices_says_what_fits():
  """fsdp > devices made the data axis 0 (ZeroDivisionError); now one line before compiling."""
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py'))
  config.parallel.fsdp = 8
  n = parallel.jax.device_count()
  with pytest.raises(config_lib.ConfigError, match=rf'^config\.parallel\.fsdp=8: the mesh needs 8 '
                     rf'devices, {n} present \(fsdp 1 (or .*)?fits; on a CPU host, '
                     r'--config\.parallel\.cpu_devices=8'):
    parallel.DataParallel(specs.mesh_spec(config))


def test_fsdp_spec_picks_the_largest_divisible_axis():
  assert parallel.fsdp_spec((64, 128), 2) == parallel.P(None, 'fsdp')
  assert parallel.fsdp_spec((6, 5), 4) == parallel.P()             # nothing divisible: replicate
  assert parallel.fsdp_spec((12, 8), 4) == parallel.P('fsdp', None)
  assert parallel.fsdp_spec((3,), 1) == parallel.P()
  assert parallel.fsdp_spec((), 2) == parallel.P()


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_checkpoint(tmp_path):
  """jax.distributed with a localhost coordinator, 2 processes x 4 CPU devices: the trainer
  runs one epoch of the tiny config on the 8-device mesh, both processes exit 0, process 0
  writes the logs and JSON, and the checkpoint restores."""
  workdir = tmp_path / 'run'
  port = _free_port()
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': os.path.join(REPO, '.jax_cache')}
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'phase1_jax.train', '--config', 'configs/tiny.py',
       '--workdir', str(workdir), '--config.train.num_epochs=1',
       '--config.parallel.distributed=manual',
       f'--config.parallel.coordinator_address=localhost:{port}',
       '--config.parallel.num_processes=2', f'--config.parallel.process_id={i}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert ('(8 devices, jit over 8, 2 processes; float32 compute, layers unrolled, '
          'dense attention)') in outs[0][0]
  for line in ('Workdir:', 'Epoch 1/1', 'Best checkpoint'):   # only process 0 reports
    assert line in outs[0][0] and line not in outs[1][0], line
  history = json.load(open(workdir / 'training_history.json'))
  steps = [r['step'] for r in history if r['kind'] == 'train']
  assert steps == sorted(set(steps)) and history[-1]['step'] == 8   # 64 pages / batch 8
  assert os.path.isdir(workdir / 'checkpoints' / '8')
  results = json.load(open(workdir / 'evaluation_results.json'))
  assert results['checkpoint_step'] == 8
