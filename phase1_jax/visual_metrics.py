"""How close a generated page *looks* to its reference: metrics on two renders (numpy, no I/O).

Markup BLEU cannot tell a page that looks right from one that does not. These metrics compare what
the renderer saw: Design2Code's (Si et al. 2024) block match, text, position and colour of the
visible text blocks, an SSIM of the screenshots (in place of their CLIP score), WebCode2M's TreeBLEU
of the DOMs, and whether the page rendered at all (DesignBench). Every metric is in [0, 1] and 1.0
for identical pages; a page that failed to render, or rendered nothing, scores 0 on all of them.
See docs/visual_metrics.md for the formulas and the tests that pin them.

Shape suffixes: H, W = screenshot height and width in pixels; N = colours.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Sequence

import numpy as np

# The renderer's own record of a text block (text, box (x, y, w, h) CSS px, colour (r, g, b)).
from phase1_jax.data.render import TextBlock  # PageRender.blocks holds them as rendered

MIN_TEXT_SIMILARITY = 0.5   # Design2Code: matched pairs less similar than this are dropped
SSIM_SIZE = 256             # both screenshots are resized to SSIM_SIZE x SSIM_SIZE grayscale
BLOCK_METRICS = ('block_match', 'text', 'position', 'colour')
METRICS = ('render_success',) + BLOCK_METRICS + ('ssim', 'tree_bleu')


@dataclasses.dataclass(frozen=True, eq=False)   # eq=False: the screenshot is an array
class PageRender:
  """What the renderer returns for one page: the page size in CSS px, its text blocks, the
  screenshot (HxWx3 uint8; None when the render failed), the markup that was rendered (for
  TreeBLEU) and whether it rendered."""
  ok: bool
  width: float
  height: float
  blocks: tuple[TextBlock, ...] = ()
  screenshot_HxWx3: np.ndarray | None = None
  markup: str = ''

  def shows_something(self) -> bool:
    """Rendered, and has a text block or a screenshot that is not one flat colour."""
    if not self.ok:
      return False
    if self.blocks:
      return True
    shot = self.screenshot_HxWx3
    return shot is not None and shot.size > 0 and bool(np.any(shot != shot.reshape(-1, 3)[0]))


# --------------------------------------------------------------------------- text blocks

def text_similarity(a: str, b: str) -> float:
  """difflib's ratio 2M/T (M matched characters, T both lengths), as Design2Code; 1.0 for two
  empty strings."""
  return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _centres_Nx2(page: PageRender) -> np.ndarray:
  """Block centres as fractions of the page's own width and height."""
  if not page.blocks:
    return np.zeros((0, 2))
  x, y, w, h = np.asarray([b.box for b in page.blocks], np.float64).T
  return np.stack([(x + w / 2) / max(page.width, 1e-9), (y + h / 2) / max(page.height, 1e-9)], 1)


def block_areas_N(page: PageRender) -> np.ndarray:
  """Each text block's area in CSS px^2 (a negative width or height counts as 0)."""
  return np.asarray([max(b.box[2], 0.0) * max(b.box[3], 0.0) for b in page.blocks], np.float64)


def match_blocks(generated: PageRender, reference: PageRender) -> list[tuple[int, int, float]]:
  """One-to-one (generated index, reference index, text similarity) pairs maximising the summed
  similarity over pairs at least MIN_TEXT_SIMILARITY similar (Hungarian, scipy's
  linear_sum_assignment; scipy comes with jax). Among equally similar pairs (repeated texts) the
  nearer block centres win, so an unchanged page matches each block to itself."""
  from scipy.optimize import linear_sum_assignment  # a jax dependency; imported when used
  gen, ref = generated.blocks, reference.blocks
  if not gen or not ref:
    return []
  sim_GxR = np.asarray([[text_similarity(g.text, r.text) for r in ref] for g in gen])
  score_GxR = np.where(sim_GxR >= MIN_TEXT_SIMILARITY, sim_GxR, 0.0)
  dist_GxR = np.abs(_centres_Nx2(generated)[:, None] - _centres_Nx2(reference)[None]).max(-1)
  score_GxR = score_GxR - 1e-6 * np.minimum(dist_GxR, 10.0) * (score_GxR > 0)
  rows, cols = linear_sum_assignment(score_GxR, maximize=True)
  return [(int(g), int(r), float(sim_GxR[g, r])) for g, r in zip(rows, cols, strict=True)
          if sim_GxR[g, r] >= MIN_TEXT_SIMILARITY]


def block_scores(generated: PageRender, reference: PageRender) -> dict[str, float]:
  """block_match (matched blocks' area, both pages, over both pages' total block area), text (mean
  similarity of matched pairs), position (1 - mean Chebyshev distance of matched centres, each
  page's own size as unit) and colour (mean 1 - CIEDE2000/100 of matched text colours). Pages that
  both have no text agree fully (1.0); text on either side with nothing matched scores 0."""
  if not generated.blocks and not reference.blocks:
    return dict.fromkeys(BLOCK_METRICS, 1.0)
  pairs = match_blocks(generated, reference)
  if not pairs:
    return dict.fromkeys(BLOCK_METRICS, 0.0)
  gi, ri, sims = (np.asarray(v) for v in zip(*pairs, strict=True))
  area_g, area_r = block_areas_N(generated), block_areas_N(reference)
  total = area_g.sum() + area_r.sum()
  block_match = (area_g[gi].sum() + area_r[ri].sum()) / total if total > 0 else 1.0
  shift = np.abs(_centres_Nx2(generated)[gi] - _centres_Nx2(reference)[ri]).max(-1)
  rgb_g = np.asarray([generated.blocks[i].colour for i in gi], np.float64)
  rgb_r = np.asarray([reference.blocks[i].colour for i in ri], np.float64)
  delta_e = ciede2000(srgb_to_lab(rgb_g), srgb_to_lab(rgb_r))
  return {'block_match': float(block_match),
          'text': float(sims.mean()),
          'position': float(np.clip(1.0 - np.clip(shift, 0.0, 1.0).mean(), 0.0, 1.0)),
          'colour': float(np.clip(1.0 - delta_e / 100.0, 0.0, 1.0).mean())}


# --------------------------------------------------------------------------- colour

_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb_Nx3: np.ndarray) -> np.ndarray:
  """sRGB (0..255) -> CIE L*a*b* under D65 (IEC 61966-2-1 transfer curve, CIE 1976 Lab)."""
  c = np.asarray(rgb_Nx3, np.float64) / 255.0
  lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
  t = lin @ _SRGB_TO_XYZ.T / _WHITE_D65
  eps = (6 / 29) ** 3
  f = np.where(t > eps, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
  return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                   200 * (f[..., 1] - f[..., 2])], -1)


def ciede2000(lab1_Nx3: np.ndarray, lab2_Nx3: np.ndarray) -> np.ndarray:
  """CIEDE2000 colour difference (kL = kC = kH = 1), following Sharma, Wu & Dalal (2005), whose
  test data pins it (tests/test_visual_metrics.py)."""
  l1, a1, b1 = np.moveaxis(np.asarray(lab1_Nx3, np.float64), -1, 0)
  l2, a2, b2 = np.moveaxis(np.asarray(lab2_Nx3, np.float64), -1, 0)
  c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
  g = 0.5 * (1 - np.sqrt(c_mean ** 7 / (c_mean ** 7 + 25.0 ** 7)))
  a1p, a2p = (1 + g) * a1, (1 + g) * a2
  c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
  h1p = np.where(c1p == 0, 0.0, np.degrees(np.arctan2(b1, a1p)) % 360)
  h2p = np.where(c2p == 0, 0.0, np.degrees(np.arctan2(b2, a2p)) % 360)
  dl, dc = l2 - l1, c2p - c1p
  dh = h2p - h1p
  dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
  dh = np.where(c1p * c2p == 0, 0.0, dh)
  dhh = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh) / 2)
  l_bar, c_bar = (l1 + l2) / 2, (c1p + c2p) / 2
  h_sum = h1p + h2p
  h_bar = np.where(np.abs(h1p - h2p) <= 180, h_sum / 2,
                   np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2))
  h_bar = np.where(c1p * c2p == 0, h_sum, h_bar)
  t = (1 - 0.17 * np.cos(np.radians(h_bar - 30)) + 0.24 * np.cos(np.radians(2 * h_bar))
       + 0.32 * np.cos(np.radians(3 * h_bar + 6)) - 0.20 * np.cos(np.radians(4 * h_bar - 63)))
  d_theta = 30 * np.exp(-(((h_bar - 275) / 25) ** 2))
  r_c = 2 * np.sqrt(c_bar ** 7 / (c_bar ** 7 + 25.0 ** 7))
  s_l = 1 + 0.015 * (l_bar - 50) ** 2 / np.sqrt(20 + (l_bar - 50) ** 2)
  s_c = 1 + 0.045 * c_bar
  s_h = 1 + 0.015 * c_bar * t
  r_t = -np.sin(np.radians(2 * d_theta)) * r_c
  return np.sqrt((dl / s_l) ** 2 + (dc / s_c) ** 2 + (dhh / s_h) ** 2
                 + r_t * (dc / s_c) * (dhh / s_h))


# --------------------------------------------------------------------------- pixels

def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size) - (size - 1) / 2
  w = np.exp(-x ** 2 / (2 * sigma ** 2))
  return w / w.sum()


def _filter_valid(img_HxW: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Separable correlation with window w, 'valid' part only (as Wang et al.'s filter2)."""
  view = np.lib.stride_tricks.sliding_window_view
  rows = view(img_HxW, w.size, axis=1) @ w
  return view(rows, w.size, axis=0) @ w


def ssim(x_HxW: np.ndarray, y_HxW: np.ndarray, data_range: float = 255.0) -> float:
  """Mean SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, over
  the valid part of the image. In [-1, 1]; 1.0 only for equal images."""
  x, y = np.asarray(x_HxW, np.float64), np.asarray(y_HxW, np.float64)
  if x.shape != y.shape or x.ndim != 2 or min(x.shape) < 11:
    raise ValueError(f'ssim: needs two equal 2-D images of at least 11x11, got {x.shape}, '
                     f'{y.shape}')
  w = _gaussian_window()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mx, my = _filter_valid(x, w), _filter_valid(y, w)
  vx = _filter_valid(x * x, w) - mx * mx
  vy = _filter_valid(y * y, w) - my * my
  cxy = _filter_valid(x * y, w) - mx * my
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return float(s.mean())


def screenshot_gray(shot_HxWx3: np.ndarray, size: int = SSIM_SIZE) -> np.ndarray:
  """A screenshot as size x size grayscale (Pillow's ITU-R 601 luma, bilinear resize), float."""
  from PIL import Image  # the render extra; imported when used
  img = Image.fromarray(np.asarray(shot_HxWx3, np.uint8)).convert('L')
  return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), np.float64)


# --------------------------------------------------------------------------- DOM

def height1_subtrees(markup: str) -> set[tuple[str, tuple[str, ...]]] | None:
  """The body's height-1 subtrees, (tag, ordered child tags) of every element with element
  children, body included; None when lxml cannot parse the markup or finds no body."""
  import lxml.etree
  import lxml.html
  if not markup or not markup.strip():
    return None
  try:
    doc = lxml.html.document_fromstring(markup.encode('utf-8', 'replace'),
                                        parser=lxml.html.HTMLParser(encoding='utf-8'))
  except (lxml.etree.ParserError, lxml.etree.XMLSyntaxError, ValueError):
    return None
  body = doc.find('body')
  if body is None:
    return None
  out = set()
  for el in body.iter():
    if not isinstance(el.tag, str):
      continue
    kids = tuple(str(k.tag).lower() for k in el if isinstance(k.tag, str))
    if kids:
      out.add((str(el.tag).lower(), kids))
  return out


def tree_bleu(generated_markup: str, reference_markup: str) -> float:
  """WebCode2M's TreeBLEU: the share of the reference body's distinct height-1 subtrees that occur
  in the generated body (sets, as the paper). Unparsable or empty generated markup: 0; a
  reference without any (no nested elements): 1.0 when the generated markup parses."""
  gen = height1_subtrees(generated_markup)
  if gen is None:
    return 0.0
  ref = height1_subtrees(reference_markup) or set()
  return len(ref & gen) / len(ref) if ref else 1.0


# --------------------------------------------------------------------------- pages

def compare(generated: PageRender, reference: PageRender) -> dict[str, float]:
  """Every metric of METRICS for a generated page against its reference render. A generated page
  that failed or shows nothing scores 0 on all; a reference that failed is an error."""
  if not reference.ok:
    raise ValueError('compare: the reference page did not render')
  if not generated.shows_something():
    return dict.fromkeys(METRICS, 0.0)
  out = {'render_success': 1.0, **block_scores(generated, reference)}
  if generated.screenshot_HxWx3 is None or reference.screenshot_HxWx3 is None:
    out['ssim'] = 0.0
  else:
    s = ssim(screenshot_gray(generated.screenshot_HxWx3),
             screenshot_gray(reference.screenshot_HxWx3))
    out['ssim'] = float(np.clip(s, 0.0, 1.0))
  out['tree_bleu'] = tree_bleu(generated.markup, reference.markup)
  return out


def summarize(results: Sequence[dict[str, float]]) -> dict[str, float]:
  """Means of every metric over pages (failed renders count as 0), plus `pages` and
  `render_failures`; `render_success` is the rate."""
  n = len(results)
  if not n:
    return {'pages': 0.0, 'render_failures': 0.0}
  out = {k: float(np.mean([r[k] for r in results])) for k in METRICS}
  out['pages'] = float(n)
  out['render_failures'] = float(sum(r['render_success'] == 0 for r in results))
  return out
