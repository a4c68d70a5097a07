"""On-device image augmentation: pure JAX, jit-able, one key per example.

`augment_batch` turns a uint8 batch into float32 images in [0, 1]. Every
geometric option (flip, rotation, scale, translation, pad-and-crop, random
resized crop, output resize) is folded into ONE affine map per example and
applied with one bilinear resampling, so stacking options neither blurs the
image more nor costs more passes. Colour jitter follows: brightness and
contrast with dm-pix, saturation and hue with branch-free forms of the same
HSV definitions (`sslj.data.color`, which says why). Parameters
are drawn per example by `sample_params` (exposed so tests and pictures can
inspect them); the map is built by `affine_matrix` and applied by `warp`.

Why not dm-pix `affine_transform`: it keeps the input size (no resize in the
same pass), interpolates over the channel axis too (8 gathers per value
instead of 4), and its mirror modes go through `map_coordinates`, which its
own docs call slow on accelerators. `warp` gathers whole pixels with the
same pixel-index convention (the tests check it against dm-pix).

Conventions: pixel (i, j) has its centre at index coordinates (i, j); the
image centre is ((H-1)/2, (W-1)/2). A positive angle turns the content
counter-clockwise as displayed (np.rot90 is +90 degrees); a positive shift
moves the content down/right (np.roll).

References:
  Dosovitskiy et al. Discriminative Unsupervised Feature Learning with
    Exemplar Convolutional Neural Networks. NIPS 2014 / TPAMI 2016 (scale
    0.7-1.4, rotation up to 20 degrees, translation, colour).
  Szegedy et al. Going Deeper with Convolutions. CVPR 2015 (random resized
    crop: area 8%-100%, aspect ratio 3/4-4/3).
  Laine, Aila. Temporal Ensembling for Semi-Supervised Learning. ICLR 2017;
    Tarvainen, Valpola. Mean teachers are better role models. NeurIPS 2017
    (random translations with mirrored borders and horizontal flips).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from sslj.data.color import adjust_hue, adjust_saturation
from sslj.errors import UserError

FILL_MODES = ('symmetric', 'edge', 'constant')
_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)
# Random resized crop redraws this many candidate boxes and keeps the first
# that fits inside the image (all drawn at once, so no data-dependent loop).
_CROP_TRIES = 10


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """Which augmentations to apply; every field's default turns it off.

  Attributes:
    flip: horizontal flip with probability 1/2.
    rotate_deg: rotation angle uniform in [-rotate_deg, rotate_deg] degrees.
    translate: shift uniform in +-translate * size, per axis, in pixels.
    scale: zoom factor uniform in [scale[0], scale[1]]; > 1 enlarges content.
    crop_scale: random resized crop: box area fraction uniform in this range,
      log aspect ratio (width / height) uniform in log(crop_ratio); the box is
      resampled to the output size. None turns it off.
    crop_ratio: aspect ratio range of the random resized crop.
    brightness: additive brightness delta uniform in [-b, b] (dm-pix / TF).
    contrast: contrast factor uniform in [max(0, 1-c), 1+c].
    saturation: saturation factor uniform in [max(0, 1-s), 1+s]; RGB only.
    hue: hue shift uniform in [-h, h] turns (h <= 0.5); RGB only.
    out_size: resample to out_size x out_size (e.g. 224); None keeps H x W.
    pad_crop: integer shift uniform in [-pad_crop, pad_crop] per axis, the
      pad-and-random-crop idiom of CIFAR training.
    fill_mode: what lies outside the image: 'symmetric' (mirror about the
      border, as reflect-padded crops do; no artificial edges), 'edge'
      (repeat the border pixel) or 'constant' (zero).
    noise_std: std of Gaussian noise added to the *normalised* input (the
      input noise of the Pi-model, Temporal Ensembling and Mean Teacher:
      0.15); applied by the methods' preprocessing, not by `augment_batch`.
  Saturation and hue are skipped for images without 3 channels, so one spec
  serves grey and colour datasets alike.
  """
  flip: bool = False
  rotate_deg: float = 0.0
  translate: float = 0.0
  scale: tuple[float, float] = (1.0, 1.0)
  crop_scale: tuple[float, float] | None = None
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  hue: float = 0.0
  out_size: int | None = None
  pad_crop: int = 0
  fill_mode: str = 'symmetric'
  noise_std: float = 0.0

  def __post_init__(self):
    # Lists from configs become tuples, keeping the spec hashable for jit.
    for name in ('scale', 'crop_scale', 'crop_ratio'):
      value = getattr(self, name)
      if value is not None:
        value = tuple(float(v) for v in value)
        if len(value) != 2 or not value[0] <= value[1]:
          raise UserError(f'augment.{name}={value}: give a pair (low, high) '
                          'with low <= high')
        object.__setattr__(self, name, value)
    for name in ('rotate_deg', 'translate', 'brightness', 'contrast',
                 'saturation', 'hue', 'noise_std'):
      if not getattr(self, name) >= 0:
        raise UserError(f'augment.{name}={getattr(self, name)}: must be >= 0')
    checks = [
        (self.rotate_deg <= 180, 'rotate_deg must be at most 180'),
        (self.translate < 1, 'translate is a fraction of the size; use < 1'),
        (self.scale[0] > 0, 'scale must be positive'),
        (self.crop_scale is None or 0 < self.crop_scale[0]
         and self.crop_scale[1] <= 1, 'crop_scale must lie in (0, 1]'),
        (self.crop_ratio[0] > 0, 'crop_ratio must be positive'),
        (self.hue <= 0.5, 'hue is in turns; use at most 0.5'),
        (self.out_size is None or int(self.out_size) == self.out_size > 0,
         'out_size must be a positive integer or None'),
        (int(self.pad_crop) == self.pad_crop >= 0,
         'pad_crop must be a non-negative integer'),
        (self.fill_mode in FILL_MODES, f'fill_mode must be one of {FILL_MODES}'),
    ]
    for ok, message in checks:
      if not ok:
        raise UserError(f'bad augmentation spec: {message} (got {self})')
    object.__setattr__(self, 'pad_crop', int(self.pad_crop))
    if self.out_size is not None:
      object.__setattr__(self, 'out_size', int(self.out_size))

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | None) -> AugmentSpec:
    """The spec from a ConfigDict or mapping whose keys are field names."""
    if cfg is None:
      return cls()
    items = dict(cfg.items())
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(items) - set(names))
    if unknown:
      raise UserError(f'unknown augmentation option(s) {", ".join(unknown)}; '
                      f'valid options: {", ".join(names)}')
    return cls(**items)

  @property
  def geometric(self) -> bool:
    """Whether a resampling is needed (a flip alone is an exact reversal)."""
    return (self.rotate_deg > 0 or self.translate > 0 or self.pad_crop > 0
            or self.scale != (1.0, 1.0) or self.crop_scale is not None
            or self.out_size is not None)

  def for_eval(self) -> AugmentSpec:
    """The deterministic part (the resize) to apply to evaluation images."""
    return AugmentSpec(out_size=self.out_size, fill_mode=self.fill_mode)

  def describe(self) -> str:
    """The fields that differ from the defaults, as 'name=value, ...' (or 'none')."""
    default = AugmentSpec()
    return ', '.join(f'{f.name}={getattr(self, f.name)}' for f in dataclasses.fields(self)
                     if getattr(self, f.name) != getattr(default, f.name)) or 'none'


class AugmentParams(NamedTuple):
  """One example's random draws (leading batch axis when vmapped)."""
  flip: jax.Array        # bool
  angle: jax.Array       # radians
  scale: jax.Array       # zoom factor
  shift: jax.Array       # [2] (dy, dx) pixels, translate and pad_crop summed
  crop_hw: jax.Array     # [2] crop box height, width in input pixels
  crop_center: jax.Array  # [2] box centre offset from the image centre
  brightness: jax.Array  # additive delta
  contrast: jax.Array    # factor
  saturation: jax.Array  # factor
  hue: jax.Array         # turns


def sample_params(key: jax.Array, spec: AugmentSpec,
                  in_hw: tuple[int, int]) -> AugmentParams:
  """Draws one example's augmentation parameters (identity where off)."""
  size = jnp.array(in_hw, jnp.float32)
  k_main, k_pad, k_crop = jax.random.split(key, 3)
  # One draw of 9 uniforms rather than 9 draws: each random call is a
  # separate threefry computation, slow to compile on XLA:CPU.
  u = jax.random.uniform(k_main, (9,), jnp.float32)

  def between(ui, low, high):
    return low + (high - low) * ui

  def sym(ui, bound):
    return between(ui, -bound, bound)

  def factor(ui, strength):
    return between(ui, max(0.0, 1 - strength), 1 + strength)

  shift = sym(u[3:5], spec.translate) * size
  if spec.pad_crop:
    shift += jax.random.randint(k_pad, (2,), -spec.pad_crop,
                                spec.pad_crop + 1).astype(jnp.float32)
  crop_hw, crop_center = size, jnp.zeros((2,), jnp.float32)
  if spec.crop_scale is not None:
    crop_hw, crop_center = _sample_crop(k_crop, spec, size)
  return AugmentParams(
      flip=(u[0] < 0.5) & spec.flip,
      angle=sym(u[1], math.radians(spec.rotate_deg)),
      scale=between(u[2], *spec.scale),
      shift=shift,
      crop_hw=crop_hw,
      crop_center=crop_center,
      brightness=sym(u[5], spec.brightness),
      contrast=factor(u[6], spec.contrast),
      saturation=factor(u[7], spec.saturation),
      hue=sym(u[8], spec.hue),
  )


def _sample_crop(key, spec: AugmentSpec, size):
  """Random-resized-crop box: (height, width) and centre offset, pixels."""
  u = jax.random.uniform(key, (2 * _CROP_TRIES + 2,), jnp.float32)
  low, high = spec.crop_scale
  area = (low + (high - low) * u[:_CROP_TRIES]) * size[0] * size[1]
  log_low, log_high = map(math.log, spec.crop_ratio)
  ratio = jnp.exp(log_low + (log_high - log_low) * u[_CROP_TRIES:-2])
  hw = jnp.stack([jnp.sqrt(area / ratio), jnp.sqrt(area * ratio)], axis=-1)
  fits = jnp.all(hw <= size, axis=-1)
  # First box that fits; if none does (extreme ratios), the first one clipped
  # to the image, so the crop never leaves the image.
  hw = jnp.minimum(hw[jnp.argmax(fits)], size)
  center = (2 * u[-2:] - 1) * (size - hw) / 2
  return hw, center


def affine_matrix(params: AugmentParams, in_hw: tuple[int, int],
                  out_hw: tuple[int, int]) -> jax.Array:
  """The [2, 3] map from output pixel (i, j, 1) to input coordinates (y, x).

  Forward, the content is cropped (box -> full frame), flipped, scaled,
  rotated and shifted; this returns the inverse ("pull") map, composed into
  one matrix so the image is resampled once.
  """
  in_size = jnp.array(in_hw, jnp.float32)
  out_size = jnp.array(out_hw, jnp.float32)
  # Output index -> output position in input-pixel units about the centre.
  d = in_size / out_size
  e = 0.5 * d - in_size / 2
  c, s = jnp.cos(params.angle), jnp.sin(params.angle)
  inv_rotate = jnp.array([[c, s], [-s, c]])
  flip = jnp.where(params.flip, -1.0, 1.0)
  a = (jnp.diag(params.crop_hw / in_size) @ jnp.diag(jnp.stack([1.0, flip]))
       @ inv_rotate / params.scale)
  b = -a @ params.shift + params.crop_center + (in_size - 1) / 2
  return jnp.concatenate([a * d[None, :], (a @ e + b)[:, None]], axis=1)


def _fold(index, n: int, fill_mode: str):
  """Maps integer indices into [0, n) per fill_mode; also returns validity."""
  if fill_mode == 'symmetric':
    m = jnp.mod(index, 2 * n)
    return jnp.where(m < n, m, 2 * n - 1 - m), None
  valid = (index >= 0) & (index < n) if fill_mode == 'constant' else None
  return jnp.clip(index, 0, n - 1), valid


def warp(image: jax.Array, matrix: jax.Array, out_hw: tuple[int, int],
         fill_mode: str = 'symmetric') -> jax.Array:
  """Bilinear resampling of a float [H, W, C] image under a [2, 3] pull map.

  Output pixel (i, j) takes the input value at matrix @ (i, j, 1). Whole
  C-vectors are gathered from 4 neighbours; integer coordinates reproduce
  the input exactly.
  """
  h, w, ch = image.shape
  ii, jj = jnp.meshgrid(jnp.arange(out_hw[0], dtype=jnp.float32),
                        jnp.arange(out_hw[1], dtype=jnp.float32), indexing='ij')
  y = matrix[0, 0] * ii + matrix[0, 1] * jj + matrix[0, 2]
  x = matrix[1, 0] * ii + matrix[1, 1] * jj + matrix[1, 2]
  y0, x0 = jnp.floor(y), jnp.floor(x)
  wy, wx = (y - y0)[..., None], (x - x0)[..., None]
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  flat = image.reshape(h * w, ch)

  def gather(yi, xi):
    yi, valid_y = _fold(yi, h, fill_mode)
    xi, valid_x = _fold(xi, w, fill_mode)
    # _fold already put the indices in range: skip the gather's bounds logic.
    value = flat.at[yi * w + xi].get(mode='promise_in_bounds')
    if valid_y is not None:
      value = jnp.where((valid_y & valid_x)[..., None], value, 0.0)
    return value

  top = (1 - wx) * gather(y0, x0) + wx * gather(y0, x0 + 1)
  bottom = (1 - wx) * gather(y0 + 1, x0) + wx * gather(y0 + 1, x0 + 1)
  return (1 - wy) * top + wy * bottom


def _augment_one(image, params: AugmentParams, spec: AugmentSpec, out_hw):
  """Augments one float [H, W, C] image in [0, 1] with drawn `params`."""
  if spec.geometric:
    matrix = affine_matrix(params, image.shape[:2], out_hw)
    image = warp(image, matrix, out_hw, spec.fill_mode)
  elif spec.flip:
    image = jnp.where(params.flip, image[:, ::-1], image)
  # Clipping after each op keeps every step's input in [0, 1] as HSV assumes.
  if spec.brightness:
    image = jnp.clip(pix.adjust_brightness(image, params.brightness), 0, 1)
  if spec.contrast:
    image = jnp.clip(pix.adjust_contrast(image, params.contrast), 0, 1)
  if image.shape[-1] == 3 and spec.saturation:
    image = adjust_saturation(image, params.saturation)
  if image.shape[-1] == 3 and spec.hue:
    image = adjust_hue(image, params.hue)
  # Rounding can leave values an ulp outside [0, 1] (e.g. v - C at black).
  return jnp.clip(image, 0, 1)


def output_hw(spec: AugmentSpec, in_hw: tuple[int, int]) -> tuple[int, int]:
  """Height and width of `augment_batch`'s output for inputs of `in_hw`."""
  return (spec.out_size, spec.out_size) if spec.out_size else tuple(in_hw)


def sample_batch_params(key: jax.Array, spec: AugmentSpec,
                        in_hw: tuple[int, int], batch: int) -> AugmentParams:
  """Per-example parameters for a batch: `sample_params` on split(key, B)."""
  keys = jax.random.split(key, batch)
  return jax.vmap(functools.partial(sample_params, spec=spec, in_hw=in_hw))(keys)


def augment_batch(images: jax.Array, key: jax.Array,
                  spec: AugmentSpec) -> jax.Array:
  """Augments uint8 images [B, H, W, C] to float32 [B, H', W', C] in [0, 1].

  Each example gets its own key from split(key, B), so the result depends
  only on (images, key, spec). With every option off this is images / 255.
  """
  if images.ndim != 4:
    raise UserError(f'augment_batch wants images [B, H, W, C], got shape '
                    f'{images.shape}')
  if images.dtype != jnp.uint8:
    raise UserError(f'augment_batch wants uint8 images, got {images.dtype}')
  # A 256-entry table gives exactly images / 255 (correctly rounded): under
  # jit XLA turns division by a constant into a multiplication by 1/255,
  # which is off by an ulp for some values.
  x = jnp.take(jnp.asarray(_UINT8_TO_UNIT), images.astype(jnp.int32), mode='clip')
  if not (spec.geometric or spec.flip or spec.brightness or spec.contrast
          or spec.saturation or spec.hue):
    return x
  in_hw = images.shape[1:3]
  params = sample_batch_params(key, spec, in_hw, images.shape[0])
  one = functools.partial(_augment_one, spec=spec, out_hw=output_hw(spec, in_hw))
  return jax.vmap(one)(x, params)


def normalize(x: jax.Array, mean, std) -> jax.Array:
  """(x - mean) / std with per-channel mean and std broadcast over [..., C]."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (x - mean) / std
