"""RandAugment ops and Cutout against numpy references, under jax.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslj.data import randaugment
from sslj.errors import UserError

OPS = randaugment.OPS


@jax.jit
def _apply_many(image, ops, magnitudes):
  """Every (op index, magnitude) pair on one image, in one compiled function.

  The op index is traced, as inside the training step.
  """
  return jax.vmap(lambda o, m: randaugment.apply_op(image, o, m))(ops, magnitudes)


def _apply(image, op, m):
  return _apply_many(image, jnp.array([OPS.index(op)]), jnp.array([m], jnp.float32))[0]


def _image(h=7, w=9, c=3, seed=0):
  levels = np.random.RandomState(seed).randint(0, 256, (h, w, c))
  return (levels / 255).astype(np.float32)


def _levels(x):
  return np.round(x.astype(np.float64) * 255)


def _np_equalize_channel(q):
  """PIL ImageOps.equalize for one channel (its loop), with the result clipped to 255."""
  hist = np.bincount(q.ravel().astype(int), minlength=256)
  present = hist[hist > 0]
  step = (present.sum() - present[-1]) // 255
  if len(present) <= 1 or step == 0:
    return q
  lut, n = [], step // 2
  for i in range(256):
    lut.append(min(n // step, 255))
    n += hist[i]
  return np.asarray(lut)[q.astype(int)]


def _np_warp(image, pull, fill=0.5):
  """Bilinear pull resampling, one pixel at a time; outside the image is `fill`."""
  h, w, _ = image.shape
  out = np.empty_like(image, dtype=np.float64)
  for i in range(h):
    for j in range(w):
      y, x = pull @ np.array([i, j, 1.0])
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      acc = 0.0
      for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
          v = image[yy, xx] if 0 <= yy < h and 0 <= xx < w else fill
          acc = acc + wy * wx * v
      out[i, j] = acc
  return np.clip(out, 0, 1)


def _np_pull(op, m, h, w):
  """The pull maps written out per op (output (i, j, 1) -> input (y, x))."""
  cy, cx = (h - 1) / 2, (w - 1) / 2
  if op == 'rotate':
    t = np.radians(30 * (2 * m - 1))
    a = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    return np.hstack([a, (np.array([cy, cx]) - a @ [cy, cx])[:, None]])
  s = 0.3 * (2 * m - 1)
  if op == 'shear_x':   # row i moves right by s (i - cy)
    return np.array([[1, 0, 0], [-s, 1, s * cy]])
  if op == 'shear_y':   # column j moves down by s (j - cx)
    return np.array([[1, -s, s * cx], [0, 1, 0]])
  if op == 'translate_x':
    return np.array([[1, 0, 0], [0, 1, -s * w]])
  return np.array([[1, 0, -s * h], [0, 1, 0]])  # translate_y


def _reference(op, x, m):
  """numpy versions of every op on float [H, W, C] in [0, 1] at magnitude m."""
  x64 = x.astype(np.float64)
  f = 0.05 + 0.9 * m
  if op == 'identity':
    return x64
  if op == 'autocontrast':
    lo, hi = x64.min((0, 1)), x64.max((0, 1))
    return np.where(hi > lo, (x64 - lo) / np.where(hi > lo, hi - lo, 1), x64)
  if op == 'equalize':
    q = _levels(x)
    return np.stack([_np_equalize_channel(q[..., c]) for c in range(x.shape[-1])], -1) / 255
  if op == 'solarize':
    q = _levels(x)
    return np.where(q >= 256 * (1 - m), 255 - q, q) / 255
  if op == 'posterize':
    bits = min(4 + int(np.floor(5 * m)), 8)
    q = _levels(x).astype(np.uint8)
    return (q & np.uint8((0xFF << (8 - bits)) & 0xFF)) / 255
  if op == 'color':
    if x.shape[-1] == 1:
      return x64
    grey = (x64 @ np.array([0.299, 0.587, 0.114]))[..., None]
    return np.clip(grey + f * (x64 - grey), 0, 1)
  if op == 'contrast':
    mean = x64.mean((0, 1))
    return np.clip(mean + f * (x64 - mean), 0, 1)
  if op == 'brightness':
    return np.clip(f * x64, 0, 1)
  if op == 'sharpness':
    h, w, _ = x.shape
    smooth = x64.copy()
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    for i in range(1, h - 1):
      for j in range(1, w - 1):
        smooth[i, j] = np.einsum('ab,abc->c', kernel, x64[i - 1:i + 2, j - 1:j + 2])
    return np.clip(smooth + f * (x64 - smooth), 0, 1)
  h, w, _ = x.shape
  return _np_warp(x64, _np_pull(op, m, h, w))


@pytest.mark.parametrize('c', [1, 3])
def test_each_op_matches_numpy_at_fixed_magnitudes(c):
  x = _image(c=c, seed=c)
  pairs = [(op, m) for op in OPS for m in (0.0, 0.3, 0.85)]
  got = np.asarray(_apply_many(jnp.asarray(x), jnp.array([OPS.index(op) for op, _ in pairs]),
                               jnp.array([m for _, m in pairs], jnp.float32)))
  assert got.shape == (len(pairs),) + x.shape and got.dtype == np.float32
  for (op, m), out in zip(pairs, got):
    np.testing.assert_allclose(out, _reference(op, x, m), atol=2e-6, err_msg=f'{op} m={m}')


def test_ops_change_the_image_where_they_should():
  # Guards the references themselves: an op that silently did nothing would
  # pass a comparison with a reference that also did nothing.
  x = _image(h=20, w=20, c=3, seed=5)  # equalize needs >= 256 pixels (PIL's step > 0)
  # m >= 0.8 posterizes to all 8 bits, so posterize gets 0.3.
  magnitudes = [0.3 if op == 'posterize' else 0.9 for op in OPS]
  got = np.asarray(_apply_many(jnp.asarray(x), jnp.arange(len(OPS)),
                               jnp.array(magnitudes, jnp.float32)))
  for op, out in zip(OPS, got):
    assert (not np.allclose(out, x)) == (op != 'identity'), op


def test_equalize_flattens_the_histogram():
  # A dark, low-contrast channel spreads over the whole range.
  q = np.random.RandomState(0).randint(10, 40, (32, 32, 1))
  out = np.asarray(_apply(jnp.asarray(q / 255, jnp.float32), 'equalize', 0.0))
  assert out.min() == 0 and out.max() > 0.9
  np.testing.assert_array_equal(np.round(out * 255), _np_equalize_channel(q))


def test_cutout_fills_the_square_with_grey():
  x = _image(h=8, w=8, c=1)
  out = np.asarray(jax.jit(randaugment.cutout)(jnp.asarray(x), jnp.array([2.0, 5.5]), 3.0))
  inside = np.zeros((8, 8, 1), bool)
  inside[1:4, 5:7] = True  # |i - 2| < 1.5 and |j - 5.5| < 1.5
  np.testing.assert_array_equal(out[inside], 0.5)
  np.testing.assert_array_equal(out[~inside], x[~inside])


_randaugment = jax.jit(randaugment.randaugment, static_argnames=('num_ops', 'cutout_fraction', 'ops'))


@pytest.mark.parametrize('c', [1, 3])
def test_batch_is_deterministic_per_key_in_range_and_per_example(c):
  images = np.random.RandomState(c).randint(0, 256, (6, 10, 10, c)).astype(np.uint8)
  a = np.asarray(_randaugment(images, jax.random.key(3)))
  b = np.asarray(_randaugment(images, jax.random.key(3)))
  other = np.asarray(_randaugment(images, jax.random.key(4)))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, other)
  assert a.shape == images.shape and a.dtype == np.float32
  assert a.min() >= 0 and a.max() <= 1
  # uint8 and float inputs in [0, 1] give the same result.
  floats = np.asarray(_randaugment(images.astype(np.float32) / 255, jax.random.key(3)))
  np.testing.assert_allclose(floats, a, atol=1e-6)
  # Example b is the single-example pipeline with key split(key, B)[b].
  keys = jax.random.split(jax.random.key(3), 6)
  params = jax.vmap(lambda k: randaugment.sample_params(
      k, num_ops=2, num_choices=len(OPS), hw=(10, 10), cutout_fraction=0.5))(keys)
  for i in range(6):
    one = jax.tree.map(lambda p: p[i], params)
    expected = randaugment.augment_one(jnp.asarray(images[i] / 255, jnp.float32), one)
    np.testing.assert_allclose(a[i], expected, atol=1e-6)


def test_draws_cover_every_op_and_the_cutout_range():
  keys = jax.random.split(jax.random.key(0), 2000)
  params = jax.jit(jax.vmap(lambda k: randaugment.sample_params(
      k, num_ops=2, num_choices=len(OPS), hw=(8, 12), cutout_fraction=0.5)))(keys)
  counts = np.bincount(np.asarray(params.ops).ravel(), minlength=len(OPS))
  assert len(counts) == len(OPS) and counts.min() > 0.6 * 4000 / len(OPS)
  m = np.asarray(params.magnitudes)
  assert m.min() >= 0 and m.max() < 1 and abs(m.mean() - 0.5) < 0.02
  side = np.asarray(params.cutout_side)
  assert side.min() >= 0 and side.max() <= 4.0 and side.max() > 3.9  # 0.5 * min(8, 12)


def test_bad_options_are_user_errors():
  images = np.zeros((2, 4, 4, 1), np.uint8)
  with pytest.raises(UserError, match='unknown RandAugment op'):
    randaugment.randaugment(images, jax.random.key(0), ops=('identity', 'warp_drive'))
  with pytest.raises(UserError, match='cutout'):
    randaugment.randaugment(images, jax.random.key(0), cutout_fraction=2.0)


def _draws(options, n=2000, ops=OPS):
  keys = jax.random.split(jax.random.key(0), n)
  return jax.jit(jax.vmap(lambda k: randaugment.sample_params(
      k, num_ops=2, num_choices=len(ops), hw=(8, 12), cutout_fraction=0.5,
      options=options, ops=ops)))(keys)


def test_reference_options_fixed_cutout_levels_and_op_probability():
  default = _draws(randaugment.Options())
  ref = _draws(randaugment.Options(op_probability=0.5, levels=10, cutout='fixed', fill=0.0))
  # The ops and the Cutout centres are the same draws; only what the options change moves.
  np.testing.assert_array_equal(np.asarray(ref.ops), np.asarray(default.ops))
  np.testing.assert_array_equal(np.asarray(ref.cutout_center), np.asarray(default.cutout_center))
  assert np.asarray(default.applied).all()
  np.testing.assert_array_equal(np.asarray(ref.cutout_side), 4.0)  # 0.5 * min(8, 12), always
  applied = np.asarray(ref.applied)
  assert abs(applied.mean() - 0.5) < 0.03  # 4,000 Bernoulli(0.5) draws
  signed = np.isin(np.asarray(ref.ops), [OPS.index(op) for op in randaugment.GEOMETRIC])
  m = np.asarray(ref.magnitudes)
  levels = np.arange(1, 11) / 10
  np.testing.assert_allclose(np.sort(np.unique(m[~signed])), levels, rtol=1e-6)
  # Signed ops: strength k/10 in either direction, read as 2m - 1.
  np.testing.assert_allclose(np.sort(np.unique(np.round(2 * m[signed] - 1, 6))),
                             np.concatenate([-levels[::-1], levels]), rtol=1e-5)


def test_an_op_not_applied_leaves_the_image_and_fill_is_what_comes_in():
  image = jnp.ones((8, 8, 1), jnp.float32)
  params = randaugment.RandAugmentParams(
      ops=jnp.array([OPS.index('rotate')]), magnitudes=jnp.array([1.0]),
      cutout_center=jnp.array([0.0, 0.0]), cutout_side=jnp.float32(0.0),
      applied=jnp.array([False]))
  np.testing.assert_array_equal(randaugment.augment_one(image, params), image)
  rotated = params._replace(applied=jnp.array([True]))
  black = np.asarray(randaugment.augment_one(image, rotated, fill=0.0))
  grey = np.asarray(randaugment.augment_one(image, rotated))
  assert black[0, 0, 0] < 0.5 and grey[0, 0, 0] == pytest.approx(0.5 + 0.5 * (black[0, 0, 0]))
  np.testing.assert_array_equal(black[3:5, 3:5], 1.0)  # the centre stays


def test_bad_reference_options_are_user_errors():
  images = np.zeros((2, 4, 4, 1), np.uint8)
  for bad, match in [(dict(op_probability=1.5), 'probability'), (dict(levels=2.5), 'levels'),
                     (dict(cutout='random'), 'cutout mode'), (dict(fill=-1.0), 'grey level')]:
    with pytest.raises(UserError, match=match):
      randaugment.randaugment(images, jax.random.key(0), options=randaugment.Options(**bad))
