"""Host setup before JAX starts: per-core CPU devices and glibc malloc (training/host.py)."""
import os
import subprocess
import sys

import pytest

from phase1_jax import config as config_lib
from phase1_jax import specs
from phase1_jax.training import host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGHT = '--xla_force_host_platform_device_count=8'


@pytest.mark.parametrize('cpu_devices, batch, cores, want', [
    (0, 32, 2, 2), (0, 32, 12, 8), (0, 9, 2, 1), (0, 12, 8, 6), (3, 32, 2, 3), (1, 32, 8, 1)])
def test_cpu_device_count(cpu_devices, batch, cores, want):
  """0: the most devices up to the core count that the batch divides by; else as configured."""
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py'))
  config.parallel.cpu_devices, config.train.batch_size = cpu_devices, batch
  assert host.cpu_device_count(specs.host_spec(config), cores) == want


_CONFIGURE = """
import jax, sys
from phase1_jax import config as config_lib
from phase1_jax import specs
from phase1_jax.training import host
config = config_lib.load_file('configs/tiny.py')
config.parallel.cpu_devices = 3
first = host.configure_cpu_devices(specs.host_spec(config))
count = jax.device_count()
config.parallel.cpu_devices = 2
again = host.configure_cpu_devices(specs.host_spec(config))
print('RESULT', first, count, again, jax.device_count())
"""


@pytest.mark.parametrize('xla_flags, want', [('', 'RESULT 3 3 None 3'),
                                                (EIGHT, 'RESULT None 8 None 8')])
def test_configure_cpu_devices_before_jax_starts(xla_flags, want):
  """Splits the CPU host as configured, unless XLA_FLAGS already forces a device count; once
  the backend is up it changes nothing."""
  env = {**os.environ, 'XLA_FLAGS': xla_flags, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-c', _CONFIGURE], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1].startswith(want), proc.stdout


# A jitted function whose 64 MiB result glibc would serve with a fresh mmap on every call.
_FAULTS = """
import resource, statistics, sys
from phase1_jax.training import host
kept = host.keep_freed_memory() if sys.argv[1] == 'keep' else None
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cumsum(x) * 2.0)
x = jax.random.normal(jax.random.key(0), (16 * 2**20,))
faults = []
for _ in range(25):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print('RESULT', kept, int(statistics.median(faults[10:])))
"""


def _faults_per_call(mode):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-c', _FAULTS, mode], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  _, kept, faults = proc.stdout.strip().splitlines()[-1].split()
  return kept, int(faults)


def _transparent_huge_pages_always():
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return '[always]' in f.read()
  except OSError:
    return False


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_keep_freed_memory_stops_refaulting_buffers():
  """Called before JAX starts, the memory of a freed 64 MiB result serves the next call: no
  page faults per call after warm-up (median of 15 calls after 10; the heap still grows now and
  then while its free blocks settle: a CI run once saw 8,192 faults per call, half the result,
  in the median of 10 calls after 5), where glibc's defaults fault every 4 KiB page in again."""
  kept, faults = _faults_per_call('keep')
  assert kept == 'True'
  assert faults < 1000, faults
  if not _transparent_huge_pages_always():   # else the defaults fault 2 MiB pages: far fewer
    _, default_faults = _faults_per_call('default')
    assert default_faults > 10_000, default_faults


@pytest.mark.parametrize('platforms, want', [('cpu', False), ('cuda', True), ('tpu,cpu', True),
                                             ('cpu,cuda', False)])
def test_expects_accelerator_from_platforms(platforms, want):
  assert host.expects_accelerator(platforms) is want


def test_expects_accelerator_from_installed_plugins(monkeypatch):
  """Unset platforms: this CPU-only environment has no accelerator plugin; an entry point in the
  jax_plugins group (as jax[cuda] installs) means one."""
  assert host.expects_accelerator('') is False
  monkeypatch.setattr(host.importlib.metadata, 'entry_points',
                      lambda group: ['cuda'] if group == 'jax_plugins' else [])
  assert host.expects_accelerator('') is True


@pytest.mark.parametrize('value, accelerator, want', [
    (None, False, True), (None, True, False), (True, True, True), (False, False, False)])
def test_keeps_freed_memory_auto_by_platform(monkeypatch, value, accelerator, want):
  config = config_lib.load_file(os.path.join(REPO, 'configs', 'tiny.py'))
  config.parallel.keep_freed_host_memory = value
  monkeypatch.setattr(host, 'expects_accelerator', lambda: accelerator)
  assert host.keeps_freed_memory(specs.host_spec(config)) is want
