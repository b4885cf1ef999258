"""Evaluation's rendered half: decoded val pages rendered and compared with their references.

The first eval.render_samples decoded pages become markup (the dataset's tokenizer) and are
rendered in worker processes while the next batch decodes (render_metrics.MarkupStream), then
scored against their references' renders with visual_metrics. A reference is the val page's
whole markup (all its tokens, as the baselines CLI scores them), rendered once per PageJudge at
the dataset's render width. The first eval.render_pictures pages also become pictures for
TensorBoard: the input screenshot (the reference's render on a features dataset) beside the
render of the generated page.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from phase1_jax import render_metrics
from phase1_jax.data import patches, records, render

PICTURE_HEIGHT = 512   # px of each panel of a TensorBoard picture
GAP = 8                # px between the panels


@dataclasses.dataclass(frozen=True)
class RenderEvalSpec:
  """What evaluation renders: how many decoded pages, how many pictures, with which renderer."""
  samples: int
  pictures: int
  workers: int
  spec: render.RenderSpec


class PageJudge:
  """Renders and scores the generated pages of one evaluation after another (`session`)."""

  def __init__(self, settings: RenderEvalSpec, source: records.FilePages,
               to_markup: Callable[[list[int]], str]):
    """`to_markup`: token ids -> markup, the dataset's tokenizer (pipeline.markup_decoder)."""
    self.settings, self.source, self.to_markup = settings, source, to_markup
    self.references: list | None = None   # PageRenders, after the first session

  def markup(self, token_ids: Sequence[int]) -> str:
    return self.to_markup(list(token_ids))

  def session(self) -> JudgeSession:
    return JudgeSession(self)


class JudgeSession:
  """One evaluation's renders: `add` each decoded batch, `result` at the end; a `with` block
  stops the render workers whatever happens."""

  def __init__(self, judge: PageJudge):
    self.judge, self.samples = judge, min(judge.settings.samples, len(judge.source))
    self.start = time.perf_counter()
    self.num_references = 0 if judge.references is not None else self.samples
    # Read before the workers start: a bad record fails here with nothing to stop.
    references = [judge.markup(judge.source.record(i)['tokens'])
                  for i in range(self.num_references)]
    self.stream = render_metrics.MarkupStream(judge.settings.spec,
                                              workers=judge.settings.workers)
    self.stream.add(references)
    self.generated = 0

  def add(self, token_ids: Sequence[Sequence[int]]) -> None:
    """The next pages' generated token ids (before EOS), in val order; those past `samples`
    are ignored."""
    take = list(token_ids[:max(0, self.samples - self.generated)])
    self.stream.add([self.judge.markup(ids) for ids in take])
    self.generated += len(take)

  def result(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(visual_* metrics with the render timings, {picture name: HxWx3 uint8})."""
    waited = time.perf_counter()
    renders = self.stream.renders()
    end = time.perf_counter()
    if self.num_references:
      self.judge.references = renders[:self.num_references]
    generated = renders[self.num_references:]
    scores = render_metrics.score_renders(generated, self.judge.references[:len(generated)])
    metrics = {f'visual_{k}': v for k, v in scores.items()}
    metrics.update(render_seconds=end - self.start, render_wait_seconds=end - waited,
                   rendered_pages=len(renders), rendered_references=self.num_references)
    pictures = {f'page_{i}': self.picture(i, page) for i, page in
                enumerate(generated[:self.judge.settings.pictures])}
    return metrics, pictures

  def picture(self, index: int, generated) -> np.ndarray:
    """The input screenshot of val page `index` (its reference's render on a features
    dataset) beside the render of its generated page."""
    record = self.judge.source.record(index)
    if 'patches' in record:
      size = int(self.judge.source.metadata['patch_size'])
      left = patches.from_patches(record['patches'], record['patch_positions'], patch_size=size)
    else:
      left = self.judge.references[index].screenshot_HxWx3
    return side_by_side([left, generated.screenshot_HxWx3])

  def __enter__(self) -> JudgeSession:
    return self

  def __exit__(self, *exc) -> None:
    self.stream.close()


def side_by_side(images: Sequence[np.ndarray | None], height: int = PICTURE_HEIGHT) -> np.ndarray:
  """The images (HxWx3 uint8; None: a failed render, drawn as a grey 3:4 panel) scaled to
  `height`, left to right on white with GAP px between them."""
  from PIL import Image
  panels = []
  for img in images:
    if img is None:
      panels.append(np.full((height, height * 3 // 4, 3), 128, np.uint8))
      continue
    width = max(1, round(img.shape[1] * height / img.shape[0]))
    panels.append(np.asarray(Image.fromarray(np.asarray(img, np.uint8)).resize(
        (width, height), Image.BILINEAR)))
  gap = np.full((height, GAP, 3), 255, np.uint8)
  return np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
