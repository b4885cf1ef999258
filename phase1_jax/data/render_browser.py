"""The browser render.py drives: finding Chromium, the Playwright driver, launching, killing.

Kept apart from the Renderer so that what is started, with which switches, and how it is stopped
reads in one place. LAUNCH_ARGS are the second wall of the offline sandbox (render_sandbox.py is
the first): Chromium resolves no host names and sends any connection that is not routed to a
dead proxy, so nothing reaches the network even where routing does not apply (preconnects,
WebSockets to IP literals, WebRTC). Playwright is optional and imported lazily.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from phase1_jax.data.render import RenderSpec

INSTALL = ("pip install -e '.[render]' and apt-get install chromium (or playwright install "
           "chromium), then pass --browser /usr/bin/chromium")
BROWSER_NAMES = ('chromium', 'chromium-browser', 'google-chrome')
# On top of Playwright's own switches (no background networking, component updates, sync, default
# apps or first-run; --no-sandbox, which running as root needs).
LAUNCH_ARGS = (
    '--host-resolver-rules=MAP * ~NOTFOUND', '--proxy-server=http://127.0.0.1:9',
    '--proxy-bypass-list=<-loopback>', '--force-webrtc-ip-handling-policy=disable_non_proxied_udp',
    '--disable-domain-reliability', '--no-pings', '--disable-gpu', '--font-render-hinting=none')


class RenderUnavailable(Exception):
  """Playwright or the browser is missing; the message says how to install them."""


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


class Driver:
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


def launch(playwright, executable: str):
  """(browser, pid of its browser process) for a headless Chromium at `executable` with
  LAUNCH_ARGS; the pid is None when CDP does not tell it (no watchdog then; rendering works)."""
  browser = playwright.chromium.launch(
      executable_path=executable, headless=True, args=list(LAUNCH_ARGS), timeout=60_000)
  try:
    info = browser.new_browser_cdp_session().send('SystemInfo.getProcessInfo')
    pid = next(p['id'] for p in info['processInfo'] if p['type'] == 'browser')
  except Exception:  # no watchdog without the pid; rendering still works
    pid = None
  return browser, pid


def kill_tree(pid: int | None) -> None:
  """SIGKILL pid and every process below it (a hung browser and its helpers); never raises."""
  for victim in _descendants(pid) + [pid]:
    with contextlib.suppress(OSError, TypeError):
      os.kill(victim, signal.SIGKILL)


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
