"""Pix2Struct-style patches of a screenshot: resize keeping the aspect ratio, cut a row-major grid.

The grid is the largest one Pix2Struct's rule allows: with scale = sqrt(max_patches * (ps / h) *
(ps / w)), rows = floor(scale * h / ps) and cols = floor(scale * w / ps), each at least 1, rows at
most max_patches and cols at most max_patches // rows, so rows * cols <= max_patches always.
scale * h / ps equals sqrt(max_patches * h / w), so the floors are computed exactly in integers
(math.isqrt): an image that already fits exactly is never resized by a float rounding.

The image is resized to (rows * ps, cols * ps) with Pillow's BILINEAR filter, as Pix2Struct does
(bilinear with antialiasing): Pillow widens the bilinear kernel when it shrinks, so small text is
averaged rather than aliased. Each patch is flattened in (y, x, channel) order; positions are
0-based (row, col). Pillow (the render extra) is imported only when an image is resized or decoded.
"""
from __future__ import annotations

import io
import math

import numpy as np

MAX_POSITION = np.iinfo(np.int16).max


def grid_shape(height: int, width: int, *, max_patches: int) -> tuple[int, int]:
  """(rows, cols) of the patch grid for an image of height x width (the module docstring's rule)."""
  rows = max(1, min(math.isqrt(max_patches * height // width), max_patches))
  cols = max(1, min(math.isqrt(max_patches * width // height), max_patches // rows))
  return rows, cols


def to_patches(image_HxWx3: np.ndarray, *, patch_size: int,
               max_patches: int) -> tuple[np.ndarray, np.ndarray]:
  """(patches_PxD uint8 [n, ps*ps*3], positions_Px2 int16 [n, 2] = (row, col)), n <= max_patches.

  image_HxWx3: uint8 RGB. Patches are row-major over the grid.
  """
  if patch_size < 1:
    raise ValueError(f'patch_size must be >= 1, got {patch_size}')
  if not 1 <= max_patches <= MAX_POSITION:
    raise ValueError(f'max_patches must be in [1, {MAX_POSITION}], got {max_patches}')
  if image_HxWx3.ndim != 3 or image_HxWx3.shape[2] != 3 or image_HxWx3.dtype != np.uint8:
    raise ValueError(f'image must be HxWx3 uint8, got {image_HxWx3.shape} {image_HxWx3.dtype}')
  height, width = image_HxWx3.shape[:2]
  if height < 1 or width < 1:
    raise ValueError(f'image must be at least 1x1, got {height}x{width}')
  rows, cols = grid_shape(height, width, max_patches=max_patches)
  size_HxW = (rows * patch_size, cols * patch_size)
  if image_HxWx3.shape[:2] == size_HxW:
    resized_HxWx3 = image_HxWx3
  else:
    from PIL import Image
    resized = Image.fromarray(image_HxWx3, 'RGB').resize(
        (size_HxW[1], size_HxW[0]), Image.Resampling.BILINEAR)
    resized_HxWx3 = np.asarray(resized, dtype=np.uint8)
  grid_RxPxCxPx3 = resized_HxWx3.reshape(rows, patch_size, cols, patch_size, 3)
  patches_PxD = grid_RxPxCxPx3.transpose(0, 2, 1, 3, 4).reshape(
      rows * cols, patch_size * patch_size * 3)
  row_P, col_P = np.divmod(np.arange(rows * cols), cols)
  positions_Px2 = np.stack([row_P, col_P], axis=1).astype(np.int16)
  return np.ascontiguousarray(patches_PxD), positions_Px2


def _overlap_PxN(boxes_Nx4, positions_Px2, height: int, width: int):
  """(overlap_PxN: CSS px^2 of each box (x, y, w, h) inside each patch, patch area): the patch
  grid mapped back onto the height x width screenshot it was cut from."""
  rows, cols = (int(v) + 1 for v in positions_Px2.max(axis=0))
  patch_h, patch_w = height / rows, width / cols
  top_P, left_P = positions_Px2[:, 0] * patch_h, positions_Px2[:, 1] * patch_w
  x, y, w, h = np.asarray(boxes_Nx4, np.float64).reshape(-1, 4).T
  span = lambda lo_P, size, start, length: np.clip(
      np.minimum(lo_P[:, None] + size, start + length) - np.maximum(lo_P[:, None], start), 0, None)
  return span(left_P, patch_w, x, w) * span(top_P, patch_h, y, h), patch_h * patch_w


def patch_labels(boxes_Nx6: np.ndarray, positions_Px2: np.ndarray, *, height: int,
                 width: int) -> np.ndarray:
  """Each patch's (section class, element type), int8 [P, 2], -1 for none: the label of the
  smallest box (html_pages.ParsedPage.boxes_Nx6, CSS px) that covers a quarter of the patch or has
  half of itself inside it (so a thin nav bar or a small icon still marks the coarse patch it
  lies in), the patch grid mapped back onto the height x width screenshot it was cut from."""
  out_Px2 = np.full((len(positions_Px2), 2), -1, np.int8)
  if not len(boxes_Nx6):
    return out_Px2
  overlap_PxN, patch_area = _overlap_PxN(boxes_Nx6[:, :4], positions_Px2, height, width)
  area_N = boxes_Nx6[:, 2] * boxes_Nx6[:, 3]
  covers_PxN = ((overlap_PxN >= 0.25 * patch_area) | (overlap_PxN >= 0.5 * area_N)) & (
      overlap_PxN > 0)
  for part in (0, 1):
    label_N = boxes_Nx6[:, 4 + part]
    area_PxN = np.where(covers_PxN & (label_N >= 0), area_N, np.inf)
    smallest_P = area_PxN.argmin(axis=1)
    found_P = np.isfinite(area_PxN[np.arange(len(area_PxN)), smallest_P])
    out_Px2[found_P, part] = label_N[smallest_P[found_P]]
  return out_Px2


def block_patches(boxes_Nx4, positions_Px2: np.ndarray, *, height: int,
                  width: int) -> list[list[int]]:
  """For each text block's box (x, y, w, h, CSS px: render.TextBlock.box), the indices of the
  patches it overlaps at all (patch_labels' mapping of the grid onto the screenshot)."""
  if not len(boxes_Nx4):
    return []
  overlap_PxN, _ = _overlap_PxN(boxes_Nx4, positions_Px2, height, width)
  return [np.flatnonzero(overlap_N > 0).tolist() for overlap_N in overlap_PxN.T]


def word_pairs(patches_per_block, token_ids_per_block) -> np.ndarray:
  """The distinct (patch index, token id) pairs, int32 [num_pairs, 2] sorted: every BPE token of
  each text block paired with every patch the block overlaps (block_patches)."""
  pairs = [np.stack(np.meshgrid(p, t, indexing='ij'), -1).reshape(-1, 2)
           for p, t in zip(patches_per_block, token_ids_per_block, strict=True)
           if len(p) and len(t)]
  if not pairs:
    return np.zeros((0, 2), np.int32)
  return np.unique(np.concatenate(pairs).astype(np.int32), axis=0)


def from_patches(patches_PxD: np.ndarray, positions_Px2: np.ndarray, *,
                 patch_size: int) -> np.ndarray:
  """The resized image (rows*ps x cols*ps x 3) that to_patches cut: its inverse, for checks."""
  rows, cols = (int(v) + 1 for v in positions_Px2.max(axis=0))
  image_HxWx3 = np.zeros((rows * patch_size, cols * patch_size, 3), patches_PxD.dtype)
  for patch_D, (row, col) in zip(patches_PxD, positions_Px2, strict=True):
    y, x = int(row) * patch_size, int(col) * patch_size
    image_HxWx3[y:y + patch_size, x:x + patch_size] = patch_D.reshape(patch_size, patch_size, 3)
  return image_HxWx3


def decode_png(png: bytes) -> np.ndarray:
  """HxWx3 uint8 RGB of an encoded image (PNG from the renderer); an alpha channel is dropped."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(png)) as image:
      return np.asarray(image.convert('RGB'), dtype=np.uint8)
  except (OSError, ValueError) as e:
    raise ValueError(f'not a decodable image ({len(png)} bytes): {e}') from None
