"""Image grids: many small images (filters, centroids, patches) tiled into one PNG.

Pure numpy plus Pillow for the file: a grid is drawn pixel for pixel, each
tile upscaled by an integer factor with nearest-neighbour sampling so that a
3x3 filter or an 8x8 digit stays crisp. Layout, so a caller (or a test) can
predict the size: `cols` tiles per row, rows = ceil(n / cols), each tile
h*zoom x w*zoom pixels, `gap` pixels of background between and around tiles:

  width  = cols * w * zoom + (cols + 1) * gap
  height = rows * h * zoom + (rows + 1) * gap
"""

from __future__ import annotations

import math
import os

import numpy as np

GAP = 2
BACKGROUND = (64, 64, 64)  # dark grey between tiles
FRAME = (220, 40, 40)      # the frame marking a tile (e.g. the original image)


def square_cols(n: int) -> int:
  """Columns of a near-square grid of n tiles: ceil(sqrt(n))."""
  return max(1, math.ceil(math.sqrt(n)))


def zoom_for(tile_hw, target_px: int) -> int:
  """Integer upscaling that brings a tile's larger side near `target_px` (at least 1)."""
  return max(1, target_px // max(tile_hw))


def grid_size(n: int, tile_hw, cols: int, zoom: int, gap: int = GAP) -> tuple[int, int]:
  """(width, height) in pixels of `tile`'s output (see the module docstring)."""
  rows = -(-n // cols)
  h, w = tile_hw
  return cols * w * zoom + (cols + 1) * gap, rows * h * zoom + (rows + 1) * gap


def normalize_each(x: np.ndarray) -> np.ndarray:
  """Min-max normalises every item of x [N, ...] to [0, 1] on its own.

  Filters and centroids have arbitrary scale and sign; per-item stretching
  shows each one's structure. A constant item becomes 0.5 (mid grey).
  """
  x = np.asarray(x, np.float64)
  flat = x.reshape(len(x), -1)
  low = flat.min(axis=1, keepdims=True)
  span = flat.max(axis=1, keepdims=True) - low
  out = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1.0), 0.5)
  return out.reshape(x.shape)


def to_rgb(images: np.ndarray) -> np.ndarray:
  """[N, h, w, C] with C = 1 (grey) or 3 -> [N, h, w, 3]; ValueError for other C."""
  c = images.shape[-1]
  if c == 3:
    return images
  if c == 1:
    return np.repeat(images, 3, axis=-1)
  raise ValueError(f'cannot show images with {c} channels (only 1 or 3)')


def tile(images: np.ndarray, *, cols: int, zoom: int, gap: int = GAP,
         framed: tuple[int, ...] = ()) -> np.ndarray:
  """Tiles float images [N, h, w, C] in [0, 1] into a uint8 RGB grid [H, W, 3].

  Tiles whose index is in `framed` get a coloured frame drawn in the gap
  around them (needs gap >= 1).
  """
  images = to_rgb(np.clip(np.asarray(images, np.float64), 0.0, 1.0))
  n, h, w, _ = images.shape
  width, height = grid_size(n, (h, w), cols, zoom, gap)
  out = np.empty((height, width, 3), np.uint8)
  out[:] = BACKGROUND
  big = np.round(255 * images).astype(np.uint8).repeat(zoom, axis=1).repeat(zoom, axis=2)
  th, tw = h * zoom, w * zoom
  for i in range(n):
    r, c = divmod(i, cols)
    top, left = gap + r * (th + gap), gap + c * (tw + gap)
    if i in framed and gap:
      out[top - gap:top + th + gap, left - gap:left + tw + gap] = FRAME
    out[top:top + th, left:left + tw] = big[i]
  return out


def upscale(image: np.ndarray, min_width: int) -> np.ndarray:
  """Nearest-neighbour integer upscaling of uint8 [H, W, C] to at least `min_width` wide."""
  factor = max(1, -(-min_width // image.shape[1]))
  return image.repeat(factor, axis=0).repeat(factor, axis=1)


def save_png(path: str, image: np.ndarray) -> tuple[int, int]:
  """Writes uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] as PNG; returns (width, height)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'a picture must be uint8, got {image.dtype}')
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
    raise ValueError(f'a picture must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; '
                     f'got shape {image.shape}')
  from PIL import Image  # pylint: disable=g-import-not-at-top  (only pictures need Pillow)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  Image.fromarray(image).save(path, optimize=True)
  return image.shape[1], image.shape[0]
