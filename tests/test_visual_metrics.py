"""Tests for phase1_jax.visual_metrics on constructed page pairs with known answers (no browser)."""

import dataclasses

import numpy as np
import pytest

from phase1_jax import visual_metrics as vm

WORDS = ('alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike '
         'november oscar papa quebec romeo sierra tango uniform victor whiskey xray').split()
TAGS = ('p', 'h1', 'h2', 'span', 'li', 'a', 'button')


def _paint(width, height, blocks, background=(255, 255, 255)):
  shot_HxWx3 = np.empty((height, width, 3), np.uint8)
  shot_HxWx3[:] = background
  for b in blocks:
    x, y, w, h = (int(v) for v in b.box)
    shot_HxWx3[y:y + h, x:x + w] = b.colour
  return shot_HxWx3


def _page(blocks, width=400, height=600, markup=None, rng=None):
  """A rendered page whose screenshot shows each block as a rectangle of its colour."""
  if markup is None:
    rng = rng or np.random.default_rng(0)
    items = ''.join(f'<{t}>{b.text}</{t}>' for t, b in
                    zip(rng.choice(TAGS, len(blocks)), blocks))
    markup = f'<html><body><header><nav><a>x</a></nav></header><main>{items}</main></body></html>'
  return vm.PageRender(ok=True, width=width, height=height, blocks=tuple(blocks),
                       screenshot_HxWx3=_paint(width, height, blocks), markup=markup)


def _random_page(rng, n=6):
  """n blocks of distinct random text in rows down the page, random sizes and colours."""
  blocks = []
  for i in range(n):
    words = rng.choice(WORDS, 4, replace=False)
    text = f'{i} ' + ' '.join(words)
    w, h = int(rng.integers(60, 300)), int(rng.integers(15, 60))
    x, y = int(rng.integers(0, 400 - w)), 10 + 95 * i + int(rng.integers(0, 90 - h))
    colour = tuple(int(c) for c in rng.integers(0, 200, 3))
    blocks.append(vm.TextBlock(text, (x, y, w, h), colour))
  return _page(blocks, height=10 + 95 * n, rng=rng)


def _replace(page, i, **changes):
  blocks = list(page.blocks)
  blocks[i] = dataclasses.replace(blocks[i], **changes)
  return _page(blocks, page.width, page.height, markup=page.markup)


@pytest.fixture
def rng():
  return np.random.default_rng()


# ------------------------------------------------------------------------------- pages

def test_identical_pages_score_one_everywhere(rng):
  page = _random_page(rng)
  result = vm.compare(page, page)
  assert set(result) == set(vm.METRICS)
  for k, v in result.items():
    assert v == pytest.approx(1.0, abs=1e-12), k


def test_repeated_texts_match_each_block_to_itself(rng):
  page = _random_page(rng)
  blocks = [dataclasses.replace(b, text='Read more') for b in page.blocks]
  page = _page(blocks, page.width, page.height, markup=page.markup)
  assert vm.compare(page, page)['position'] == pytest.approx(1.0)


def test_one_block_moved_drops_only_position(rng):
  ref = _random_page(rng)
  i = int(rng.integers(len(ref.blocks)))
  x, y, w, h = ref.blocks[i].box
  dx = 400 - w - x if x < (400 - w) / 2 else -x   # to the far side
  gen = _replace(ref, i, box=(x + dx, y, w, h))
  r = vm.compare(gen, ref)
  assert r['position'] == pytest.approx(1 - abs(dx) / 400 / len(ref.blocks))
  assert r['position'] < 1
  for k in ('render_success', 'block_match', 'text', 'colour', 'tree_bleu'):
    assert r[k] == pytest.approx(1.0), k
  assert r['ssim'] < 1   # the pixels moved too


def test_one_text_recoloured_drops_only_colour(rng):
  ref = _random_page(rng)
  i = int(rng.integers(len(ref.blocks)))
  old = ref.blocks[i].colour
  new = tuple(255 - c for c in old)
  gen = _replace(ref, i, colour=new)
  r = vm.compare(gen, ref)
  de = vm.ciede2000(vm.srgb_to_lab(np.array([new])), vm.srgb_to_lab(np.array([old])))[0]
  assert r['colour'] == pytest.approx(1 - min(de / 100, 1) / len(ref.blocks))
  assert r['colour'] < 1
  for k in ('render_success', 'block_match', 'text', 'position', 'tree_bleu'):
    assert r[k] == pytest.approx(1.0), k


def test_block_deleted_drops_block_match_by_its_area_share(rng):
  ref = _random_page(rng)
  i = int(rng.integers(len(ref.blocks)))
  gen = _page(ref.blocks[:i] + ref.blocks[i + 1:], ref.width, ref.height, markup=ref.markup)
  areas = np.array([b.box[2] * b.box[3] for b in ref.blocks], np.float64)
  share = areas[i] / (2 * areas.sum() - areas[i])   # of both pages' total block area
  r = vm.compare(gen, ref)
  assert r['block_match'] == pytest.approx(1 - share)
  for k in ('render_success', 'text', 'position', 'colour', 'tree_bleu'):
    assert r[k] == pytest.approx(1.0), k


def test_edited_text_lowers_text_score():
  ref = _page([vm.TextBlock('Contact us today', (10, 10, 100, 20), (0, 0, 0))])
  gen = _page([vm.TextBlock('Contact us now', (10, 10, 100, 20), (0, 0, 0))])
  assert vm.compare(gen, ref)['text'] == pytest.approx(
      vm.text_similarity('Contact us now', 'Contact us today'))
  far = _page([vm.TextBlock('zzzzzz', (10, 10, 100, 20), (0, 0, 0))])
  r = vm.compare(far, ref)   # below MIN_TEXT_SIMILARITY: nothing matched
  assert [r[k] for k in vm.BLOCK_METRICS] == [0.0] * 4


@pytest.mark.parametrize('failure', ['not_ok', 'blank', 'no_screenshot'])
def test_failed_or_empty_render_scores_zero_without_crash(rng, failure):
  ref = _random_page(rng)
  if failure == 'not_ok':
    gen = vm.PageRender(ok=False, width=0, height=0)
  elif failure == 'blank':
    gen = vm.PageRender(ok=True, width=400, height=600, markup='<p></p>',
                        screenshot_HxWx3=np.full((600, 400, 3), 255, np.uint8))
  else:
    gen = vm.PageRender(ok=True, width=400, height=600, markup='')
  assert vm.compare(gen, ref) == dict.fromkeys(vm.METRICS, 0.0)
  s = vm.summarize([vm.compare(ref, ref), vm.compare(gen, ref)])
  assert s['render_success'] == 0.5 and s['render_failures'] == 1 and s['pages'] == 2
  assert s['block_match'] == pytest.approx(0.5)


def test_reference_failure_is_an_error():
  with pytest.raises(ValueError, match='reference'):
    vm.compare(_page([]), vm.PageRender(ok=False, width=0, height=0))


def test_pages_without_text_agree_on_blocks():
  shot = np.zeros((50, 50, 3), np.uint8)
  shot[10:20] = 200
  page = vm.PageRender(ok=True, width=50, height=50, screenshot_HxWx3=shot,
                       markup='<div><img></div>')
  assert vm.compare(page, page) == dict.fromkeys(vm.METRICS, 1.0)


def test_summarize_means():
  a, b = dict.fromkeys(vm.METRICS, 1.0), dict.fromkeys(vm.METRICS, 0.5)
  s = vm.summarize([a, b])
  assert all(s[k] == 0.75 for k in vm.METRICS)
  assert s['render_failures'] == 0 and s['pages'] == 2
  assert vm.summarize([]) == {'pages': 0.0, 'render_failures': 0.0}


# ------------------------------------------------------------------------------- TreeBLEU

@pytest.mark.parametrize('markup', ['', '   \n'])
def test_unparsable_markup_scores_zero_tree_bleu(markup):
  assert vm.tree_bleu(markup, '<div><p>a</p></div>') == 0.0


def test_tree_bleu_known_value():
  ref = '<body><div><p>a</p><p>b</p></div><ul><li>x</li></ul></body>'
  # ref subtrees: (body: div ul), (div: p p), (ul: li)
  assert vm.height1_subtrees(ref) == {('body', ('div', 'ul')), ('div', ('p', 'p')),
                                      ('ul', ('li',))}
  gen = '<body><div><p>a</p><p>b</p></div><ol><li>x</li></ol></body>'
  assert vm.tree_bleu(gen, ref) == pytest.approx(1 / 3)   # only (div: p p) survives
  assert vm.tree_bleu(ref, ref) == 1.0
  assert vm.tree_bleu('<p>just text</p>', ref) == 0.0


# ------------------------------------------------------------------------------- colour

# Sharma, Wu & Dalal (2005), "The CIEDE2000 color-difference formula: implementation notes,
# supplementary test data, and mathematical observations", Table 1 (pairs 1-4, 7, 13-25, 35-40).
SHARMA = [
    ((50.0000, 2.6772, -79.7751), (50.0000, 0.0000, -82.7485), 2.0425),
    ((50.0000, 3.1571, -77.2803), (50.0000, 0.0000, -82.7485), 2.8615),
    ((50.0000, 2.8361, -74.0200), (50.0000, 0.0000, -82.7485), 3.4412),
    ((50.0000, -1.3802, -84.2814), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, 0.0000, 0.0000), (50.0000, -1.0000, 2.0000), 2.3669),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0009), 7.1792),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0010), 7.1792),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0011), 7.2195),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0012), 7.2195),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0009, -2.4900), 4.8045),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0011, -2.4900), 4.7461),
    ((50.0000, 2.5000, 0.0000), (50.0000, 0.0000, -2.5000), 4.3065),
    ((50.0000, 2.5000, 0.0000), (73.0000, 25.0000, -18.0000), 27.1492),
    ((50.0000, 2.5000, 0.0000), (61.0000, -5.0000, 29.0000), 22.8977),
    ((50.0000, 2.5000, 0.0000), (56.0000, -27.0000, -3.0000), 31.9030),
    ((50.0000, 2.5000, 0.0000), (58.0000, 24.0000, 15.0000), 19.4535),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.1736, 0.5854), 1.0000),
    ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
    ((36.4612, 47.8580, 18.3852), (36.2715, 50.5065, 21.2231), 1.4146),
    ((90.8027, -2.0831, 1.4410), (91.1528, -1.6435, 0.0447), 1.4441),
    ((90.9257, -0.5406, -0.9208), (88.6381, -0.8985, -0.7239), 1.5381),
    ((6.7747, -0.2908, -2.4247), (5.8714, -0.0985, -2.2286), 0.6377),
    ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),
]


def test_ciede2000_matches_sharma_reference_data():
  lab1, lab2, expected = (np.array(v) for v in zip(*SHARMA))
  np.testing.assert_allclose(vm.ciede2000(lab1, lab2), expected, atol=1e-4)
  np.testing.assert_allclose(vm.ciede2000(lab2, lab1), expected, atol=1e-4)   # symmetric
  assert np.all(vm.ciede2000(lab1, lab1) == 0)


def test_srgb_to_lab_known_values():
  lab = vm.srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [128, 128, 128]]))
  np.testing.assert_allclose(lab[0], [100, 0, 0], atol=1e-4)
  np.testing.assert_allclose(lab[1], [0, 0, 0], atol=1e-9)
  np.testing.assert_allclose(lab[2], [53.2408, 80.0925, 67.2032], atol=1e-3)
  np.testing.assert_allclose(lab[3], [53.5850, 0, 0], atol=1e-3)


# ------------------------------------------------------------------------------- SSIM

def test_ssim_identical_is_one(rng):
  x = rng.integers(0, 256, (64, 80)).astype(np.float64)
  assert vm.ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_images_known_value():
  # No variance: SSIM is the luminance term alone, (2 a b + C1) / (a^2 + b^2 + C1).
  c1 = (0.01 * 255) ** 2
  got = vm.ssim(np.full((32, 32), 100.0), np.full((32, 32), 150.0))
  assert got == pytest.approx((2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1), rel=1e-12)


def test_ssim_inverted_structure_is_negative(rng):
  # y = 2m - x with a flat mean m: equal means and variances, covariance -var.
  x = 128 + 60 * rng.choice([-1.0, 1.0], (48, 48))
  assert vm.ssim(x, 256 - x) < -0.9


def test_ssim_noise_lowers_it_monotonically(rng):
  x = rng.integers(0, 256, (64, 64)).astype(np.float64)
  x = vm._filter_valid(np.pad(x, 5, mode='reflect'), vm._gaussian_window()) # smooth content
  scores = [vm.ssim(x, np.clip(x + s * rng.standard_normal(x.shape), 0, 255))
            for s in (0, 5, 20, 60)]
  assert scores[0] == pytest.approx(1.0)
  assert all(a > b for a, b in zip(scores, scores[1:]))
  assert vm.ssim(x, x + 5) == pytest.approx(vm.ssim(x + 5, x))   # symmetric


def test_ssim_screenshots_of_any_size(rng):
  a = rng.integers(0, 256, (700, 400, 3), dtype=np.uint8)
  gray = vm.screenshot_gray(a)
  assert gray.shape == (vm.SSIM_SIZE, vm.SSIM_SIZE)
  with pytest.raises(ValueError):
    vm.ssim(np.zeros((5, 5)), np.zeros((5, 5)))
