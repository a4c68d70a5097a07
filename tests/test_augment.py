"""Tests for sslj.data.augment against numpy, dm-pix and jax.image references."""

import dataclasses
import functools
import math

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sslj.data import augment, color
from sslj.data.augment import AugmentSpec
from sslj.errors import UserError

FULL = AugmentSpec(flip=True, rotate_deg=20, translate=0.1, scale=(0.7, 1.4),
                   brightness=0.2, contrast=0.3, saturation=0.3, hue=0.05)


# Tests call the jitted forms: one compilation per spec is cheaper on CPU
# than op-by-op dispatch, and jit is how training uses them.
_augment = jax.jit(augment.augment_batch, static_argnums=2)
_sample_batch = jax.jit(augment.sample_batch_params, static_argnums=(1, 2, 3))


def _images(b=4, h=9, w=9, c=3, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (b, h, w, c)).astype(np.uint8)


def _identity_params(h, w):
  return augment.sample_params(jax.random.key(0), AugmentSpec(), (h, w))


@functools.partial(jax.jit, static_argnames=('out_hw', 'fill_mode'))
def _warp_jit(image, params, out_hw, fill_mode):
  matrix = augment.affine_matrix(params, image.shape[:2], out_hw)
  return augment.warp(image, matrix, out_hw, fill_mode)


def _warp(image, params, out_hw=None, fill_mode='symmetric'):
  out_hw = tuple(out_hw or image.shape[:2])
  return np.asarray(_warp_jit(jnp.asarray(image, jnp.float32), params,
                              out_hw, fill_mode))


@pytest.mark.parametrize('c', [1, 3])
def test_all_off_is_exactly_images_over_255(c):
  images = _images(c=c)
  expected = images.astype(np.float32) / np.float32(255)
  out = augment.augment_batch(images, jax.random.key(0), AugmentSpec())
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(_augment(images, jax.random.key(0), AugmentSpec()),
                                expected)


def test_deterministic_per_key_and_per_example():
  images = np.repeat(_images(b=1), 6, axis=0)  # six copies of one image
  spec = dataclasses.replace(FULL, crop_scale=(0.5, 1.0), pad_crop=2)
  a = np.asarray(_augment(images, jax.random.key(5), spec))
  b = np.asarray(_augment(images, jax.random.key(5), spec))
  c = np.asarray(_augment(images, jax.random.key(6), spec))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  # Each example draws its own parameters, so the copies come out different.
  assert len({a[i].tobytes() for i in range(6)}) == 6


@pytest.mark.parametrize('spec,c,out_hw', [
    (FULL, 3, (9, 11)),
    (FULL, 1, (9, 11)),
    (AugmentSpec(crop_scale=(0.08, 1.0), flip=True, out_size=16), 3, (16, 16)),
    (AugmentSpec(pad_crop=4, flip=True, fill_mode='constant'), 3, (9, 11)),
    (AugmentSpec(rotate_deg=45, scale=(0.5, 2.0), fill_mode='edge',
                 out_size=5), 1, (5, 5)),
])
def test_shape_dtype_and_range(spec, c, out_hw):
  images = _images(b=5, h=9, w=11, c=c)
  out = np.asarray(_augment(images, jax.random.key(1), spec))
  assert out.shape == (5, *out_hw, c) and out.dtype == np.float32
  assert out.min() >= 0 and out.max() <= 1
  assert augment.output_hw(spec, (9, 11)) == out_hw


def test_flip_is_exact_and_follows_sampled_flag():
  images = _images(b=32, w=7)
  spec = AugmentSpec(flip=True)
  key = jax.random.key(3)
  out = np.asarray(_augment(images, key, spec))
  flags = np.asarray(_sample_batch(key, spec, (9, 7), 32).flip)
  x = images.astype(np.float32) / np.float32(255)
  expected = np.where(flags[:, None, None, None], x[:, :, ::-1], x)
  np.testing.assert_array_equal(out, expected)
  assert 0 < flags.sum() < 32
  # The same flip through the affine path (one resampling) is exact too.
  params = _identity_params(9, 7)._replace(flip=jnp.bool_(True))
  np.testing.assert_array_equal(_warp(x[0], params), x[0][:, ::-1])


@pytest.mark.parametrize('degrees,k', [(90, 1), (-90, -1), (180, 2)])
def test_rotation_matrix_matches_rot90(degrees, k):
  image = np.random.RandomState(1).rand(6, 6, 2).astype(np.float32)
  params = _identity_params(6, 6)._replace(angle=jnp.float32(math.radians(degrees)))
  # cos(pi/2) is ~4e-8 in float32, hence allclose rather than equality.
  np.testing.assert_allclose(_warp(image, params), np.rot90(image, k),
                             atol=1e-5)


@pytest.mark.parametrize('shift', [(2, -1), (-3, 0), (0, 4)])
def test_integer_translation_matches_roll_and_padding(shift):
  image = np.random.RandomState(2).rand(8, 10, 3).astype(np.float32)
  params = _identity_params(8, 10)._replace(shift=jnp.array(shift, jnp.float32))
  dy, dx = shift
  rolled = np.roll(image, shift, axis=(0, 1))
  interior = (slice(max(dy, 0), 8 + min(dy, 0)), slice(max(dx, 0), 10 + min(dx, 0)))
  for mode, np_mode in [('symmetric', 'symmetric'), ('edge', 'edge'),
                        ('constant', 'constant')]:
    out = _warp(image, params, fill_mode=mode)
    np.testing.assert_array_equal(out[interior], rolled[interior])
    # Outside, the image continues as the same-named np.pad mode.
    padded = np.pad(image, ((8, 8), (10, 10), (0, 0)), mode=np_mode)
    np.testing.assert_array_equal(out, padded[8 - dy:16 - dy, 10 - dx:20 - dx])


def test_pad_crop_is_a_window_of_the_mirror_padded_image():
  # The CIFAR idiom: pad by 2 (mirrored), crop 8x8 at a random offset.
  images = _images(b=64, h=8, w=8)
  spec = AugmentSpec(pad_crop=2)
  key = jax.random.key(4)
  out = np.asarray(_augment(images, key, spec))
  shifts = np.asarray(_sample_batch(key, spec, (8, 8), 64).shift)
  # Whole pixels, every value of [-2, 2] drawn.
  assert set(np.unique(shifts)) == {-2.0, -1.0, 0.0, 1.0, 2.0}
  x = images.astype(np.float32) / np.float32(255)
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode='symmetric')
  for i, (dy, dx) in enumerate(shifts.astype(int)):
    np.testing.assert_array_equal(out[i], padded[i, 2 - dy:10 - dy, 2 - dx:10 - dx])


def test_warp_matches_dm_pix_affine_transform():
  image = jnp.asarray(np.random.RandomState(3).rand(7, 9, 3), jnp.float32)
  m = np.array([[0.9, 0.2, 0.3], [-0.15, 1.1, -0.7]], np.float32)
  # dm-pix maps (row, col, channel) with a 3x4 homogeneous matrix.
  m3 = np.array([[m[0, 0], m[0, 1], 0, m[0, 2]],
                 [m[1, 0], m[1, 1], 0, m[1, 2]],
                 [0, 0, 1, 0]], np.float32)
  expected = jax.jit(functools.partial(pix.affine_transform, mode='nearest'))(
      image, jnp.asarray(m3))
  np.testing.assert_allclose(augment.warp(image, jnp.asarray(m), (7, 9), 'edge'),
                             expected, atol=1e-6)


def test_resize_matches_jax_image_resize():
  image = np.random.RandomState(4).rand(5, 6, 3).astype(np.float32)
  # Upsampling: half-pixel-centred bilinear with clamped borders, which is
  # what jax.image.resize's 'linear' (triangle kernel) does.
  out = _warp(image, _identity_params(5, 6), out_hw=(15, 12), fill_mode='edge')
  np.testing.assert_allclose(out, jax.image.resize(image, (15, 12, 3), 'linear'),
                             atol=1e-6)


def test_scale_and_crop_matrix_semantics():
  h, w = 9, 13
  centre = np.array([(h - 1) / 2, (w - 1) / 2])
  ident = _identity_params(h, w)

  def pull(params, point):
    m = np.asarray(augment.affine_matrix(params, (h, w), (h, w)))
    return m @ np.array([*point, 1.0])

  # Zoom 2x about the centre: an output offset d samples the input at d / 2.
  zoom = ident._replace(scale=jnp.float32(2.0))
  np.testing.assert_allclose(pull(zoom, centre + [2, -4]), centre + [1, -2], atol=1e-6)
  # A crop box of half size centred at (+1, -2): the output frame spans it.
  crop = ident._replace(crop_hw=jnp.array([h / 2, w / 2], jnp.float32),
                        crop_center=jnp.array([1.0, -2.0], jnp.float32))
  np.testing.assert_allclose(pull(crop, centre), centre + [1, -2], atol=1e-6)
  corner = pull(crop, (-0.5, -0.5))  # outer edge of the output's first pixel
  np.testing.assert_allclose(corner, centre + [1, -2] - [h / 4, w / 4], atol=1e-6)


def test_sampled_parameters_respect_ranges():
  spec = AugmentSpec(flip=True, rotate_deg=10, translate=0.2, scale=(0.7, 1.4),
                     crop_scale=(0.08, 1.0), brightness=0.4, contrast=0.3,
                     saturation=1.5, hue=0.1)
  h, w, n = 32, 48, 4000
  p = jax.tree.map(np.asarray, _sample_batch(
      jax.random.key(7), spec, (h, w), n))

  def spans(values, low, high, slack):
    assert values.min() >= low and values.max() <= high
    assert values.min() < low + slack and values.max() > high - slack

  spans(p.angle, -math.radians(10), math.radians(10), 0.01)
  spans(p.scale, 0.7, 1.4, 0.01)
  spans(p.shift[:, 0], -0.2 * h, 0.2 * h, 0.1)
  spans(p.shift[:, 1], -0.2 * w, 0.2 * w, 0.1)
  spans(p.brightness, -0.4, 0.4, 0.01)
  spans(p.contrast, 0.7, 1.3, 0.01)
  spans(p.saturation, 0.0, 2.5, 0.01)  # max(0, 1 - 1.5)
  spans(p.hue, -0.1, 0.1, 0.01)
  assert 0.45 < p.flip.mean() < 0.55
  # Crop boxes lie inside the image with area and ratio in range.
  size = np.array([h, w])
  assert np.all(np.abs(p.crop_center) + p.crop_hw / 2 <= size / 2 + 1e-4)
  area = p.crop_hw.prod(axis=1) / (h * w)
  ratio = p.crop_hw[:, 1] / p.crop_hw[:, 0]
  assert area.min() >= 0.08 - 1e-5 and area.max() <= 1 + 1e-5
  assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4


def test_colour_jitter_matches_numpy():
  images = _images(b=6, c=3)
  x = images.astype(np.float32) / 255
  key = jax.random.key(9)
  spec = AugmentSpec(brightness=0.3, contrast=0.5)
  p = _sample_batch(key, spec, (9, 9), 6)
  delta = np.asarray(p.brightness)[:, None, None, None]
  factor = np.asarray(p.contrast)[:, None, None, None]
  y = np.clip(x + delta, 0, 1)
  mean = y.mean(axis=(1, 2), keepdims=True)
  expected = np.clip(factor * (y - mean) + mean, 0, 1)
  np.testing.assert_allclose(_augment(images, key, spec), expected,
                             atol=1e-6)
  # Saturation and hue leave 1-channel images alone.
  grey_images = _images(c=1)
  np.testing.assert_array_equal(
      _augment(grey_images, key, AugmentSpec(saturation=0.5, hue=0.2)),
      grey_images.astype(np.float32) / np.float32(255))


# dm-pix's own ops, jitted alone on concrete inputs (where they are right).
_pix_saturation = jax.jit(pix.adjust_saturation)
_pix_hue = jax.jit(pix.adjust_hue)


@pytest.mark.parametrize('factor,delta', [(0.0, -0.5), (0.6, -0.2), (1.0, 0.0),
                                          (1.7, 0.05), (3.0, 0.5)])
def test_saturation_and_hue_match_dm_pix(factor, delta):
  x = np.random.RandomState(6).rand(40, 10, 3).astype(np.float32)
  x[0] = 0.5                      # greys: no hue
  x[1, :, :2] = 0.9               # red/green ties for the maximum
  x[2] = 0.0                      # black
  x = jnp.asarray(x)
  factor, delta = jnp.float32(factor), jnp.float32(delta)
  np.testing.assert_allclose(jax.jit(color.adjust_saturation)(x, factor),
                             _pix_saturation(x, factor), atol=2e-6)
  np.testing.assert_allclose(jax.jit(color.adjust_hue)(x, delta),
                             _pix_hue(x, delta), atol=2e-6)


@pytest.mark.parametrize('spec', [
    dataclasses.replace(FULL, crop_scale=(0.3, 1.0), out_size=20),
    # Warp straight into saturation: the case XLA:CPU got wrong with dm-pix's
    # fused HSV ops (see sslj.data.color).
    AugmentSpec(rotate_deg=20, saturation=0.3, hue=0.05, out_size=20)])
def test_jitted_pipeline_equals_its_stages(spec):
  # The whole augmentation fused under jit must equal its stages run one by
  # one: sampled parameters -> one warp -> brightness, contrast (numpy) ->
  # dm-pix saturation and hue, each jitted alone.
  images = _images(b=3, h=12, w=12)
  key = jax.random.key(11)
  out = np.asarray(_augment(images, key, spec))
  params = _sample_batch(key, spec, (12, 12), 3)
  x = images.astype(np.float32) / np.float32(255)
  for i in range(3):
    p = jax.tree.map(lambda a: a[i], params)
    y = _warp(x[i], p, (20, 20))
    y = np.clip(y + np.asarray(p.brightness), 0, 1)
    mean = y.mean(axis=(0, 1))
    y = np.clip(np.asarray(p.contrast) * (y - mean) + mean, 0, 1)
    y = np.clip(_pix_saturation(jnp.asarray(y), p.saturation), 0, 1)
    y = np.clip(_pix_hue(y, p.hue), 0, 1)
    np.testing.assert_allclose(out[i], y, atol=1e-5)


def test_eval_spec_is_deterministic_resize():
  spec = dataclasses.replace(FULL, crop_scale=(0.3, 1.0), out_size=20)
  ev = spec.for_eval()
  assert ev == AugmentSpec(out_size=20)
  images = _images(b=3, h=12, w=12)
  a = _augment(images, jax.random.key(0), ev)
  np.testing.assert_array_equal(a, _augment(images, jax.random.key(1), ev))
  assert a.shape == (3, 20, 20, 3)


def test_from_config():
  cfg = ml_collections.ConfigDict({'flip': True, 'rotate_deg': 20.0,
                                   'scale': [0.7, 1.4], 'crop_scale': None,
                                   'out_size': 224})
  spec = AugmentSpec.from_config(cfg)
  assert spec == AugmentSpec(flip=True, rotate_deg=20, scale=(0.7, 1.4), out_size=224)
  assert hash(spec) == hash(AugmentSpec.from_config(dict(cfg.items())))
  assert AugmentSpec.from_config(None) == AugmentSpec()
  with pytest.raises(UserError, match='rotation.*valid options: flip'):
    AugmentSpec.from_config({'rotation': 10})
  for bad in ({'scale': (1.4, 0.7)}, {'hue': 0.7}, {'translate': -0.1},
              {'crop_scale': (0.0, 1.0)}, {'out_size': 0}, {'pad_crop': 1.5},
              {'fill_mode': 'wrap'}):
    with pytest.raises(UserError):
      AugmentSpec.from_config(bad)


def test_normalize():
  x = np.random.RandomState(5).rand(2, 3, 3, 3).astype(np.float32)
  mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
  np.testing.assert_allclose(augment.normalize(x, mean, std),
                             (x - np.float32(mean)) / np.float32(std), rtol=1e-6)


def test_input_noise_is_added_to_the_normalised_augmented_image():
  from sslj.methods import network
  images = _images(b=64, h=8, w=8, c=1)
  mean, std = np.float32([0.5]), np.float32([0.25])
  clean = network.Preprocess(AugmentSpec(pad_crop=1), mean, std)
  noisy = network.Preprocess(AugmentSpec(pad_crop=1, noise_std=0.15), mean, std)
  key = jax.random.key(7)
  a = np.asarray(jax.jit(clean.train)(images, key))
  b = np.asarray(jax.jit(noisy.train)(images, key))
  # Same augmentation draws; the difference is N(0, 0.15^2) per value.
  diff = b - a
  assert abs(diff.mean()) < 0.01 and abs(diff.std() - 0.15) < 0.005
  assert not np.array_equal(b, np.asarray(jax.jit(noisy.train)(images, jax.random.key(8))))
  np.testing.assert_array_equal(noisy.eval(images), clean.eval(images))
  with pytest.raises(UserError):
    AugmentSpec(noise_std=-0.1)
