"""Pictures that are grids of images: filters, centroids, augmentations, a method's own.

Each function takes the loaded `Context`, writes its PNG file(s) into
`ctx.out_dir` and returns `page` entries, or raises `context.Skip` when the
picture does not apply to the run.

References:
  Coates, Lee & Ng, "An analysis of single-layer networks in unsupervised
    feature learning", AISTATS 2011 (k-means centroids as patches).
"""

from __future__ import annotations

import collections.abc
import functools
import os
import re

import jax
import numpy as np

from sslj.data import augment
from sslj.methods import base
from sslj.ops import image_grid as grids
from sslj.viz.context import Context, Skip
from sslj.viz.page import Picture, Skipped

FILTER_PX = 48        # a filter tile's side is about this many pixels
CENTROID_PX = 30
IMAGE_PX = 96         # an augmented image's side
MAX_CENTROIDS = 400   # centroids shown (the first ones stored)
NUM_AUGMENTATIONS = 31
HOOK_MIN_WIDTH = 400  # a method's own picture is upscaled to at least this width
RANDOM_FILTERS = 2000  # i.i.d. Gaussian filters drawn for the smoothness reference


def _path(ctx: Context, name: str) -> str:
  return os.path.join(ctx.out_dir, f'{name}.png')


def _natural_key(path: tuple[str, ...]):
  """'Conv_2' before 'Conv_10': compare digit runs as numbers."""
  return [[int(t) if t.isdigit() else t for t in re.split(r'(\d+)', part)] for part in path]


def conv_kernels(params, in_channels: int) -> list[tuple[tuple[str, ...], np.ndarray]]:
  """The 4-D convolution kernels [kh, kw, in, out] reading `in_channels` channels.

  Only the first layer of a network reads the image's channels (1 or 3) in
  every model here, so this finds it whatever the module is called; several
  matches come in natural order of their parameter paths.
  """
  found = []

  def walk(tree, path):
    if isinstance(tree, collections.abc.Mapping):
      for key, value in tree.items():
        walk(value, path + (str(key),))
    elif path and path[-1] == 'kernel' and getattr(tree, 'ndim', 0) == 4 \
        and tree.shape[2] == in_channels:
      found.append((path, tree))

  walk(params, ())
  return sorted(found, key=lambda item: _natural_key(item[0]))


def neighbour_correlation(tiles: np.ndarray) -> np.ndarray:
  """How smooth each filter is: one number per filter in [-1, 1].

  `tiles` is [filters, kh, kw, channels]. For each filter, the (Pearson)
  correlation between horizontally adjacent taps and between vertically
  adjacent taps, pooled over channels; the larger of the two, so bars and
  edges in either direction count. Filters that are noise score near 0,
  edges, bars and blobs well above; a constant filter scores 0.
  """
  x = np.asarray(tiles, np.float64)

  def corr(a, b):
    a = a.reshape(len(x), -1)
    b = b.reshape(len(x), -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), 0.0)

  return np.maximum(corr(x[:, :, :-1], x[:, :, 1:]), corr(x[:, :-1], x[:, 1:]))


@functools.lru_cache(maxsize=8)
def random_neighbour_correlation(shape: tuple[int, int, int]) -> np.ndarray:
  """`neighbour_correlation` of i.i.d. Gaussian filters of `shape` (kh, kw, channels)."""
  rng = np.random.default_rng(0)
  return neighbour_correlation(rng.standard_normal((RANDOM_FILTERS,) + tuple(shape)))


def filters(ctx: Context) -> list:
  """First-layer convolution filters of the reported network, each normalised on its own."""
  run = ctx.need_run()
  params = ctx.network().variables['params']
  whose = f"the reported network ('{run.method.reported_model}')"
  channels = ctx.need_data().labeled_images.shape[-1]
  kernels = conv_kernels(params, channels)
  if not kernels:
    raise Skip(f'the network has no convolution reading the {channels} image channels')
  path, kernel = kernels[0]
  kernel = np.asarray(jax.device_get(kernel), np.float64)
  kh, kw, cin, cout = kernel.shape
  tiles = kernel.transpose(3, 0, 1, 2)  # [out, kh, kw, in]
  if cin not in (1, 3):
    tiles = tiles.mean(axis=-1, keepdims=True)
  cols = grids.square_cols(cout)
  image = grids.tile(grids.normalize_each(tiles), cols=cols, zoom=grids.zoom_for((kh, kw), FILTER_PX))
  size = grids.save_png(_path(ctx, 'filters'), image)
  kind = 'RGB' if cin == 3 else 'grey'
  smooth = neighbour_correlation(tiles)
  noise = random_neighbour_correlation(tiles.shape[1:])
  above = int((smooth > np.quantile(noise, 0.95)).sum())
  return [Picture(
      'filters', 'filters.png', 'First-layer convolution filters',
      f'The {cout} {kh}x{kw} filters of the first convolution ({"/".join(path[:-1])}) of '
      f'{whose}, as {kind} images, each stretched to its own min..max range (so contrast is '
      'comparable within a filter, not between filters). Structure, measured as the '
      'correlation of adjacent taps (the larger of horizontal and vertical): median '
      f'{np.median(smooth):.2f} against {np.median(noise):.2f} for random Gaussian filters '
      f'of this shape; {above} of {cout} filters are smoother than 95% of random ones.',
      ctx.checkpoint_source(), size,
      numbers={'num_filters': cout, 'kernel_shape': kernel.shape,
               'neighbour_correlation': smooth, 'random_median': float(np.median(noise)),
               'smoother_than_random': above},
      crisp=True)]


def unwhiten(centroids: np.ndarray, mean: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """Undoes ZCA whitening y = (x - mean) @ matrix: x = y @ matrix^-1 + mean (float64)."""
  centroids = np.asarray(centroids, np.float64)
  matrix = np.asarray(matrix, np.float64)
  return np.linalg.solve(matrix.T, centroids.T).T + np.asarray(mean, np.float64)


def _patch_shape(saved: dict, d: int, channels: int | None) -> tuple[int, int, int]:
  if 'patch_shape' in saved:
    return tuple(int(v) for v in saved['patch_shape'])
  for c in ([channels] if channels else []) + [1, 3]:
    p = int(round((d / c) ** 0.5))
    if p * p * c == d:
      return p, p, c
  raise ValueError(f'cannot tell the patch shape of {d}-value centroids (no patch_shape saved)')


def centroids(ctx: Context) -> list:
  """k-means centroids as p x p patches, from the run's `DIR/centroids.npz`.

  A method that learns patch centroids saves them there (arrays 'centroids'
  [K, p*p*C], and optionally 'zca_mean', 'zca_matrix' and 'patch_shape').
  """
  path = os.path.join(ctx.workdir, 'centroids.npz')
  if not os.path.exists(path):
    raise Skip('no centroids.npz in the run directory (methods that learn k-means patch '
               'centroids save them there when k-means has finished)')
  with np.load(path) as z:
    saved = {k: z[k] for k in z.files}
  cents = np.asarray(saved['centroids'], np.float64)
  total = len(cents)
  shown = min(total, MAX_CENTROIDS)
  channels = ctx.data.labeled_images.shape[-1] if ctx.data is not None else None
  p, q, c = _patch_shape(saved, cents.shape[1], channels)
  cols = grids.square_cols(shown)
  zoom = grids.zoom_for((p, q), CENTROID_PX)
  which = f'the first {shown} of {total}' if shown < total else f'all {total}'
  source = f'centroids.npz in the run directory ({total} centroids, {p}x{q} patches)'
  kind = 'RGB' if c == 3 else 'grey'
  out = []
  if 'zca_matrix' in saved and 'zca_mean' in saved:
    plain = unwhiten(cents[:shown], saved['zca_mean'], saved['zca_matrix'])
    image = grids.tile(grids.normalize_each(plain.reshape(shown, p, q, c)), cols=cols, zoom=zoom)
    out.append(Picture(
        'centroids', 'centroids.png', 'k-means centroids (un-whitened)',
        f'{which.capitalize()} k-means centroids as {p}x{q} {kind} patches, mapped back through '
        'the inverse of the saved ZCA whitening into the space of contrast-normalised patches '
        '(x = c W^-1 + mean), each stretched to its own range.', source,
        grids.save_png(_path(ctx, 'centroids'), image), numbers={'shown': shown, 'total': total},
        crisp=True))
  whitened_name = 'centroids_whitened' if out else 'centroids'
  image = grids.tile(grids.normalize_each(cents[:shown].reshape(shown, p, q, c)), cols=cols,
                     zoom=zoom)
  note = ('as k-means found them, in ZCA-whitened space (how Coates et al. show them: '
          'whitening turns them into edge- and blob-like filters)') if out else (
              'shown whitened: no ZCA matrix was saved, so they cannot be mapped back to pixels')
  out.append(Picture(
      whitened_name, f'{whitened_name}.png', 'k-means centroids (whitened)',
      f'{which.capitalize()} k-means centroids as {p}x{q} {kind} patches, {note}; each '
      'stretched to its own range.', source, grids.save_png(_path(ctx, whitened_name), image),
      numbers={'shown': shown, 'total': total}, crisp=True))
  return out


# Jitted once: eagerly, each vmapped op is dispatched on its own (seconds on a CPU).
_augment = jax.jit(augment.augment_batch, static_argnums=2)


def augmentations(ctx: Context) -> list:
  """One labelled training image and many draws of the run's own training augmentation."""
  data = ctx.need_data()
  if ctx.is_pipeline:
    # A pipeline method (k-means features + SVM) trains no network and never
    # reads config.augment: a picture of it would show something it never did.
    raise Skip(f'{ctx.config.method} trains no network, so it uses no training augmentation')
  spec = augment.AugmentSpec.from_config(ctx.config.augment)
  if spec == augment.AugmentSpec(out_size=spec.out_size, fill_mode=spec.fill_mode):
    raise Skip('the run trains without augmentation (every option of config.augment is off)')
  rng = np.random.default_rng(ctx.options.seed)
  index = int(rng.integers(len(data.labeled_images)))
  image = data.labeled_images[index]
  key = jax.random.key(ctx.options.seed)
  drawn = _augment(np.repeat(image[None], NUM_AUGMENTATIONS, 0), key, spec)
  if spec.out_size:  # the original as the network sees it in evaluation
    original = _augment(image[None], key, spec.for_eval())
  else:
    original = image[None].astype(np.float32) / 255
  tiles = np.concatenate([np.asarray(original), np.asarray(drawn)])
  cols = 8
  grid = grids.tile(tiles, cols=cols, zoom=grids.zoom_for(tiles.shape[1:3], IMAGE_PX),
                    framed=(0,))
  label = data.class_names[int(data.labeled_labels[index])]
  return [Picture(
      'augmentations', 'augmentations.png', 'Augmentation samples',
      f"Top left, framed in red: labelled training image #{index} (class '{label}'). The other "
      f'{NUM_AUGMENTATIONS}: independent draws of the augmentation the run trains with '
      f'({spec.describe()}), as sslj.data.augment.augment_batch applies it on the devices.',
      "config.json's augment settings", grids.save_png(_path(ctx, 'augmentations'), grid),
      numbers={'index': index}, crisp=True)]


def method_pictures(ctx: Context) -> list:
  """The method's own pictures (`Definition.pictures`: GAN samples, FixMatch's views, ...)."""
  hook = ctx.method.pictures
  name = ctx.config.method
  if hook is None:
    raise Skip(f'{name} declares no pictures of its own')
  state = ctx.run.state if ctx.run is not None else None
  try:
    made = hook(state, ctx.config, ctx.need_data(), ctx.options.seed)
  except base.NotApplicable as e:
    raise Skip(str(e)) from None
  if not isinstance(made, collections.abc.Mapping):
    raise TypeError(f'the pictures of {name} are a {type(made).__name__}, not a dict of '
                    '{title: uint8 image}')
  source = ctx.checkpoint_source() if state is not None else "the run's config and data"
  out = []
  for key, value in made.items():
    stem = f"{ctx.config.method}_{re.sub(r'[^A-Za-z0-9_-]+', '_', str(key))}"
    caption = f'{key}, drawn by {name} from {source}.'
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
      value, caption = value
    try:
      image = np.asarray(value)
      if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f'expected a uint8 [H, W] or [H, W, C] image, got {image.dtype} '
                         f'{image.shape}')
      big = grids.upscale(image if image.ndim == 3 else image[..., None], HOOK_MIN_WIDTH)
      size = grids.save_png(_path(ctx, stem), big)
    except ValueError as e:
      out.append(Skipped(stem, str(key), f'the pictures of {name} gave a bad picture: {e}'))
      continue
    out.append(Picture(stem, f'{stem}.png', str(key), caption, source, size, crisp=True))
  if not out:
    raise Skip(f'the pictures of {name} are empty')
  return out
