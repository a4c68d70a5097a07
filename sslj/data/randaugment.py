"""RandAugment with random magnitudes, then Cutout: FixMatch's strong view.

Pure JAX on float images in [0, 1] (uint8 images are mapped there first),
[B, H, W, C] with C = 1 or 3, one key per example. Each example applies
`num_ops` operations drawn uniformly (with replacement) from `OPS`, each with
its own magnitude drawn uniformly from the op's range (FixMatch's variant of
RandAugment draws the magnitude per example instead of fixing it), and then
Cutout: a square of side up to `cutout` of the image filled with grey.

Ranges (FixMatch, Table 12): brightness, color, contrast and sharpness blend
factors in [0.05, 0.95] (1 is the original image); posterize to 4-8 bits;
rotate by -30..30 degrees; shear by -0.3..0.3; solarize above a threshold in
[0, 1]; translate by -0.3..0.3 of the size. The geometric ops are one affine
pull map each, resampled bilinearly by `augment.warp` about the image centre;
what comes in from outside the image is grey (0.5), as in FixMatch's code.

Where the definitions differ from PIL's: contrast blends with the per-channel
mean (dm-pix), not the mean grey level; the pixel-level ops (autocontrast,
equalize, posterize, solarize) act on the image rounded to 256 levels, so
they agree with PIL on uint8 inputs. Color is the identity on grey images.

Per-example ops go through `jax.lax.switch`; under `vmap` it evaluates every
branch and selects, which costs little next to the network on small images.

References:
  Cubuk, Zoph, Shlens, Le. RandAugment: Practical automated data augmentation
    with a reduced search space. NeurIPS 2020.
  Sohn et al. FixMatch: Simplifying semi-supervised learning with consistency
    and confidence. NeurIPS 2020 (random magnitudes, Table 12).
  DeVries, Taylor. Improved regularization of convolutional neural networks
    with Cutout. 2017.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp

from sslj.data import augment
from sslj.errors import UserError

OPS = ('identity', 'autocontrast', 'equalize', 'rotate', 'solarize', 'color',
       'posterize', 'contrast', 'brightness', 'sharpness', 'shear_x', 'shear_y',
       'translate_x', 'translate_y')
GREY = 0.5
MAX_ROTATE_DEG = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3
# PIL's luma weights (ITU-R 601-2), as ImageEnhance.Color uses.
_LUMA = (0.299, 0.587, 0.114)


def _factor(m):
  """Blend factor of the enhance ops: [0.05, 0.95] for m in [0, 1]."""
  return 0.05 + 0.9 * m


def _signed(m, bound):
  """-bound .. bound for m in [0, 1]."""
  return bound * (2 * m - 1)


def _levels(image):
  """The image on 0..255 as integers (float32 values)."""
  return jnp.round(image * 255)


def _identity(image, m):
  del m
  return image


def _autocontrast(image, m):
  """Per channel, stretches [min, max] linearly to [0, 1] (a flat channel is kept)."""
  del m
  lo = jnp.min(image, axis=(0, 1), keepdims=True)
  hi = jnp.max(image, axis=(0, 1), keepdims=True)
  stretched = (image - lo) / jnp.where(hi > lo, hi - lo, 1.0)
  return jnp.where(hi > lo, jnp.clip(stretched, 0, 1), image)


def _equalize_channel(q):
  """PIL's histogram equalization of one channel of integer levels [H, W]."""
  q = q.astype(jnp.int32)
  hist = jnp.zeros((256,), jnp.int32).at[q.ravel()].add(1)
  last = hist[255 - jnp.argmax(hist[::-1] > 0)]  # count of the highest level present
  step = (q.size - last) // 255
  safe = jnp.maximum(step, 1)
  before = jnp.cumsum(hist) - hist  # pixels strictly below each level
  lut = jnp.clip((before + step // 2) // safe, 0, 255)
  return jnp.where(step > 0, lut[q], q).astype(jnp.float32)


def _equalize(image, m):
  del m
  q = _levels(image)
  return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(q) / 255


def _solarize(image, m):
  """Inverts the levels at or above a threshold 256 (1 - m) (m = 0 inverts none)."""
  return pix.solarize(_levels(image) / 255, 256 * (1 - m) / 255)


def _posterize(image, m):
  """Keeps the top 4..8 bits of each level."""
  bits = jnp.clip(4 + jnp.floor(5 * m), 4, 8).astype(jnp.int32)
  q = _levels(image).astype(jnp.int32)
  shift = 8 - bits
  return ((q >> shift) << shift).astype(jnp.float32) / 255


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
  return jnp.clip(degenerate + factor * (image - degenerate), 0, 1)


def _color(image, m):
  if image.shape[-1] != 3:
    return image
  grey = jnp.tensordot(image, jnp.asarray(_LUMA, image.dtype), axes=1)[..., None]
  return _blend(grey, image, _factor(m))


def _contrast(image, m):
  return jnp.clip(pix.adjust_contrast(image, _factor(m)), 0, 1)


def _brightness(image, m):
  return _blend(jnp.zeros_like(image), image, _factor(m))


def _sharpness(image, m):
  """Blend with PIL's SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1) / 13; border kept."""
  h, w, _ = image.shape
  if h < 3 or w < 3:
    return image
  pad = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
  smooth = sum(pad[i:i + h, j:j + w] for i in range(3) for j in range(3))
  smooth = (smooth + 4 * image) / 13
  inner = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
  return _blend(jnp.where(inner, smooth, image), image, _factor(m))


def pull_matrix(op: str, m, hw) -> jax.Array:
  """The [2, 3] map output (i, j, 1) -> input (y, x) of a geometric op.

  About the centre c = ((H-1)/2, (W-1)/2): rotate turns the content by
  +-30 m degrees (positive counter-clockwise, as in `augment`); shear_x moves
  row i by s (i - c_y) pixels to the right; translate moves the content by a
  fraction of the size down (y) or right (x).
  """
  h, w = hw
  c = jnp.array([(h - 1) / 2, (w - 1) / 2], jnp.float32)
  if op == 'rotate':
    angle = math.radians(MAX_ROTATE_DEG) * (2 * m - 1)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    a = jnp.array([[cos, sin], [-sin, cos]])
    b = c - a @ c
  elif op in ('shear_x', 'shear_y'):
    s = _signed(m, MAX_SHEAR)
    a = (jnp.array([[1.0, 0.0], [-s, 1.0]]) if op == 'shear_x'
         else jnp.array([[1.0, -s], [0.0, 1.0]]))
    b = c - a @ c
  elif op in ('translate_x', 'translate_y'):
    a = jnp.eye(2)
    axis = 1 if op == 'translate_x' else 0
    b = -jnp.zeros(2).at[axis].set(_signed(m, MAX_TRANSLATE) * hw[axis])
  else:
    raise ValueError(f'{op} is not a geometric op')
  return jnp.concatenate([a, b[:, None]], axis=1).astype(jnp.float32)


def _geometric(op, image, m, fill=GREY):
  hw = image.shape[:2]
  # Warping image - fill with zero fill puts `fill` where the map leaves the image.
  out = augment.warp(image - fill, pull_matrix(op, m, hw), hw, 'constant') + fill
  return jnp.clip(out, 0, 1)


GEOMETRIC = ('rotate', 'shear_x', 'shear_y', 'translate_x', 'translate_y')

_BRANCHES = {
    'identity': _identity, 'autocontrast': _autocontrast, 'equalize': _equalize,
    'solarize': _solarize, 'color': _color, 'posterize': _posterize,
    'contrast': _contrast, 'brightness': _brightness, 'sharpness': _sharpness,
    **{op: functools.partial(_geometric, op) for op in GEOMETRIC},
}


class Options(NamedTuple):
  """How the strong view draws its ops; the defaults are the FixMatch paper's reading.

  Attributes:
    op_probability: each of the `num_ops` drawn ops is applied with this
      probability (1: always; the FixMatch and UDA reference codes' RandAugment
      applies each with 0.5).
    levels: 0 draws each magnitude uniformly in [0, 1]; L > 0 draws a strength
      from {1, ..., L} / L, and the signed ops (rotate, shear, translate) a
      random direction, as the reference codes' integer levels (1..10).
    cutout: 'uniform' draws the Cutout square's side uniformly up to
      `cutout_fraction` of the smaller side (the paper's Table 12);
      'fixed' always cuts `cutout_fraction` of it (the reference codes).
    fill: the value the geometric ops bring in from outside the image (0.5
      grey as FixMatch's RandAugment code; 0 black as its CTAugment and the
      PyTorch ports, the background of dark-background images).
  """
  op_probability: float = 1.0
  levels: int = 0
  cutout: str = 'uniform'
  fill: float = GREY


CUTOUT_MODES = ('uniform', 'fixed')


# TorchSSL's and USB's `RandAugment(3, 5)` as overrides of `strong_view_fields`:
# 3 ops, and rotate, shear and translate filling black (PIL's default); their
# draw and Cutout are the defaults'.
TORCHSSL_USB_VIEW = dict(randaugment_num_ops=3, randaugment_fill=0.0)


def strong_view_fields(**overrides) -> dict:
  """The config fields of a strong view, for a method's config section.

  `randaugment_num_ops` ops per view from `randaugment_ops`, then Cutout of
  side (up to) `cutout` of the image; the other four are `Options`' fields.
  """
  fields = dict(randaugment_num_ops=2, randaugment_ops=OPS, cutout=0.5,
                randaugment_op_probability=1.0, randaugment_levels=0,
                cutout_mode='uniform', randaugment_fill=GREY)
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ValueError(f'not strong-view fields: {sorted(unknown)}')
  return {**fields, **overrides}


def options_from(section) -> Options:
  """The `Options` of a config section holding `strong_view_fields()`."""
  return Options(op_probability=float(section.randaugment_op_probability),
                 levels=int(section.randaugment_levels), cutout=section.cutout_mode,
                 fill=float(section.randaugment_fill))


def apply_op(image: jax.Array, op, magnitude, ops: tuple[str, ...] = OPS,
             fill: float = GREY) -> jax.Array:
  """Applies `ops[op]` (an index, possibly traced) at `magnitude` in [0, 1].

  `image` is float [H, W, C] in [0, 1]; so is the result. `fill` is what the
  geometric ops bring in from outside the image.
  """
  branches = [functools.partial(_BRANCHES[name], fill=fill) if name in GEOMETRIC
              else _BRANCHES[name] for name in ops]
  return jax.lax.switch(op, branches, image, jnp.asarray(magnitude, jnp.float32))


def cutout(image: jax.Array, center, side) -> jax.Array:
  """Fills pixels with |i - c_y| < side/2 and |j - c_x| < side/2 with grey."""
  h, w, _ = image.shape
  ii = jnp.arange(h, dtype=jnp.float32)[:, None, None]
  jj = jnp.arange(w, dtype=jnp.float32)[None, :, None]
  inside = (jnp.abs(ii - center[0]) < side / 2) & (jnp.abs(jj - center[1]) < side / 2)
  return jnp.where(inside, GREY, image)


class RandAugmentParams(NamedTuple):
  """One example's draws (leading batch axis when vmapped)."""
  ops: jax.Array         # [num_ops] int32 indices into the op list
  magnitudes: jax.Array  # [num_ops] in [0, 1]
  cutout_center: jax.Array  # [2] (y, x) pixels
  cutout_side: jax.Array    # pixels
  applied: jax.Array        # [num_ops] bool: whether each op acts


def sample_params(key, *, num_ops: int, num_choices: int, hw, cutout_fraction: float,
                  options: Options = Options(), ops: tuple[str, ...] = OPS) -> RandAugmentParams:
  k_ops, k_uniform = jax.random.split(key)
  u = jax.random.uniform(k_uniform, (num_ops + 3,), jnp.float32)
  size = jnp.array(hw, jnp.float32)
  op_index = jax.random.randint(k_ops, (num_ops,), 0, num_choices)
  magnitudes = u[:num_ops]
  applied = jnp.ones((num_ops,), bool)
  if options.levels or options.op_probability < 1:
    # Draws of their own, so that the default options keep the draws above.
    k_level, k_sign, k_apply = jax.random.split(jax.random.fold_in(key, 1), 3)
    if options.levels:
      strength = (jax.random.randint(k_level, (num_ops,), 1, options.levels + 1)
                  / options.levels).astype(jnp.float32)
      sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (num_ops,)), 1.0, -1.0)
      signed = jnp.asarray([name in GEOMETRIC for name in ops])[op_index]
      # The signed ops read m as -bound..bound (2m - 1): m = 1/2 +- strength/2.
      magnitudes = jnp.where(signed, 0.5 + sign * strength / 2, strength)
    if options.op_probability < 1:
      applied = jax.random.uniform(k_apply, (num_ops,)) < options.op_probability
  side = cutout_fraction * min(hw)
  return RandAugmentParams(
      ops=op_index, magnitudes=magnitudes,
      cutout_center=u[num_ops:num_ops + 2] * size,
      cutout_side=(jnp.float32(side) if options.cutout == 'fixed' else u[-1] * side),
      applied=applied)


def augment_one(image, params: RandAugmentParams, ops: tuple[str, ...] = OPS,
                fill: float = GREY):
  for i in range(params.ops.shape[0]):
    changed = apply_op(image, params.ops[i], params.magnitudes[i], ops, fill)
    image = jnp.where(params.applied[i], changed, image)
  return cutout(image, params.cutout_center, params.cutout_side)


def check_options(ops, cutout_fraction: float, options: Options = Options()) -> None:
  """Raises UserError for unknown op names or options outside their ranges."""
  unknown = sorted(set(ops) - set(OPS))
  if unknown or not ops:
    raise UserError(f'unknown RandAugment op(s) {unknown or "(none given)"}; '
                    f'choose from {", ".join(OPS)}')
  if not 0 <= cutout_fraction <= 1:
    raise UserError(f'cutout={cutout_fraction} is a fraction of the size; use 0 to 1')
  if not 0 <= options.op_probability <= 1:
    raise UserError(f'op_probability={options.op_probability} is a probability; use 0 to 1')
  if int(options.levels) != options.levels or options.levels < 0:
    raise UserError(f'levels={options.levels}: use 0 (continuous magnitudes) or a whole '
                    'number of levels such as 10')
  if options.cutout not in CUTOUT_MODES:
    raise UserError(f"cutout mode '{options.cutout}' is unknown; use 'uniform' or 'fixed'")
  if not 0 <= options.fill <= 1:
    raise UserError(f'fill={options.fill} is a grey level; use 0 (black) to 1 (white)')


def randaugment(images: jax.Array, key: jax.Array, *, num_ops: int = 2,
                cutout_fraction: float = 0.5, ops: tuple[str, ...] = OPS,
                options: Options = Options()) -> jax.Array:
  """Strongly augments a batch [B, H, W, C] (uint8, or float in [0, 1]).

  Returns float32 in [0, 1]. Example b uses key split(key, B)[b], so the
  result depends only on (images, key) and the options.
  """
  check_options(ops, cutout_fraction, options)
  if images.ndim != 4:
    raise UserError(f'randaugment wants images [B, H, W, C], got shape {images.shape}')
  if images.dtype == jnp.uint8:
    images = augment.augment_batch(images, key, augment.AugmentSpec())  # exactly / 255
  images = images.astype(jnp.float32)
  hw = images.shape[1:3]
  keys = jax.random.split(key, images.shape[0])
  params = jax.vmap(functools.partial(
      sample_params, num_ops=num_ops, num_choices=len(ops), hw=hw,
      cutout_fraction=cutout_fraction, options=options, ops=tuple(ops)))(keys)
  return jax.vmap(functools.partial(augment_one, ops=tuple(ops), fill=options.fill))(
      images, params)

