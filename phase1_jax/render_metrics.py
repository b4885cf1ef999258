"""Markup strings -> rendered pages -> visual metrics: from data.render to visual_metrics.

Each markup is written to a temporary folder as NNNNN.html (a fragment is fine: a
`<!doctype html><meta charset=utf-8><body>` prefix puts it in standards mode with a fixed
encoding), rendered by render_pool.render_pages in worker processes with one RenderSpec (the same
viewport and width for generated and reference pages), and turned into visual_metrics.PageRender.
A page that fails to render (timeout, error) is a failed render (ok=False), never an exception.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from typing import Sequence

from phase1_jax import visual_metrics
from phase1_jax.data import patches, render, render_pool

PREFIX = '<!doctype html><meta charset=utf-8><body>'
_HAS_DOCUMENT = re.compile(r'\s*(<!doctype|<html)', re.IGNORECASE)


def page_source(markup: str) -> str:
  """The file written for one markup: the markup itself when it is a whole document, else the
  fragment behind PREFIX."""
  return markup if _HAS_DOCUMENT.match(markup) else PREFIX + markup


def _to_page_render(width: int, rel_path: str, page: render.RenderedPage):
  """render_pool convert (runs in the worker): a RenderedPage as a PageRender without its
  markup (the caller adds it), the PNG decoded where it was rendered."""
  del rel_path
  try:
    shot = patches.decode_png(page.png)
  except ValueError as e:
    return str(e)
  return visual_metrics.PageRender(ok=True, width=float(width), height=float(page.height),
                                   blocks=page.text_blocks, screenshot_HxWx3=shot)


class MarkupStream:
  """Markups rendered in worker processes as they are added: a background thread feeds
  render_pool.render_pages, so the caller goes on (decoding the next batch) meanwhile.
  `renders()` waits for every page; leaving the `with` block stops the workers (the pages in
  flight finish first, each bounded by the spec's timeout) and deletes the files."""

  def __init__(self, spec: render.RenderSpec, *, workers: int = 1):
    self.spec = spec
    self._dir = tempfile.mkdtemp(prefix='render_metrics_')
    self._paths: queue.SimpleQueue = queue.SimpleQueue()
    self._markups: list[str] = []
    self._results: dict[str, object] = {}
    self._error: BaseException | None = None
    self._closed = False
    self._thread = threading.Thread(target=self._render, args=(workers,), daemon=True,
                                    name='render-stream')
    self._thread.start()

  def _render(self, workers: int) -> None:
    convert = functools.partial(_to_page_render, self.spec.width)
    try:
      for rel, result in render_pool.render_pages(self._dir, iter(self._paths.get, None),
                                                  self.spec, workers=workers, convert=convert):
        self._results[rel] = result
    except BaseException as e:   # re-raised in the caller's thread by renders()
      self._error = e
      while self._paths.get() is not None:   # drain, so that _end never blocks
        pass

  def add(self, markups: Sequence[str]) -> None:
    """Queues `markups` for rendering, after those added before."""
    for markup in markups:
      rel = f'{len(self._markups):05d}.html'
      with open(os.path.join(self._dir, rel), 'w', encoding='utf-8') as f:
        f.write(page_source(markup))
      self._markups.append(markup)
      self._paths.put(rel)

  def _end(self) -> None:
    if not self._closed:
      self._closed = True
      self._paths.put(None)
    self._thread.join()

  def renders(self) -> list[visual_metrics.PageRender]:
    """One PageRender per markup added, in order (a page that failed to render: ok=False).
    No markup can be added after."""
    self._end()
    if self._error is not None:
      raise self._error
    out = []
    for i, markup in enumerate(self._markups):
      result = self._results.get(f'{i:05d}.html')
      out.append(dataclasses.replace(result, markup=markup)
                 if isinstance(result, visual_metrics.PageRender) else
                 visual_metrics.PageRender(ok=False, width=float(self.spec.width), height=0.0,
                                           markup=markup))
    return out

  def close(self) -> None:
    self._end()
    shutil.rmtree(self._dir, ignore_errors=True)

  def __enter__(self) -> MarkupStream:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def render_markups(markups: Sequence[str], spec: render.RenderSpec, *,
                   workers: int = 1) -> list[visual_metrics.PageRender]:
  """One PageRender per markup, in order; a page that failed to render has ok=False."""
  if not markups:
    return []
  with MarkupStream(spec, workers=min(workers, len(markups))) as stream:
    stream.add(markups)
    return stream.renders()


def score_renders(generated: Sequence[visual_metrics.PageRender],
                  reference: Sequence[visual_metrics.PageRender]) -> dict[str, float]:
  """visual_metrics.summarize over the pairs whose reference rendered (a reference that did not
  cannot be scored against); the pairs left out are counted in `reference_failures`."""
  pairs = [(g, r) for g, r in zip(generated, reference, strict=True) if r.ok]
  out = visual_metrics.summarize([visual_metrics.compare(g, r) for g, r in pairs])
  out['reference_failures'] = float(len(generated) - len(pairs))
  return out


def score_pages(generated_markups: Sequence[str], reference_markups: Sequence[str] | None,
                spec: render.RenderSpec, workers: int = 1, *,
                reference_renders: Sequence[visual_metrics.PageRender] | None = None) -> dict:
  """Visual metrics of generated markups against their references (summarize's means, plus
  `render_seconds`, the time spent rendering). Pass `reference_renders` (render_markups of the
  references, same spec) to render the references once for many generated sets."""
  start = time.perf_counter()
  if reference_renders is None:
    reference_renders = render_markups(list(reference_markups), spec, workers=workers)
  generated = render_markups(list(generated_markups), spec, workers=workers)
  render_seconds = time.perf_counter() - start
  out = score_renders(generated, reference_renders)
  out['render_seconds'] = render_seconds
  return out
