"""Render many pages: in this process, or in worker processes that each own one browser.

render_pages yields (path, result) in input order. A `convert` function runs where the page was
rendered, so the work after rendering (parsing the DOM, cutting the screenshot into patches)
spreads over the workers too, and only its result crosses the process boundary.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
from typing import Callable, Iterable, Iterator

from phase1_jax.data.render import Renderer, RenderError, RenderSpec, check_available


def _identity(rel_path, page):
  del rel_path
  return page


def render_pages(html_dir: str, rel_paths: Iterable[str], spec: RenderSpec, *, workers: int,
                 convert: Callable = _identity) -> Iterator[tuple[str, object]]:
  """(rel_path, convert(rel_path, page) or the failure reason) for each path, in input order.
  `convert` must be picklable (a module-level function, or a functools.partial of one).

  workers > 1: that many 'spawn' worker processes (fork is unsafe with jax's threads), one
  browser each; the calling script needs an `if __name__ == '__main__':` guard. Closing the
  generator, or an exception or Ctrl-C in the consumer, stops the workers and their browsers.
  """
  if workers < 1:
    raise ValueError(f'--workers must be >= 1, got {workers}')
  if workers > 1:
    yield from _render_in_pool(html_dir, rel_paths, spec, workers, convert)
    return
  with Renderer(html_dir, spec) as renderer:
    for rel_path in rel_paths:
      yield rel_path, _render_one(renderer, rel_path, convert)


def _render_one(renderer: Renderer, rel_path: str, convert: Callable):
  try:
    page = renderer.render(rel_path)
  except RenderError as e:
    return str(e)
  return convert(rel_path, page)


_WORKER_RENDERER: Renderer | None = None
_WORKER_CONVERT: Callable = _identity


def _worker_start(html_dir: str, spec: RenderSpec, convert: Callable) -> None:
  """Pool initializer: the parent handles Ctrl-C; the browser closes when the worker exits,
  and the worker exits when its parent dies (killed, say: the pool's queues would wait)."""
  global _WORKER_RENDERER, _WORKER_CONVERT
  _WORKER_CONVERT = convert
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
  _WORKER_RENDERER = Renderer(html_dir, spec)
  _WORKER_RENDERER.start()
  multiprocessing.util.Finalize(_WORKER_RENDERER, _WORKER_RENDERER.close, exitpriority=10)


def _exit_with_parent(parent_pid: int) -> None:
  while os.getppid() == parent_pid:
    time.sleep(1.0)
  os._exit(1)  # the Playwright driver sees its pipe close and closes the browser


def _worker_render(rel_path: str):
  return _render_one(_WORKER_RENDERER, rel_path, _WORKER_CONVERT)


def _stop_pool(pool: concurrent.futures.ProcessPoolExecutor, *, graceful: bool) -> None:
  """Stop the workers, each with its browser, in bounded time. graceful: each worker exits and
  closes its browser itself. Else (and after 30 s) SIGTERM: the worker's Playwright driver sees
  its pipe close and closes the browser."""
  processes = list((getattr(pool, '_processes', None) or {}).values())
  pool.shutdown(wait=False, cancel_futures=True)
  for process in processes:
    process.join(timeout=30 if graceful else 0)
    if process.is_alive():
      process.terminate()
      process.join(timeout=30)


def _render_in_pool(html_dir: str, rel_paths: Iterable[str], spec: RenderSpec, workers: int,
                    convert: Callable) -> Iterator[tuple[str, object]]:
  """Keeps 4 pages per worker in flight, drawing paths from `rel_paths` only as pages finish (so
  it may be a stream that another thread fills while the first pages render)."""
  if not os.path.isdir(html_dir):
    raise ValueError(f'html_dir {html_dir}: not a folder')
  spec = dataclasses.replace(spec, browser=check_available(spec))  # resolved once, here
  start = lambda: concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn'), initializer=_worker_start,
      initargs=(html_dir, spec, convert))
  paths = iter(rel_paths)
  pool, pending, deaths = start(), collections.deque(), 0   # pending: (path, future), in order
  graceful = False
  try:
    while True:
      while len(pending) < 4 * workers and (path := next(paths, None)) is not None:
        pending.append((path, pool.submit(_worker_render, path)))
      if not pending:
        break
      rel_path, future = pending.popleft()
      try:
        result, deaths = future.result(), 0
      except concurrent.futures.process.BrokenProcessPool:
        deaths += 1  # this page is the likeliest culprit; the others are sent again
        if deaths >= 3:
          raise RuntimeError('render workers died 3 times in a row (out of memory?)') from None
        result = 'worker process died'
        _stop_pool(pool, graceful=False)
        pool = start()
        pending = collections.deque((p, pool.submit(_worker_render, p)) for p, _ in pending)
      yield rel_path, result
    graceful = True
  finally:
    _stop_pool(pool, graceful=graceful)
