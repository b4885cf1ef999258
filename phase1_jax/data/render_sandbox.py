"""The offline sandbox of a render: which requests a page may make, and what they are served.

Pages load from a fake origin (ORIGIN/<rel_path>). One route handler serves every request to that
origin from regular files inside html_dir (realpath-checked, so `..`, %2f and symlinks cannot
escape; missing or over MAX_FILE_BYTES -> 404) and aborts every other request (other scheme or
host, a path outside html_dir, a later main-frame navigation such as a meta refresh, any
WebSocket), counting it in `blocked`. file:// URLs are refused by Chromium itself from an http
page; the browser's launch switches (render_browser.LAUNCH_ARGS) are the second wall.
"""
from __future__ import annotations

import contextlib
import mimetypes
import os
import urllib.parse
from typing import Callable

ORIGIN = 'http://pages.invalid'
MAX_FILE_BYTES = 64 << 20   # larger files are not served (404)


def page_url(rel_path: str) -> str:
  """The URL under ORIGIN that page html_dir/rel_path loads from."""
  return f'{ORIGIN}/{urllib.parse.quote(rel_path.replace(os.sep, "/").lstrip("/"))}'


def local_path(root: str, url: str) -> str | None:
  """The real path inside `root` (a realpath) that url names, or None (other origin, or
  escapes)."""
  parts = urllib.parse.urlsplit(url)
  if f'{parts.scheme}://{parts.netloc}' != ORIGIN:
    return None
  path = os.path.realpath(os.path.join(root, urllib.parse.unquote(parts.path).lstrip('/')))
  return path if path.startswith(root + os.sep) else None


class Sandbox:
  """The route handlers of one browser context over html_dir `root` (a realpath). `read_file`
  reads a served file's bytes. Call `start(target)` before each page: it resets the counts and
  names the one main-frame navigation allowed; `blocked` then counts the page's aborted
  requests."""

  def __init__(self, root: str, read_file: Callable[[str], bytes]):
    self.root, self.read_file = root, read_file
    self.blocked = self.navigations = 0
    self.target: str | None = None

  def start(self, target: str) -> None:
    """Before loading the page at real path `target`: nothing blocked or navigated yet."""
    self.blocked = self.navigations = 0
    self.target = target

  def install(self, context) -> None:
    """Routes every request and WebSocket of a Playwright browser context through here."""
    context.route('**/*', self.route)
    context.route_web_socket('**/*', self.block_web_socket)

  def block_web_socket(self, ws) -> None:
    self.blocked += 1
    ws.close()

  def route(self, route, request) -> None:
    """Serve ORIGIN from root; abort everything else (counted in blocked)."""
    try:
      path = local_path(self.root, request.url)
      if request.is_navigation_request() and request.frame.parent_frame is None:
        self.navigations += 1  # the page asked for, once; not a meta refresh or link after
        path = path if self.navigations == 1 and path == self.target else None
      if path is None:
        self.blocked += 1
        route.abort('aborted')  # 'aborted' leaves a failed navigation without an error page
      elif os.path.isfile(path) and os.path.getsize(path) <= MAX_FILE_BYTES:
        content_type = mimetypes.guess_type(path)[0] or 'application/octet-stream'
        route.fulfill(status=200, body=self.read_file(path), content_type=content_type)
      else:
        route.fulfill(status=404, body=b'', content_type='text/plain')
    except Exception:  # the page is gone, or the file vanished: never serve, never raise
      with contextlib.suppress(Exception):
        route.abort('aborted')
