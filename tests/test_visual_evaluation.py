"""Rendered evaluation: markups rendered while more are added (render_metrics.MarkupStream), the
val pages' references rendered once and scored (inference/visual_evaluation.PageJudge), pictures
for TensorBoard, and a missing browser as one line. Skipped without Playwright or Chromium."""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest
from support import skip_module_without_browser

from phase1_jax import config as config_lib
from phase1_jax import render_metrics, specs, visual_metrics
from phase1_jax.config import ConfigError
from phase1_jax.data import pipeline, records, render
from phase1_jax.inference import evaluation, visual_evaluation

skip_module_without_browser()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = render.RenderSpec(width=480, max_height=900, timeout_s=20)


@pytest.fixture
def dataset(rendered_pixel_dataset):
  return rendered_pixel_dataset


def test_stream_renders_pages_added_while_it_runs_in_order():
  pages = [f'<h1>Page {i}</h1><p style="color:#{i}0{i}">words {i}</p>' for i in range(5)]
  with render_metrics.MarkupStream(SPEC, workers=2) as stream:
    stream.add(pages[:2])
    time.sleep(1.0)   # the first pages render meanwhile
    stream.add(pages[2:])
    renders = stream.renders()
  assert [r.markup for r in renders] == pages and all(r.ok for r in renders)
  assert [r.blocks[0].text for r in renders] == [f'Page {i}' for i in range(5)]
  assert not os.path.exists(stream._dir) and not stream._thread.is_alive()


def test_stream_stops_cleanly_when_the_caller_fails():
  """An error while pages are queued (a decode that fails) stops the workers and returns."""
  start = time.perf_counter()
  with pytest.raises(RuntimeError, match='decode failed'):
    with render_metrics.MarkupStream(SPEC, workers=2) as stream:
      stream.add(['<p>one</p>', '<p>two</p>'])
      raise RuntimeError('decode failed')
  assert not stream._thread.is_alive() and not os.path.exists(stream._dir)
  assert time.perf_counter() - start < 60


def _pixels_config(dataset):
  """configs/pixels_small.py on the rendered test dataset."""
  return config_lib.load_file(os.path.join(REPO, 'configs', 'pixels_small.py'), dataset)


def _judge(dataset, samples=3, pictures=2):
  source = records.FilePages(dataset, 'val', max_seq_len=64, num_patches=96)
  settings = visual_evaluation.RenderEvalSpec(samples=samples, pictures=pictures, workers=2,
                                              spec=SPEC)
  config = _pixels_config(dataset)
  to_markup = pipeline.markup_decoder(specs.data_spec(config), config.model.vocab_size)
  return visual_evaluation.PageJudge(settings, source, to_markup), source


def test_reference_markup_judged_against_itself_scores_one(dataset):
  """The val pages' own markup as the 'generated' pages: every visual metric exactly 1.0
  (render determinism), the references rendered at the first session only."""
  judge, source = _judge(dataset)
  n = min(3, len(source))
  tokens = [source.record(i)['tokens'].tolist() for i in range(len(source))]
  for session_index in range(2):
    with judge.session() as session:
      session.add(tokens[:2])
      session.add(tokens[2:])   # past `samples`: ignored
      metrics, pictures = session.result()
    assert metrics['rendered_references'] == (n if session_index == 0 else 0)
    assert metrics['visual_pages'] == n and metrics['visual_render_failures'] == 0
    for name in visual_metrics.METRICS:
      assert metrics[f'visual_{name}'] == 1.0, (session_index, name)
    assert metrics['render_seconds'] >= metrics['render_wait_seconds'] >= 0
  assert sorted(pictures) == ['page_0', 'page_1'][:min(2, n)]
  picture = pictures['page_0']
  assert picture.dtype == np.uint8 and picture.shape[0] == visual_evaluation.PICTURE_HEIGHT
  assert picture.shape[2] == 3


def test_generated_pages_that_differ_score_below_one(dataset):
  judge, source = _judge(dataset, samples=2, pictures=0)
  with judge.session() as session:
    session.add([[], source.record(0)['tokens'][:10].tolist()])   # nothing, and a cut page
    metrics, pictures = session.result()
  assert pictures == {}
  assert metrics['visual_block_match'] < 1.0 and metrics['visual_tree_bleu'] < 1.0


def test_side_by_side_scales_panels_to_one_height():
  tall = np.zeros((200, 100, 3), np.uint8)
  wide = np.full((50, 400, 3), 7, np.uint8)
  out = visual_evaluation.side_by_side([tall, None, wide], height=100)
  # 50 + 75 (a failed render: grey 3:4) + 800 px, and two gaps.
  assert out.shape == (100, 50 + 75 + 800 + 2 * visual_evaluation.GAP, 3)
  assert (out[:, 50 + visual_evaluation.GAP:50 + visual_evaluation.GAP + 75] == 128).all()


def test_missing_browser_is_one_line_naming_the_field(dataset, monkeypatch):
  config = _pixels_config(dataset)
  config.eval.render_samples = config.eval.bleu_samples = 2
  def unavailable(spec):
    raise render.RenderUnavailable('no Chromium found: install it')
  monkeypatch.setattr(render, 'check_available', unavailable)
  with pytest.raises(ConfigError, match=r'^eval.render_samples=2 renders pages: no Chromium found'):
    specs.render_eval_spec(config)
  config.eval.render_samples = 0
  assert specs.render_eval_spec(config) is None


def test_rendered_evaluation_without_a_markup_decoder_is_an_error(dataset):
  """The Evaluator says so when it is made, before anything compiles or renders."""
  config = _pixels_config(dataset)
  config.eval.render_samples = 0
  settings = visual_evaluation.RenderEvalSpec(samples=2, pictures=0, workers=1, spec=SPEC)
  spec = dataclasses.replace(specs.eval_spec(config), render=settings)
  with pytest.raises(ValueError, match='needs to_markup'):
    evaluation.Evaluator(spec, graphdef=None)
