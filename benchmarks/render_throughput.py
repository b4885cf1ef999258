"""Rendering throughput: pages/s of render.render_pages, failures, and peak memory.

  python benchmarks/render_throughput.py --html_dir /usr/share/doc [--limit 100] [--workers 2]
      [--browser /usr/bin/chromium] [--javascript]

Renders the first --limit .html/.htm files under --html_dir (sorted paths) with the default
RenderSpec. pages/s counts every page, failed ones included, over the wall time from the call
to the last result (so it includes starting the workers and their browsers); the steady rate
leaves out the time to the first result. Memory is sampled
from /proc every 0.2 s (Linux only): peak RSS (VmHWM) of this process and of each worker
process, and the peak PSS summed over each worker's process tree (worker + Playwright driver +
Chromium processes: PSS shares pages between processes instead of counting them in each).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE)]
from phase1_jax.data import render, render_pool  # noqa: E402


def html_files(html_dir: str, limit: int) -> list[str]:
  """The first `limit` .html/.htm paths under html_dir, relative and sorted."""
  found = []
  for folder, dirs, files in os.walk(html_dir):
    dirs.sort()
    found += [os.path.relpath(os.path.join(folder, name), html_dir) for name in sorted(files)
              if name.endswith(('.html', '.htm'))]
  return found[:limit]


def _status_kib(pid: int, field: str) -> int:
  with open(f'/proc/{pid}/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def _pss_kib(pid: int) -> int:
  with open(f'/proc/{pid}/smaps_rollup') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('Pss:'))


def _process_tree() -> dict[int, list[int]]:
  children: dict[int, list[int]] = {}
  for name in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{name}/stat') as f:
        children.setdefault(int(f.read().rsplit(')', 1)[1].split()[1]), []).append(int(name))
    except (OSError, IndexError, ValueError):
      pass
  return children


def _role(pid: int) -> str:
  """What a child process is: a render worker, the Playwright driver (with the browser below
  it, when workers=1), multiprocessing's resource tracker, or its command's name."""
  with open(f'/proc/{pid}/cmdline', 'rb') as f:
    args = f.read().decode(errors='replace')
  for needle, role in (('spawn_main', 'render worker'), ('resource_tracker', 'resource tracker'),
                       ('playwright', 'Playwright driver + browser')):
    if needle in args:
      return role
  return os.path.basename(args.split('\0')[0])


class MemorySampler(threading.Thread):
  """Peak VmHWM of each child of this process, and peak PSS summed over each child's tree."""

  def __init__(self, period_s: float = 0.2):
    super().__init__(daemon=True)
    self.period_s, self.stop = period_s, threading.Event()
    self.hwm_kib: dict[int, int] = {}
    self.tree_pss_kib: dict[int, int] = {}
    self.names: dict[int, str] = {}

  def sample(self) -> None:
    children = _process_tree()
    for child in children.get(os.getpid(), []):
      try:
        self.hwm_kib[child] = max(self.hwm_kib.get(child, 0), _status_kib(child, 'VmHWM'))
        self.names.setdefault(child, _role(child))
      except (OSError, StopIteration):
        continue
      total, todo = 0, [child]
      while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
          total += _pss_kib(pid)
        except (OSError, StopIteration):
          pass
      self.tree_pss_kib[child] = max(self.tree_pss_kib.get(child, 0), total)

  def run(self) -> None:
    while not self.stop.wait(self.period_s):
      self.sample()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--html_dir', '--html-dir', required=True)
  parser.add_argument('--limit', type=int, default=100)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--browser', default=None)
  parser.add_argument('--javascript', action='store_true')
  args = parser.parse_args()
  if not os.path.isdir(args.html_dir):
    sys.exit(f'--html_dir {args.html_dir}: not a folder')
  paths = html_files(args.html_dir, args.limit)
  if not paths:
    sys.exit(f'--html_dir {args.html_dir}: no .html files')
  spec = render.RenderSpec(browser=args.browser, javascript=args.javascript)
  try:
    render.check_available(spec)
  except render.RenderUnavailable as e:
    sys.exit(str(e))
  sampler = MemorySampler()
  sampler.start()
  start = time.perf_counter()
  failures, heights, first_s = {}, [], None
  for rel_path, page in render_pool.render_pages(args.html_dir, paths, spec, workers=args.workers):
    first_s = first_s or time.perf_counter() - start
    if isinstance(page, str):
      failures[rel_path] = page
    else:
      heights.append(page.height)
  seconds = time.perf_counter() - start
  sampler.stop.set()
  sampler.join()
  mib = lambda kib: f'{kib / 1024:.0f} MiB'
  steady = (len(paths) - 1) / max(1e-9, seconds - first_s)
  print(f'{len(paths)} pages, workers={args.workers}: {seconds:.1f} s, '
        f'{len(paths) / seconds:.2f} pages/s ({steady:.2f} pages/s after the first result, '
        f'at {first_s:.1f} s), {len(failures)} failed, '
        f'mean height {sum(heights) / max(1, len(heights)):.0f} px')
  for rel_path, reason in failures.items():
    print(f'  failed {rel_path}: {reason}')
  print(f'peak RSS: main {mib(_status_kib(os.getpid(), "VmHWM"))}')
  for pid, kib in sorted(sampler.hwm_kib.items()):
    print(f'  child {pid} ({sampler.names.get(pid, "?")}): peak RSS {mib(kib)}, peak PSS of '
          f'its process tree {mib(sampler.tree_pss_kib.get(pid, 0))}')


if __name__ == '__main__':
  main()
