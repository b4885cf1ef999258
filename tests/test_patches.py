"""phase1_jax.data.patches: grid sizes, exact patch contents, positions, round trip, PNG decode."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from phase1_jax.data import patches


def _noise(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize('height,width', [
    (4000, 30),    # very tall
    (20, 5000),    # very wide
    (1, 1),        # tiny
    (1, 700),      # one pixel tall, wide
    (768, 1024),   # a screenshot
    (2048, 1024),  # a capped full page
    (64, 96),      # exact fit below
])
@pytest.mark.parametrize('max_patches', [1, 6, 64, 2048])
def test_shapes_and_grid_bounds(height, width, max_patches):
  ps = 16
  patches_PxD, positions_Px2 = patches.to_patches(
      _noise(height, width), patch_size=ps, max_patches=max_patches)
  rows, cols = patches.grid_shape(height, width, max_patches=max_patches)
  n = rows * cols
  assert patches_PxD.shape == (n, ps * ps * 3) and patches_PxD.dtype == np.uint8
  assert positions_Px2.shape == (n, 2) and positions_Px2.dtype == np.int16
  assert 1 <= n <= max_patches
  # Near the budget: one more row and one more column would not fit.
  assert (rows + 1) * (cols + 1) > max_patches
  # The grid follows the image's aspect ratio (Pix2Struct's floors, unless clipped).
  assert rows == max(1, min(math.floor(math.sqrt(max_patches * height / width) + 1e-9),
                            max_patches))


def test_aspect_ratio_is_kept_when_not_clipped():
  rows, cols = patches.grid_shape(768, 1024, max_patches=2048)
  assert (rows, cols) == (39, 52)
  assert abs(rows / cols - 768 / 1024) < 0.02
  assert patches.grid_shape(4000, 30, max_patches=64) == (64, 1)
  assert patches.grid_shape(30, 4000, max_patches=64) == (1, 64)


def test_exact_fit_is_not_resized_and_patches_are_the_slices():
  ps, rows, cols = 4, 3, 5
  image_HxWx3 = _noise(rows * ps, cols * ps, seed=3)
  patches_PxD, positions_Px2 = patches.to_patches(image_HxWx3, patch_size=ps,
                                                  max_patches=rows * cols)
  assert patches_PxD.shape == (rows * cols, ps * ps * 3)
  for k in range(rows * cols):
    r, c = divmod(k, cols)
    assert tuple(positions_Px2[k]) == (r, c)
    expected_PxPx3 = image_HxWx3[r * ps:(r + 1) * ps, c * ps:(c + 1) * ps]
    np.testing.assert_array_equal(patches_PxD[k], expected_PxPx3.reshape(-1))
  # (y, x, channel) order inside a patch: the first 3 values are the top-left pixel's RGB.
  np.testing.assert_array_equal(patches_PxD[cols + 1][:3], image_HxWx3[ps, ps])
  np.testing.assert_array_equal(patches_PxD[0][3:6], image_HxWx3[0, 1])
  np.testing.assert_array_equal(patches_PxD[0][ps * 3:ps * 3 + 3], image_HxWx3[1, 0])


def test_positions_are_row_major_row_col():
  _, positions_Px2 = patches.to_patches(_noise(300, 500), patch_size=16, max_patches=40)
  rows, cols = patches.grid_shape(300, 500, max_patches=40)
  expected = [(r, c) for r in range(rows) for c in range(cols)]
  assert [tuple(p) for p in positions_Px2.tolist()] == expected


def test_round_trip_reassembles_the_resized_image():
  ps, height, width, max_patches = 8, 123, 457, 50
  image_HxWx3 = _noise(height, width, seed=1)
  patches_PxD, positions_Px2 = patches.to_patches(image_HxWx3, patch_size=ps,
                                                  max_patches=max_patches)
  rows, cols = patches.grid_shape(height, width, max_patches=max_patches)
  resized_HxWx3 = np.asarray(Image.fromarray(image_HxWx3).resize(
      (cols * ps, rows * ps), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(
      patches.from_patches(patches_PxD, positions_Px2, patch_size=ps), resized_HxWx3)


def test_a_flat_colour_survives_resizing():
  image_HxWx3 = np.broadcast_to(np.array([12, 200, 34], np.uint8), (333, 777, 3)).copy()
  patches_PxD, _ = patches.to_patches(image_HxWx3, patch_size=16, max_patches=100)
  np.testing.assert_array_equal(patches_PxD.reshape(-1, 3), np.tile([12, 200, 34], (
      patches_PxD.size // 3, 1)))


@pytest.mark.parametrize('kwargs,message', [
    (dict(patch_size=0, max_patches=4), 'patch_size'),
    (dict(patch_size=16, max_patches=0), 'max_patches'),
    (dict(patch_size=16, max_patches=40000), 'max_patches'),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
  with pytest.raises(ValueError, match=message) as e:
    patches.to_patches(_noise(10, 10), **kwargs)
  assert '\n' not in str(e.value)


def test_bad_images_are_rejected():
  with pytest.raises(ValueError, match='HxWx3 uint8'):
    patches.to_patches(np.zeros((4, 4, 4), np.uint8), patch_size=2, max_patches=4)
  with pytest.raises(ValueError, match='HxWx3 uint8'):
    patches.to_patches(np.zeros((4, 4, 3), np.float32), patch_size=2, max_patches=4)
  with pytest.raises(ValueError, match='at least 1x1'):
    patches.to_patches(np.zeros((0, 4, 3), np.uint8), patch_size=2, max_patches=4)


def test_decode_png_drops_alpha():
  rgba_HxWx4 = np.zeros((5, 7, 4), np.uint8)
  rgba_HxWx4[..., 0], rgba_HxWx4[..., 1], rgba_HxWx4[..., 2], rgba_HxWx4[..., 3] = 10, 20, 30, 0
  buffer = io.BytesIO()
  Image.fromarray(rgba_HxWx4, 'RGBA').save(buffer, format='PNG')
  image_HxWx3 = patches.decode_png(buffer.getvalue())
  assert image_HxWx3.shape == (5, 7, 3) and image_HxWx3.dtype == np.uint8
  assert (image_HxWx3 == [10, 20, 30]).all()
  with pytest.raises(ValueError, match='not a decodable image'):
    patches.decode_png(b'not a png')


def test_patch_labels_take_the_smallest_box_covering_the_patch():
  """A 4 x 4 grid of 10 px patches over a 40 x 40 px screenshot: a section over the top half, a
  nested section, an element filling one patch, a small icon inside one patch, a thin bar
  covering a third of a row; -1 where no box counts."""
  positions = np.stack(np.divmod(np.arange(16), 4), axis=1).astype(np.int16)
  boxes = np.array([[0, 0, 40, 20, 0, -1],     # section 0: rows 0-1
                    [20, 0, 20, 20, 3, -1],    # section 3 inside it: columns 2-3
                    [20, 10, 10, 10, -1, 5],   # element type 5: row 1, column 2
                    [2, 12, 3, 3, -1, 7],      # a 3 x 3 icon, all inside row 1, column 0
                    [0, 33, 40, 4, 1, -1],     # a 4 px bar in row 3 (40% of each patch)
                    [0, 22, 40, 1, 2, -1]],    # a 1 px line in row 2: 10% of each patch
                   np.float32)
  labels = patches.patch_labels(boxes, positions, height=40, width=40).reshape(4, 4, 2)
  assert labels.dtype == np.int8
  np.testing.assert_array_equal(labels[..., 0], [[0, 0, 3, 3], [0, 0, 3, 3], [-1] * 4, [1] * 4])
  np.testing.assert_array_equal(labels[..., 1], [[-1] * 4, [7, -1, 5, -1], [-1] * 4, [-1] * 4])
  # The same boxes on a screenshot half as tall: each patch row spans 5 px.
  short = patches.patch_labels(boxes, positions, height=20, width=40).reshape(4, 4, 2)
  np.testing.assert_array_equal(short[..., 0], [[0, 0, 3, 3]] * 4)
  assert (patches.patch_labels(np.zeros((0, 6), np.float32), positions, height=40,
                               width=40) == -1).all()
