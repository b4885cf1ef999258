"""Process setup on the host, done once before JAX starts its backends (`prepare`, and
`initialize_distributed` for a multi-process run).

- CPU devices: `configure_cpu_devices` splits a CPU host into `config.parallel.cpu_devices`
  devices, by default one per core: data parallelism over per-core devices beat one device using
  all cores through XLA's intra-op threads (measured on 2 cores: docs/performance.md).
- Host memory: `keep_freed_memory` makes glibc's malloc keep the memory XLA:CPU frees at the end
  of a step for the next step (`config.parallel.keep_freed_host_memory`; by default only where
  JAX will run on the CPU, `keeps_freed_memory`).
"""
from __future__ import annotations

import ctypes
import dataclasses
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

import jax

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


@dataclasses.dataclass(frozen=True)
class HostSpec:
  """config.parallel's host fields: CPU devices to split into (0: auto), whether to keep freed
  memory (None: auto), and the global batch and process count the auto device count divides."""
  batch_size: int
  cpu_devices: int = 0
  keep_freed_host_memory: bool | None = None
  num_processes: int = 1


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """config.parallel's process fields: mode 'off' (one process), 'auto' (JAX finds the cluster)
  or 'manual' (the coordinator, process count and this process's index given)."""
  mode: str = 'off'
  coordinator_address: str = ''
  num_processes: int = 1
  process_id: int = 0


def initialize_distributed(spec: DistributedSpec) -> None:
  """`jax.distributed.initialize` when the run has several processes. 'auto' lets JAX find the
  cluster (TPU pods, SLURM, Open MPI); an explicit coordinator serves GPU clusters and the local
  multi-process test. Must run before anything touches a device."""
  if spec.mode == 'off':
    return
  if spec.mode == 'auto':
    jax.distributed.initialize()
    return
  jax.distributed.initialize(coordinator_address=spec.coordinator_address,
                             num_processes=spec.num_processes, process_id=spec.process_id)


def prepare(spec: HostSpec, split_cpu: bool = True) -> int | None:
  """The train CLI's host setup: `keep_freed_memory` (if configured), then (with `split_cpu`)
  `configure_cpu_devices`. Returns the CPU device count set, or None.

  The evaluate and generate CLIs do without it: they run one device, and evaluation is mostly
  compiles, which the malloc setting slows (measurements: docs/performance.md)."""
  if keeps_freed_memory(spec):
    keep_freed_memory()
  return configure_cpu_devices(spec) if split_cpu else None


def keeps_freed_memory(spec: HostSpec) -> bool:
  """`parallel.keep_freed_host_memory`, or (None, the default) whether JAX will run on the CPU.

  Why not on a GPU/TPU host: there the step's buffers live on the device, and one malloc arena
  serializes the host threads of XLA's parallel compilation and autotuning, which made compiles
  several times slower on a GPU host (measurements: docs/performance.md).
  """
  value = spec.keep_freed_host_memory
  return (not expects_accelerator()) if value is None else bool(value)


def expects_accelerator(platforms: str | None = None) -> bool:
  """Whether JAX will start on a GPU/TPU, told without starting a backend: `platforms` (default
  jax_platforms, from JAX_PLATFORMS) names another platform first; or, when that is unset, an
  accelerator plugin is installed (a jax_plugins module or entry point, as jax[cuda] installs,
  or libtpu). A plugin without its device answers True although JAX then falls back to the CPU.
  """
  platforms = jax.config.jax_platforms if platforms is None else platforms
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  if importlib.util.find_spec('libtpu') is not None:
    return True
  if importlib.metadata.entry_points(group='jax_plugins'):
    return True
  try:
    import jax_plugins
  except ImportError:
    return False
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def cpu_device_count(spec: HostSpec, cores: int) -> int:
  """CPU devices for this host: `parallel.cpu_devices`, or (0) the most devices up to `cores`
  that the per-process batch splits evenly over."""
  if spec.cpu_devices:
    return spec.cpu_devices
  local_batch = spec.batch_size // max(spec.num_processes, 1)
  return max(d for d in range(1, cores + 1) if local_batch % d == 0)


def configure_cpu_devices(spec: HostSpec) -> int | None:
  """Splits a CPU host into `cpu_device_count` devices (jax_num_cpu_devices): on CPU, data
  parallelism over one device per core runs the train step faster than one device whose ops
  each spread over all cores. Only affects the CPU backend; must run before JAX initializes its
  backends. Leaves the devices alone (returns None) when XLA_FLAGS already forces a host device
  count, or when the backends are already up (a notebook, a test)."""
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return None
  count = cpu_device_count(spec, len(os.sched_getaffinity(0)))
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:   # backends already initialized: keep their devices
    return None
  return count


def keep_freed_memory() -> bool:
  """Serves every allocation of this process from glibc's main heap and never returns freed heap
  memory to the OS (mallopt: one arena, no mmap, no trimming). Returns whether it applied: False
  off Linux/glibc (macOS, musl), where it does nothing.

  Why: XLA:CPU allocates a step's buffers (hundreds of MiB) with malloc and frees them when the
  step ends. glibc serves allocations that large with a fresh mmap and hands them back with
  munmap, so every step faults its whole working set in again, page by page, zero-filled by the
  kernel. Kept in the heap, the same pages serve every step: no faults, and a faster step
  (measurements: docs/performance.md). The cost: the process holds on to its peak heap instead of
  returning it between steps.

  Must run before JAX starts its backends: a thread keeps the malloc arena of its first
  allocation, and XLA's worker threads would otherwise get arenas of their own, which map large
  blocks regardless of these settings.
  """
  if not sys.platform.startswith('linux'):
    return False
  libc = ctypes.CDLL(None)
  if not hasattr(libc, 'gnu_get_libc_version') or not hasattr(libc, 'mallopt'):
    return False   # not glibc
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)
