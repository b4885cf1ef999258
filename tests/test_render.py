"""phase1_jax.data.render: screenshots, element boxes, determinism, the offline sandbox, timeouts,
the worker pool. Skipped when Playwright or Chromium is missing (check_available says which)."""
from __future__ import annotations

import os
import time

import lxml.html
import numpy as np
import pytest
from PIL import Image

from phase1_jax.data import patches, render, render_pool

pytest.importorskip('playwright.sync_api', reason='playwright not installed (optional: render)')
try:
  BROWSER = render.check_available(render.RenderSpec())
except render.RenderUnavailable as e:
  pytest.skip(f'no browser to render with: {e}', allow_module_level=True)

SECRET = 'OUTSIDE_SECRET_7f3a'
MAGENTA, GREEN, BLUE = (255, 0, 255), (12, 200, 34), (0x33, 0x66, 0xcc)

STYLED = """<!doctype html><html><head><title>t</title><style>
body { margin: 0; font: 16px sans-serif }
#fixed { width: 200px; height: 100px; background: #3366cc }
.float { float: left; width: 40px; height: 30px; background: #cc6633 }
@keyframes spin { from { transform: rotate(0deg) } to { transform: rotate(360deg) } }
#spin { width: 60px; height: 20px; background: #444; animation: spin 0.7s linear infinite }
</style></head><body>
<div id="fixed">Fixed</div>
<div id="none" style="display:none"><p id="inside-none">x</p></div>
<span id="fake" style="display:none" data-p1-box="1 2 3 4">forged box</span>
<div id="hidden" style="visibility:hidden; width:50px; height:50px">h</div>
<div id="transparent" style="opacity:0; width:50px; height:50px"><b id="in-transparent">t</b></div>
<div id="offscreen" style="position:absolute; left:-9999px; width:10px; height:10px"></div>
<div id="contents" style="display:contents"><span id="in-contents">inside</span></div>
<div id="empty"></div>
<div id="floats"><div class="float" id="f1"></div><div class="float" id="f2"></div></div>
<p id="para" style="clear:both">Hello <b id="bold">world</b></p>
<div id="spin"></div>
<input id="field" value="text" autofocus>
</body></html>"""

# Text blocks: three shown (one inside display:contents), three hidden, one below the capture.
TEXTS = """<!doctype html><body style="margin:0; font: 16px sans-serif">
<p style="color:rgb(10,20,30)">Hello
   world</p><h1>Title</h1>
<div style="display:none">gone</div><span style="visibility:hidden">hidden</span>
<div style="opacity:0">faint</div>
<div style="display:contents; color:rgb(200,0,0)"><i>contents</i></div>
<div style="position:absolute; top:3000px">below the capture</div>
</body>"""

# Every way out of html_dir we know of, with JavaScript off (the default).
UNSAFE = """<!doctype html><html><head>
<meta http-equiv="refresh" content="0; url=http://example.com/">
<link rel="stylesheet" href="https://example.com/remote.css">
<script src="http://example.com/remote.js"></script>
</head><body style="margin:0; background:#fff">
<img id="inside" src="inside.png" width="40" height="40">
<img src="file://{outside}/outside.png" width="40" height="40">
<img src="link.png" width="40" height="40">
<img src="..%2foutside.png" width="40" height="40">
<img src="../outside.png" width="40" height="40">
<img src="http://example.com/x.png" width="40" height="40">
<iframe src="file:///etc/passwd"></iframe>
<iframe src="file://{outside}/outside.html"></iframe>
<iframe src="../outside.html"></iframe>
<iframe src="..%2foutside.html"></iframe>
<iframe src="linked.html"></iframe>
<a href="../outside.html">up</a>
</body></html>"""

# The same with JavaScript on: requests from script, and script copying what it got into the DOM.
UNSAFE_JS = """<!doctype html><html><body><p id="before">still here</p>
<script src="http://example.com/remote.js"></script>
<script>
function get(url) {
  try { const x = new XMLHttpRequest(); x.open('GET', url, false); x.send();
        return x.responseText; } catch (e) { return ''; }
}
document.body.append(get('http://example.com/api'), get('file:///etc/passwd'),
                     get('..%2foutside.html'), get('linked.html'), get('/../outside.html'));
fetch('http://example.com/async').catch(() => {});
try { new WebSocket('ws://example.com/ws'); } catch (e) {}
addEventListener("load", () => setTimeout(() => { location.href = "http://example.com/"; }, 0));
</script></body></html>"""


def _write_png(path, rgb):
  Image.fromarray(np.full((8, 8, 3), rgb, np.uint8)).save(path)


@pytest.fixture(scope='module')
def site(tmp_path_factory):
  """tmp/site (html_dir) and, outside it, tmp/outside.{html,png} in a colour used nowhere else."""
  root = tmp_path_factory.mktemp('render')
  site = root / 'site'
  site.mkdir()
  (root / 'outside.html').write_text(
      f'<body style="background:#ff00ff;margin:0"><h1>{SECRET}</h1></body>')
  _write_png(root / 'outside.png', MAGENTA)
  _write_png(site / 'inside.png', GREEN)
  os.symlink(root / 'outside.png', site / 'link.png')
  os.symlink(root / 'outside.html', site / 'linked.html')
  (site / 'styled.html').write_text(STYLED)
  (site / 'texts.html').write_text(TEXTS)
  (site / 'empty.html').write_text('')
  (site / 'fragment.html').write_text('<div><p>broken <b>tag')
  (site / 'tall.html').write_text('<body style="margin:0"><div style="height:5000px"></div>')
  (site / 'unsafe.html').write_text(UNSAFE.format(outside=root))
  (site / 'unsafe_js.html').write_text(UNSAFE_JS)
  (site / 'loop.html').write_text('<body>busy<script>while (true) {}</script></body>')
  (site / 'late_loop.html').write_text(
      '<body>late<script>onload = () => setTimeout(() => { while (true) {} });</script></body>')
  (site / 'early_nav.html').write_text(
      '<body>early<script>location.href = "http://example.com/";</script></body>')
  return site


@pytest.fixture(scope='module')
def renderer(site):
  with render.Renderer(str(site), render.RenderSpec(browser=BROWSER)) as r:
    yield r


@pytest.fixture(scope='module')
def js_renderer(site):
  spec = render.RenderSpec(browser=BROWSER, javascript=True, timeout_s=1.0)
  with render.Renderer(str(site), spec) as r:
    yield r


@pytest.fixture
def served(monkeypatch):
  """Every file path the route handler reads to serve a request."""
  paths = []
  read = render._read_file
  monkeypatch.setattr(render, '_read_file', lambda path: paths.append(path) or read(path))
  return paths


def _box(tree, element_id):
  value = tree.get_element_by_id(element_id).get('data-p1-box')
  return None if value is None else tuple(int(v) for v in value.split())


def _has_colour(image_HxWx3, rgb, tolerance=40):
  return bool((np.abs(image_HxWx3.astype(int) - rgb).max(axis=-1) <= tolerance).any())


def test_styled_page_screenshot_and_boxes(renderer):
  page = renderer.render('styled.html')
  image_HxWx3 = patches.decode_png(page.png)
  assert image_HxWx3.shape == (page.height, 1024, 3) and page.height == 768
  assert tuple(image_HxWx3[50, 100]) == BLUE
  assert page.blocked == 0 and 'data-p1-still' not in page.html
  tree = lxml.html.fromstring(page.html)
  assert _box(tree, 'fixed') == (0, 0, 200, 100)
  for hidden in ('none', 'inside-none', 'fake', 'hidden', 'transparent', 'in-transparent',
                 'empty', 'offscreen'):
    assert _box(tree, hidden) is None, hidden
  assert _box(tree, 'contents') == _box(tree, 'in-contents') and _box(tree, 'contents')[2] > 0
  assert tree.find('head').get('data-p1-box') is None
  assert _box(tree, 'f1')[2:] == (40, 30) and _box(tree, 'f2')[2:] == (40, 30)
  # The float container has zero height: its box is its children's union.
  x, y, w, h = _box(tree, 'floats')
  assert (w, h) == (80, 30) and (x, y) == _box(tree, 'f1')[:2]
  para, bold = _box(tree, 'para'), _box(tree, 'bold')
  assert para[2] > 0 and para[3] > 0 and para[1] >= y + h
  assert para[0] <= bold[0] and bold[0] + bold[2] <= para[0] + para[2]
  assert tree.find('body').get('data-p1-box').startswith('0 0 1024 ')


def test_height_is_capped(renderer):
  page = renderer.render('tall.html')
  assert page.height == 2048
  assert patches.decode_png(page.png).shape == (2048, 1024, 3)


def test_same_page_same_pixels(renderer):
  first, second = renderer.render('styled.html'), renderer.render('styled.html')
  assert first.png == second.png and first.html == second.html


def test_text_blocks_texts_boxes_colours_and_determinism(renderer):
  page = renderer.render('texts.html')
  blocks = page.text_blocks
  assert [b.text for b in blocks] == ['Hello world', 'Title', 'contents']
  assert blocks[0].colour == (10, 20, 30) and blocks[1].colour == (0, 0, 0)
  assert blocks[2].colour == (200, 0, 0)  # inherited through display:contents
  for b in blocks:
    x, y, w, h = b.box
    assert w > 0 and h > 0 and x >= 0 and y >= 0
    assert x + w <= 1024 and y + h <= page.height == 2048
  assert blocks[0].box[:2] == (0, 16) and blocks[0].box[3] < blocks[1].box[3]  # p margin; h1 font
  tops = [b.box[1] for b in blocks]
  assert tops == sorted(tops) and blocks[0].box[1] + blocks[0].box[3] <= blocks[1].box[1]
  assert renderer.render('texts.html').text_blocks == blocks


def test_text_blocks_of_fragments_and_empty_pages(renderer):
  assert renderer.render('empty.html').text_blocks == ()
  blocks = renderer.render('fragment.html').text_blocks
  assert [b.text for b in blocks] == ['broken', 'tag']
  assert blocks[0].box[1] == blocks[1].box[1] and blocks[0].box[0] < blocks[1].box[0]


def test_nothing_leaves_html_dir_without_javascript(renderer, site, served):
  page = renderer.render('unsafe.html')
  root = os.path.realpath(site)
  assert served and all(p.startswith(root + os.sep) for p in served), served
  assert os.path.join(root, 'inside.png') in served  # the serving path works...
  image_HxWx3 = patches.decode_png(page.png)
  assert _has_colour(image_HxWx3, GREEN, tolerance=0)  # ...and the image shows
  assert not _has_colour(image_HxWx3, MAGENTA)
  # Remote css and img, the meta refresh, the symlinks and the %2f escapes were all aborted.
  assert page.blocked >= 5
  assert SECRET not in page.html and 'root:' not in page.html
  assert _box(lxml.html.fromstring(page.html), 'inside')[2:] == (40, 40)


def test_nothing_leaves_html_dir_with_javascript(js_renderer, site, served):
  page = js_renderer.render('unsafe_js.html')
  root = os.path.realpath(site)
  assert served and all(p.startswith(root + os.sep) for p in served), served
  assert page.blocked >= 4  # remote script, XHRs to example.com, %2f, symlink
  assert SECRET not in page.html and 'root:' not in page.html
  assert 'still here' in page.html  # no navigation away
  assert not _has_colour(patches.decode_png(page.png), MAGENTA)


def test_timeouts_and_hangs_fail_cleanly_then_render_recovers(js_renderer, monkeypatch):
  start = time.perf_counter()
  with pytest.raises(render.RenderError, match='timeout after 1 s'):
    js_renderer.render('loop.html')  # never reaches 'load'
  assert time.perf_counter() - start < 10
  # Busy forever after load: the watchdog kills the browser (at 2 x 1 s + HUNG_EXTRA_S).
  monkeypatch.setattr(render, 'HUNG_EXTRA_S', 0.5)
  start = time.perf_counter()
  with pytest.raises(render.RenderError, match='hung after 1 s'):
    js_renderer.render('late_loop.html')
  assert time.perf_counter() - start < 10
  # A script navigating away before load: aborted; Playwright then misses 'load' (a timeout).
  try:
    assert 'early' in js_renderer.render('early_nav.html').html
  except render.RenderError as e:
    assert 'timeout' in str(e)
  assert js_renderer.render('styled.html').height == 768


def test_bad_paths_fail_cleanly(renderer):
  with pytest.raises(render.RenderError, match='no such file'):
    renderer.render('missing.html')
  with pytest.raises(render.RenderError, match='outside html_dir'):
    renderer.render('../outside.html')
  with pytest.raises(ValueError, match='not a folder'):
    render.Renderer('/nonexistent/pages', render.RenderSpec(browser=BROWSER))


def test_check_available_names_the_fix():
  with pytest.raises(render.RenderUnavailable) as e:
    render.check_available(render.RenderSpec(browser='/nonexistent/chromium'))
  message = str(e.value)
  assert '\n' not in message and '/nonexistent/chromium' in message
  assert "pip install -e '.[render]'" in message and '--browser /usr/bin/chromium' in message


def _browsers_of(pid):
  """Chromium browser processes (not their helpers) that descend from pid."""
  found = set()
  for child in render._descendants(pid):
    try:
      with open(f'/proc/{child}/cmdline', 'rb') as f:
        args = f.read().split(b'\0')
    except OSError:
      continue
    if b'chrom' in args[0] and not any(a.startswith(b'--type=') for a in args):
      found.add(child)
  return found


def _wait_for_browsers(expected, seconds=20):
  deadline = time.monotonic() + seconds
  while _browsers_of(os.getpid()) - expected and time.monotonic() < deadline:
    time.sleep(0.2)
  return _browsers_of(os.getpid()) - expected


def test_render_pages_in_workers_keeps_order_and_cleans_up(site, renderer):
  before = _browsers_of(os.getpid())
  paths = ['styled.html', 'missing.html', 'tall.html', '../outside.html', 'unsafe.html']
  spec = render.RenderSpec(browser=BROWSER)
  results = list(render_pool.render_pages(str(site), paths, spec, workers=2))
  assert [path for path, _ in results] == paths
  reasons = {path: r for path, r in results if isinstance(r, str)}
  assert set(reasons) == {'missing.html', '../outside.html'}
  assert 'no such file' in reasons['missing.html']
  assert results[2][1].height == 2048 and results[0][1].height == 768
  # Same pixels from another process's browser.
  same = renderer.render('styled.html')
  np.testing.assert_array_equal(patches.decode_png(results[0][1].png),
                                patches.decode_png(same.png))
  assert results[0][1].text_blocks == same.text_blocks and same.text_blocks
  assert not _wait_for_browsers(before)

  def consume_and_fail():
    for _ in render_pool.render_pages(str(site), paths * 3, spec, workers=2):
      raise KeyError('consumer failed')

  with pytest.raises(KeyError):
    consume_and_fail()
  assert not _wait_for_browsers(before)


def test_render_pages_in_process(site):
  results = list(render_pool.render_pages(str(site), ['tall.html', 'missing.html'],
                                          render.RenderSpec(browser=BROWSER), workers=1))
  assert results[0][1].height == 2048 and 'no such file' in results[1][1]


def test_browser_restarts_every_restart_every_pages(site, monkeypatch):
  """Memory stays bounded over long runs: the browser process is replaced every RESTART_EVERY
  pages, and the pixels do not change with it."""
  monkeypatch.setattr(render, 'RESTART_EVERY', 2)
  with render.Renderer(str(site), render.RenderSpec(browser=BROWSER)) as r:
    first = r.render('styled.html')
    browser = r._browser
    r.render('styled.html')
    assert r._browser is browser
    third = r.render('styled.html')
    assert r._browser is not browser
  assert third.png == first.png and third.html == first.html
