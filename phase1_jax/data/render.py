"""Screenshots and laid-out DOMs of local HTML pages, with Playwright + Chromium, offline.

With its helpers render_browser.py (finding, launching and killing Chromium) and
render_sandbox.py (the offline sandbox: which requests a page may make, what they are served),
the only modules of the package that start a browser; Playwright is optional and imported lazily.
Pages load from a fake origin and nothing reaches the network (render_sandbox.py says how).

Same page, same pixels: fixed viewport, device scale 1, animations, transitions and caret
blinking disabled by injected CSS, reduced motion, fonts awaited. JavaScript is off by default.
Nothing waits forever: a page not loaded in timeout_s fails; a render still busy after
2 x timeout_s + HUNG_EXTRA_S (a script looping after load) has its browser killed by a watchdog
and fails, and the next page starts a new browser.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import pathlib
import threading

from phase1_jax.data import render_browser, render_sandbox

# Re-exported: callers and tests use these names from render (tests patch check_available here,
# which Renderer looks up here too).
from phase1_jax.data.render_browser import (  # noqa: F401
  BROWSER_NAMES,
  INSTALL,
  LAUNCH_ARGS,
  RenderUnavailable,
  _descendants,
  check_available,
)
from phase1_jax.data.render_sandbox import MAX_FILE_BYTES, ORIGIN  # noqa: F401

VIEWPORT_HEIGHT = 768       # CSS px; the screenshot itself runs down the full page
RECYCLE_EVERY = 100         # pages per browser context (bounds the browser's per-context memory)
RESTART_EVERY = 400         # pages per browser process: what a browser accumulates is bounded too
HUNG_EXTRA_S = 10.0         # a render still busy this long after its load timeout is killed

STILL_CSS = ('*,*::before,*::after{animation:none!important;transition:none!important;'
             'caret-color:transparent!important}')
# Settles the page and annotates it (RenderedPage states the box and text rules); returns
# {html, height, texts}.
SETTLE_AND_ANNOTATE = (pathlib.Path(__file__).with_name('render_annotate.js')).read_text()


@dataclasses.dataclass(frozen=True)
class RenderSpec:
  """How pages are rendered; the same spec gives the same pixels."""
  width: int = 1024          # viewport width, CSS px
  max_height: int = 2048     # screenshot height cap, CSS px (captured from the top)
  timeout_s: float = 10.0    # a page that does not load in this time is skipped
  javascript: bool = False
  browser: str | None = None  # Chromium executable; None: Playwright's own, else one on PATH

  def __post_init__(self):
    for name in ('width', 'max_height'):
      if getattr(self, name) < 1:
        raise ValueError(f'RenderSpec.{name} must be >= 1, got {getattr(self, name)}')
    if not self.timeout_s > 0:
      raise ValueError(f'RenderSpec.timeout_s must be > 0, got {self.timeout_s}')


@dataclasses.dataclass(frozen=True)
class TextBlock:
  """One visible text block of a render (RenderedPage.text_blocks states the rule)."""
  text: str
  box: tuple[int, int, int, int]     # x, y, w, h: CSS px, page coordinates
  colour: tuple[int, int, int]       # computed text colour, 0-255 (alpha dropped)


class RenderError(Exception):
  """One page failed; str(e) is the reason."""


@dataclasses.dataclass
class RenderedPage:
  """A rendered page.

  png: screenshot, spec.width x height. height: captured CSS px, min(page height, max_height);
  the page height is the document's scroll height, so at least the 768 px viewport.
  blocked: requests aborted (render_sandbox.py says which).
  html: documentElement.outerHTML after load, each visible element with data-p1-box="x y w h"
  (rounded CSS px, page coordinates), the attribute absent on the others. Visible: the element
  passes checkVisibility() with opacity and visibility checked (display:none, visibility:hidden
  or opacity:0 on it or an ancestor hide it) and its border box has width and height > 0; a
  zero-size element (a container of floats, display:contents) instead takes the union of its
  visible children's boxes, and is visible when that is not empty. A box wholly above or left of
  the page (off-screen tricks) is not visible; clipping by overflow is not considered.
  text_blocks: the visible text, for render-based metrics (Design2Code's blocks), one block per
  DOM text node as Design2Code's OCR-free blocks are: its data with whitespace runs collapsed
  and trimmed (blank nodes give none); its box, the union of its line boxes clipped to the
  captured png (0..width x 0..height; none when nothing is left); its colour, its parent
  element's computed `color`. Hidden: visibility not 'visible', or display:none / opacity:0 on
  the nearest element with a box or above. Sorted top to bottom, then left to right (document
  order on ties). Not included: iframes, shadow DOM, form values, generated content (::before).
  """
  png: bytes
  html: str
  height: int
  blocked: int
  text_blocks: tuple[TextBlock, ...] = ()


def _read_file(path: str) -> bytes:
  """The body served for one request (a seam the safety tests watch: the sandbox reads through
  this name, looked up here at each request)."""
  with open(path, 'rb') as f:
    return f.read()


class Renderer:
  """One browser, one context and one page, reused from page to page (the context is recycled
  every RECYCLE_EVERY pages, the browser every RESTART_EVERY, the page after any failure).
  text_blocks=False skips collecting RenderedPage.text_blocks (left empty)."""
  text_blocks = True

  def __init__(self, html_dir: str, spec: RenderSpec):
    self.root = os.path.realpath(html_dir)
    if not os.path.isdir(self.root):
      raise ValueError(f'html_dir {html_dir}: not a folder')
    self.spec = spec
    self.browser_path = check_available(spec)
    self._sandbox = render_sandbox.Sandbox(self.root, read_file=lambda path: _read_file(path))
    self._pw = self._browser = self._context = self._page = self._cdp = None
    self._browser_pid = None
    self._pages_in_context = self._pages_in_browser = 0
    self._hung = False

  def __enter__(self) -> Renderer:
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def start(self) -> None:
    """Launch the browser (render calls this when needed)."""
    self.close()
    self._pw = render_browser.Driver.acquire()
    self._pages_in_browser = 0
    self._browser, self._browser_pid = render_browser.launch(self._pw, self.browser_path)

  def close(self) -> None:
    """Close the page, context and browser, release the driver; never raises."""
    self._drop(self._page, self._context, self._browser)
    if self._pw is not None:
      render_browser.Driver.release()
    self._pw = self._browser = self._context = self._page = self._cdp = None

  @staticmethod
  def _drop(*closeables) -> None:
    for closeable in filter(None, closeables):
      with contextlib.suppress(Exception):
        closeable.close()

  def _open_page(self) -> None:
    """The page to render in: a new one after a failure, in a new context now and then."""
    if self._browser is None or not self._browser.is_connected() or \
        self._pages_in_browser >= RESTART_EVERY:
      self.start()
    if self._context is None or self._pages_in_context >= RECYCLE_EVERY:
      self._drop(self._page, self._context)
      self._context = self._browser.new_context(
          viewport={'width': self.spec.width, 'height': VIEWPORT_HEIGHT}, device_scale_factor=1,
          java_script_enabled=self.spec.javascript, service_workers='block',
          reduced_motion='reduce', accept_downloads=False, locale='en-US', timezone_id='UTC')
      self._sandbox.install(self._context)
      self._pages_in_context, self._page = 0, None
    if self._page is None:
      self._page = self._context.new_page()
      self._page.set_default_timeout(self.spec.timeout_s * 1000)
      self._cdp = self._context.new_cdp_session(self._page)
    self._pages_in_context += 1
    self._pages_in_browser += 1

  def _kill_browser(self) -> None:
    """Watchdog: SIGKILL the browser and its helpers, so that a hung call returns (with an error:
    a killed renderer alone leaves CDP calls waiting). render starts a new browser."""
    self._hung = True
    render_browser.kill_tree(self._browser_pid)

  def render(self, rel_path: str) -> RenderedPage:
    """Render html_dir/rel_path; RenderError (with the reason) when it fails."""
    from playwright.sync_api import Error, TimeoutError
    url = render_sandbox.page_url(rel_path)
    target = render_sandbox.local_path(self.root, url)
    if target is None:
      raise RenderError(f'{rel_path}: outside html_dir')
    if not os.path.isfile(target):
      raise RenderError(f'{rel_path}: no such file')
    self._sandbox.start(target)
    self._hung = False
    watchdog = threading.Timer(self.spec.timeout_s * 2 + HUNG_EXTRA_S, self._kill_browser)
    watchdog.daemon = True
    watchdog.start()
    try:
      self._open_page()
      return self._capture(url)
    except Exception as e:  # one bad page must not end a long run: every failure is a reason
      self._drop(self._page)  # the next page starts clean
      self._page = None
      if isinstance(e, RenderError):
        raise
      if isinstance(e, TimeoutError):
        raise RenderError(f'timeout after {self.spec.timeout_s:g} s') from None
      if self._hung:
        raise RenderError(f'hung after {self.spec.timeout_s:g} s; browser killed') from None
      reason = (str(e).strip().splitlines() or [''])[0][:200]
      raise RenderError(reason if isinstance(e, Error) else f'{type(e).__name__}: {reason}') \
          from None
    finally:
      watchdog.cancel()
      watchdog.join()

  def _capture(self, url: str) -> RenderedPage:
    # A script that starts a navigation before 'load' (aborted by the route) hides the load
    # event from Playwright: such a page times out. A meta refresh only starts after load.
    response = self._page.goto(url, wait_until='load')
    if response is None or not response.ok:
      raise RenderError(f'HTTP {response.status if response else "no response"}')
    settled = self._evaluate_isolated(
        f'({SETTLE_AND_ANNOTATE})({json.dumps(STILL_CSS)}, {json.dumps(self.text_blocks)})')
    height = max(1, min(int(settled['height']), self.spec.max_height))
    # CDP rather than page.screenshot: the same pixels, about twice as fast (faster PNG coding).
    shot = self._cdp.send('Page.captureScreenshot', {
        'format': 'png', 'captureBeyondViewport': True, 'optimizeForSpeed': True,
        'clip': {'x': 0, 'y': 0, 'width': self.spec.width, 'height': height, 'scale': 1}})
    return RenderedPage(png=base64.b64decode(shot['data']), html=settled['html'],
                        height=height, blocked=self._sandbox.blocked,
                        text_blocks=_text_blocks(settled['texts'], self.spec.width, height))

  def _evaluate_isolated(self, expression: str):
    """Value of expression, run in an isolated world of the page's main frame.

    Not page.evaluate: with JavaScript off, Chromium may never create the main world's context
    that page.evaluate waits for (seen with aborted iframes); an isolated world always runs, and
    page scripts cannot tamper with its builtins.
    """
    frame_id = self._cdp.send('Page.getFrameTree')['frameTree']['frame']['id']
    context_id = self._cdp.send('Page.createIsolatedWorld', {
        'frameId': frame_id, 'worldName': 'phase1_render'})['executionContextId']
    reply = self._cdp.send('Runtime.evaluate', {
        'expression': expression, 'contextId': context_id, 'awaitPromise': True,
        'returnByValue': True})
    if 'exceptionDetails' in reply:
      raise RenderError(f"annotation failed: {reply['exceptionDetails'].get('text', '?')}")
    return reply['result']['value']


def _text_blocks(texts: list, width: int, height: int) -> tuple[TextBlock, ...]:
  """The annotation's [text, left, top, right, bottom, r, g, b] rows as TextBlocks: boxes clipped
  to the width x height capture and rounded to whole px (none left: dropped), sorted top to
  bottom, then left to right."""
  blocks = []
  for text, left, top, right, bottom, *rgb in texts:
    left, right = max(0.0, left), min(float(width), right)
    top, bottom = max(0.0, top), min(float(height), bottom)
    box = (round(left), round(top), round(right - left), round(bottom - top))
    if box[2] > 0 and box[3] > 0:
      blocks.append(TextBlock(text, box, tuple(min(255, max(0, round(c))) for c in rgb)))
  return tuple(sorted(blocks, key=lambda b: (b.box[1], b.box[0])))
