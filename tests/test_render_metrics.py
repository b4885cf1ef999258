"""phase1_jax.render_metrics: markup rendered by Chromium and scored with visual_metrics; the
baselines CLI on a tiny rendered dataset. Skipped when Playwright or Chromium is missing."""
from __future__ import annotations

import pytest
from support import skip_module_without_browser

from phase1_jax import render_metrics, visual_metrics
from phase1_jax.data import render

skip_module_without_browser()

SPEC = render.RenderSpec(width=480, max_height=900, timeout_s=20)
PAGE = ('<header><h1>Pricing plans</h1></header><nav><a href="#">Home</a> <a href="#">Blog</a>'
        '</nav><main><p style="color:#c03">Pick the plan that fits your team.</p>'
        '<ul><li>Free tier</li><li>Pro tier</li></ul><button>Start now</button></main>')
# The same page without its paragraph: one text block fewer.
FEWER = PAGE.replace('<p style="color:#c03">Pick the plan that fits your team.</p>', '')


@pytest.fixture(scope='module')
def renders():
  """PAGE twice, FEWER, an empty page and garbage, rendered in two worker processes."""
  markups = [PAGE, PAGE, FEWER, '', '<<</div>>\x00 %%']
  pages = render_metrics.render_markups(markups, SPEC, workers=2)
  return dict(zip(('page', 'again', 'fewer', 'empty', 'garbage'), pages, strict=True))


def test_render_markups_fills_page_renders(renders):
  page = renders['page']
  assert page.ok and page.width == SPEC.width and page.height >= render.VIEWPORT_HEIGHT
  assert page.markup == PAGE and page.screenshot_HxWx3.shape == (page.height, SPEC.width, 3)
  texts = [b.text for b in page.blocks]
  assert 'Pricing plans' in texts and 'Pick the plan that fits your team.' in texts
  red = next(b for b in page.blocks if b.text.startswith('Pick'))
  assert red.colour == (0xcc, 0x00, 0x33)


def test_same_markup_scores_one_on_every_metric(renders):
  """Render determinism: two renders of one markup agree exactly."""
  scores = visual_metrics.compare(renders['again'], renders['page'])
  assert scores == dict.fromkeys(visual_metrics.METRICS, 1.0)
  assert (renders['again'].screenshot_HxWx3 == renders['page'].screenshot_HxWx3).all()


def test_empty_and_garbage_markup_count_as_failed_or_low(renders):
  for name in ('empty', 'garbage'):
    scores = visual_metrics.compare(renders[name], renders['page'])
    assert scores['block_match'] < 0.2 and scores['ssim'] < 1.0, name
  summary = render_metrics.score_renders([renders['empty'], renders['garbage']],
                                         [renders['page']] * 2)
  assert summary['pages'] == 2 and summary['render_failures'] >= 1   # the empty page shows nothing
  assert summary['reference_failures'] == 0


def test_removed_block_lowers_block_match(renders):
  scores = visual_metrics.compare(renders['fewer'], renders['page'])
  assert 0.3 < scores['block_match'] < 1.0
  assert scores['text'] == 1.0 and scores['render_success'] == 1.0


def test_failed_render_is_not_an_exception(monkeypatch):
  """A page that times out is ok=False; score_pages counts it as a failure and reports the
  render time; precomputed reference renders are reused, not rendered again."""
  reference = render_metrics.render_markups([PAGE], SPEC)
  hang = '<p>never shown</p>'
  def fail(*args, **kwargs):   # the pool's answer for a page that timed out: its reason
    del args, kwargs
    yield '00000.html', 'timeout after 20 s'
  monkeypatch.setattr(render_metrics.render_pool, 'render_pages', fail)
  out = render_metrics.score_pages([hang], None, SPEC, reference_renders=reference)
  assert out['pages'] == 1 and out['render_failures'] == 1 and out['render_success'] == 0
  assert out['render_seconds'] >= 0
  failed = render_metrics.render_markups([hang], SPEC)[0]
  assert not failed.ok and failed.markup == hang and failed.screenshot_HxWx3 is None


def test_score_pages_end_to_end():
  out = render_metrics.score_pages([PAGE, FEWER], [PAGE, PAGE], SPEC, workers=1)
  assert out['pages'] == 2 and out['render_failures'] == 0
  assert 0.5 < out['block_match'] < 1.0 and out['render_seconds'] > 0
  assert all(0.0 <= out[k] <= 1.0 for k in visual_metrics.METRICS)


def test_page_source_wraps_fragments_only():
  assert render_metrics.page_source('<p>x</p>') == render_metrics.PREFIX + '<p>x</p>'
  doc = '<!DOCTYPE html><html><body>x</body></html>'
  assert render_metrics.page_source(doc) == doc


# --------------------------------------------------------------------------- the baselines CLI

@pytest.fixture
def pixel_dataset(rendered_pixel_dataset):
  return rendered_pixel_dataset


def _baselines_cli(*args):
  import subprocess
  import sys
  return subprocess.run([sys.executable, '-m', 'phase1_jax.baselines', *args],
                        capture_output=True, text=True, timeout=120)


def test_baselines_cli_scores_every_baseline_visually(pixel_dataset, tmp_path):
  import json
  import os

  from phase1_jax import baselines
  default = os.path.join(pixel_dataset, baselines.BASELINES_FILE)
  if os.path.exists(default):   # written by another test of this module's dataset
    os.remove(default)
  output = str(tmp_path / 'baselines.json')
  done = _baselines_cli('--data', pixel_dataset, '--max_seq_len', '64', '--max_patches', '96',
                        '--render_samples', '2', '--workers', '2', '--output', output)
  assert done.returncode == 0, done.stderr
  out = json.loads(done.stdout)
  with open(output) as f:
    assert json.load(f) == out
  assert not os.path.exists(default)   # --output: written there instead
  assert {'majority_elements', 'majority_section'} <= set(out)
  for name in ('constant_page', 'nearest_neighbour'):
    assert 0.0 <= out[name]['semantic_accuracy'] <= 1.0, name
    assert 0.0 <= out[name]['element_f1'] <= 1.0 and 0.0 <= out[name]['element_f1_macro'] <= 1.0
  assert set(out['layout_oracle']) == {'bleu', 'visual'}
  samples = min(2, out['val_pages'])   # the split is by content: 1 or more val pages
  assert out['visual_reference']['pages'] == samples and out['visual_reference']['width'] == 480
  for name in ('constant_page', 'nearest_neighbour', 'layout_oracle'):
    assert 0.0 <= out[name]['bleu'] <= 1.0, name
    visual = out[name]['visual']
    assert visual['pages'] == samples and visual['render_seconds'] > 0, name
    assert all(0.0 <= visual[k] <= 1.0 for k in visual_metrics.METRICS), (name, visual)
  assert out['layout_oracle']['visual']['tree_bleu'] == 1.0   # every tag of the page kept
  table = baselines.comparison_table({'bleu': 0.5, 'visual_pages': samples}, out)
  assert table.splitlines()[1].startswith('BLEU') and 'visual metrics' not in table


def test_baselines_cli_render_off_and_bad_data(pixel_dataset, tmp_path):
  """Without --output the JSON lands in the dataset's directory, where load finds it."""
  import json
  import os

  from phase1_jax import baselines
  before = set(os.listdir(pixel_dataset)) - {baselines.BASELINES_FILE}
  done = _baselines_cli('--data', pixel_dataset, '--max_seq_len', '64', '--max_patches', '96',
                        '--render_samples', '0')
  assert done.returncode == 0, done.stderr
  out = json.loads(done.stdout)
  assert all('visual' not in v for v in out.values() if isinstance(v, dict))
  assert baselines.load(pixel_dataset) == out
  assert set(os.listdir(pixel_dataset)) == before | {baselines.BASELINES_FILE}   # nothing else
  done = _baselines_cli('--data', str(tmp_path / 'missing'))
  assert done.returncode == 1 and done.stderr.startswith('error: ')
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr
