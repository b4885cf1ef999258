"""Screenshots and laid-out DOMs of local HTML pages, with Playwright + Chromium, offline.

The only module of the package that starts a browser; Playwright is optional and imported lazily.
Pages load from a fake origin (ORIGIN/<rel_path>). One route handler serves every request to that
origin from regular files inside html_dir (realpath-checked, so `..`, %2f and symlinks cannot
escape; missing -> 404) and aborts every other request (other scheme or host, a path outside
html_dir, a later main-frame navigation such as a meta refresh), counting it in `blocked`. As a
second wall, Chromium resolves no host names and sends any connection that is not routed to a
dead proxy, so nothing reaches the network even where routing does not apply (preconnects,
WebSockets to IP literals, WebRTC). file:// URLs are refused by Chromium itself from an http page.

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
import functools
import json
import mimetypes
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import urllib.parse

ORIGIN = 'http://pages.invalid'
VIEWPORT_HEIGHT = 768       # CSS px; the screenshot itself runs down the full page
RECYCLE_EVERY = 100         # pages per browser context (bounds the browser's per-context memory)
RESTART_EVERY = 400         # pages per browser process: what a browser accumulates is bounded too
MAX_FILE_BYTES = 64 << 20   # larger files are not served (404)
HUNG_EXTRA_S = 10.0         # a render still busy this long after its load timeout is killed
INSTALL = ("pip install -e '.[render]' and apt-get install chromium (or playwright install "
           "chromium), then pass --browser /usr/bin/chromium")
BROWSER_NAMES = ('chromium', 'chromium-browser', 'google-chrome')
# On top of Playwright's own switches (no background networking, component updates, sync, default
# apps or first-run; --no-sandbox, which running as root needs).
LAUNCH_ARGS = (
    '--host-resolver-rules=MAP * ~NOTFOUND', '--proxy-server=http://127.0.0.1:9',
    '--proxy-bypass-list=<-loopback>', '--force-webrtc-ip-handling-policy=disable_non_proxied_udp',
    '--disable-domain-reliability', '--no-pings', '--disable-gpu', '--font-render-hinting=none')

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


class RenderUnavailable(Exception):
  """Playwright or the browser is missing; the message says how to install them."""


@dataclasses.dataclass
class RenderedPage:
  """A rendered page.

  png: screenshot, spec.width x height. height: captured CSS px, min(page height, max_height);
  the page height is the document's scroll height, so at least the 768 px viewport.
  blocked: requests aborted (see the module docstring).
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


@functools.lru_cache(maxsize=1)
def _playwright_chromium() -> str | None:
  """Playwright's downloaded Chromium, if any (asked once, in a subprocess: a driver started
  here would clash with a Renderer's)."""
  code = ('from playwright.sync_api import sync_playwright\n'
          'with sync_playwright() as p: print(p.chromium.executable_path)')
  try:
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return out if out and os.path.isfile(out) else None


def check_available(spec: RenderSpec) -> str:
  """The browser executable render will use, or RenderUnavailable (one line). Bounded in time."""
  try:
    import playwright.sync_api  # noqa: F401
  except ImportError:
    raise RenderUnavailable(f'playwright is not installed: {INSTALL}') from None
  if spec.browser is not None:
    candidates = [spec.browser]
  else:
    candidates = [_playwright_chromium()] + [shutil.which(name) for name in BROWSER_NAMES]
  for path in filter(None, candidates):
    if os.path.isfile(path) and os.access(path, os.X_OK):
      try:
        subprocess.run([path, '--version'], capture_output=True, timeout=30, check=True)
        return path
      except (OSError, subprocess.SubprocessError):
        if spec.browser is not None:
          raise RenderUnavailable(f'--browser {path} does not run: {INSTALL}') from None
  where = f'--browser {spec.browser}: no such executable' if spec.browser else 'no Chromium found'
  raise RenderUnavailable(f'{where}: {INSTALL}')


def _read_file(path: str) -> bytes:
  """The body served for one request (a seam the safety tests watch)."""
  with open(path, 'rb') as f:
    return f.read()


class _Driver:
  """The Playwright driver of this thread, shared: the sync API allows one per thread."""
  local = threading.local()

  @classmethod
  def acquire(cls):
    from playwright.sync_api import sync_playwright
    if getattr(cls.local, 'users', 0) == 0:
      cls.local.playwright = sync_playwright().start()
      cls.local.users = 0
    cls.local.users += 1
    return cls.local.playwright

  @classmethod
  def release(cls) -> None:
    cls.local.users -= 1
    if cls.local.users == 0:
      try:
        cls.local.playwright.stop()
      except Exception:
        pass


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
    self._pw = self._browser = self._context = self._page = self._cdp = None
    self._browser_pid = self._target = None
    self._pages_in_context = self._pages_in_browser = self._blocked = self._navigations = 0
    self._hung = False

  def __enter__(self) -> Renderer:
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def start(self) -> None:
    """Launch the browser (render calls this when needed)."""
    self.close()
    self._pw = _Driver.acquire()
    self._pages_in_browser = 0
    self._browser = self._pw.chromium.launch(
        executable_path=self.browser_path, headless=True, args=list(LAUNCH_ARGS), timeout=60_000)
    try:
      info = self._browser.new_browser_cdp_session().send('SystemInfo.getProcessInfo')
      self._browser_pid = next(p['id'] for p in info['processInfo'] if p['type'] == 'browser')
    except Exception:  # no watchdog without the pid; rendering still works
      self._browser_pid = None

  def close(self) -> None:
    """Close the page, context and browser, release the driver; never raises."""
    self._drop(self._page, self._context, self._browser)
    if self._pw is not None:
      _Driver.release()
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
      self._context.route('**/*', self._route)
      self._context.route_web_socket('**/*', self._block_web_socket)
      self._pages_in_context, self._page = 0, None
    if self._page is None:
      self._page = self._context.new_page()
      self._page.set_default_timeout(self.spec.timeout_s * 1000)
      self._cdp = self._context.new_cdp_session(self._page)
    self._pages_in_context += 1
    self._pages_in_browser += 1

  def _block_web_socket(self, ws) -> None:
    self._blocked += 1
    ws.close()

  def _local_path(self, url: str) -> str | None:
    """The real path inside html_dir that url names, or None (other origin, or escapes)."""
    parts = urllib.parse.urlsplit(url)
    if f'{parts.scheme}://{parts.netloc}' != ORIGIN:
      return None
    path = os.path.realpath(os.path.join(self.root, urllib.parse.unquote(parts.path).lstrip('/')))
    return path if path.startswith(self.root + os.sep) else None

  def _route(self, route, request) -> None:
    """Serve ORIGIN from html_dir; abort everything else (counted in blocked)."""
    try:
      path = self._local_path(request.url)
      if request.is_navigation_request() and request.frame.parent_frame is None:
        self._navigations += 1  # the page asked for, once; not a meta refresh or link after
        path = path if self._navigations == 1 and path == self._target else None
      if path is None:
        self._blocked += 1
        route.abort('aborted')  # 'aborted' leaves a failed navigation without an error page
      elif os.path.isfile(path) and os.path.getsize(path) <= MAX_FILE_BYTES:
        content_type = mimetypes.guess_type(path)[0] or 'application/octet-stream'
        route.fulfill(status=200, body=_read_file(path), content_type=content_type)
      else:
        route.fulfill(status=404, body=b'', content_type='text/plain')
    except Exception:  # the page is gone, or the file vanished: never serve, never raise
      with contextlib.suppress(Exception):
        route.abort('aborted')

  def _kill_browser(self) -> None:
    """Watchdog: SIGKILL the browser and its helpers, so that a hung call returns (with an error:
    a killed renderer alone leaves CDP calls waiting). render starts a new browser."""
    self._hung = True
    for pid in _descendants(self._browser_pid) + [self._browser_pid]:
      with contextlib.suppress(OSError, TypeError):
        os.kill(pid, signal.SIGKILL)

  def render(self, rel_path: str) -> RenderedPage:
    """Render html_dir/rel_path; RenderError (with the reason) when it fails."""
    from playwright.sync_api import Error, TimeoutError
    url = f'{ORIGIN}/{urllib.parse.quote(rel_path.replace(os.sep, "/").lstrip("/"))}'
    self._target = self._local_path(url)
    if self._target is None:
      raise RenderError(f'{rel_path}: outside html_dir')
    if not os.path.isfile(self._target):
      raise RenderError(f'{rel_path}: no such file')
    self._blocked = self._navigations = 0
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
                        height=height, blocked=self._blocked,
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


def _descendants(pid: int | None) -> list[int]:
  """The processes below pid (from /proc; [] elsewhere, or for None)."""
  if pid is None or not os.path.isdir('/proc'):
    return []
  children: dict[int, list[int]] = {}
  for name in filter(str.isdigit, os.listdir('/proc')):
    with contextlib.suppress(OSError, ValueError, IndexError), open(f'/proc/{name}/stat') as f:
      children.setdefault(int(f.read().rsplit(')', 1)[1].split()[1]), []).append(int(name))
  found, todo = [], [pid]
  while todo:
    below = children.get(todo.pop(), [])
    found += below
    todo += below
  return found
