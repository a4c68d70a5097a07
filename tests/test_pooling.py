"""sslj.ops.pooling.max_pool against flax's `nn.max_pool`, exactly.

The op alone, inside every model that pools (forward and gradients under
`jax.jit`, on inputs full of ties), and a whole Mean Teacher train step.
Equality is `==`: the new pool must choose select-and-scatter's element and
add the gradients in its order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from conftest import assert_trees_equal, logits_and_gradients, mean_teacher_states
from sslj import models
from sslj.ops import pooling

# (input shape, window, strides, padding): every pool the models use and the
# edge cases of their geometry (odd sizes, VALID truncation, SAME padding).
POOLS = [
    ((3, 28, 28, 5), (2, 2), (2, 2), 'VALID'),
    ((3, 7, 7, 5), (2, 2), (2, 2), 'VALID'),
    ((3, 9, 6, 5), (3, 3), (3, 3), 'VALID'),
    ((2, 16, 16, 4), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((2, 15, 15, 4), (3, 3), (2, 2), 'SAME'),
    ((2, 16, 13, 4), (3, 3), (2, 2), 'SAME'),
    ((2, 10, 10, 3), (2, 2), (1, 1), 'VALID'),
]


def _inputs(shape, kind, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  if kind == 'relu_ties':      # rounded and rectified: many equal maxima
    x = np.maximum(np.round(2 * x), 0)
  elif kind == 'constant':     # whole windows equal
    x = np.zeros(shape, np.float32)
    x[:, : shape[1] // 2] = 1.5
  return jnp.asarray(x)


def _flax_pool(x, window, strides=None, padding='VALID'):
  return nn.max_pool(x, tuple(window), strides=tuple(strides or (1, 1)),
                     padding=padding)


@pytest.mark.parametrize('shape,window,strides,padding', POOLS)
@pytest.mark.parametrize('kind', ['normal', 'relu_ties', 'constant'])
def test_value_and_gradient_equal_flax_max_pool(shape, window, strides, padding, kind):
  x = _inputs(shape, kind)
  ours = jax.jit(lambda x: pooling.max_pool(x, window, strides, padding))
  ref = jax.jit(lambda x: _flax_pool(x, window, strides, padding))
  y, vjp = jax.vjp(ours, x)
  y_ref, vjp_ref = jax.vjp(ref, x)
  assert y.shape == y_ref.shape and bool((y == y_ref).all())
  g = jnp.asarray(np.random.default_rng(1).normal(size=y.shape).astype(np.float32))
  dx, = vjp(g)
  dx_ref, = vjp_ref(g)
  assert bool((dx == dx_ref).all()), float(jnp.abs(dx - dx_ref).max())
  # Each window's gradient lands on exactly one element, the first maximum.
  if tuple(window) == tuple(strides) and kind == 'constant':
    np.testing.assert_array_equal(
        np.asarray(dx)[:, ::window[0], ::window[1]][:, :y.shape[1], :y.shape[2]],
        np.asarray(g))


def test_first_maximum_in_window_order_takes_the_gradient():
  # One 2x2 window, all four equal: only the top-left element gets it.
  x = jnp.ones((1, 2, 2, 1))
  dx = jax.grad(lambda x: pooling.max_pool(x, (2, 2), (2, 2)).sum())(x)
  np.testing.assert_array_equal(np.asarray(dx)[0, :, :, 0], [[1, 0], [0, 0]])
  # The two right elements tie: the upper one (earlier in row-major order).
  x = jnp.array([[0., 3.], [1., 3.]]).reshape(1, 2, 2, 1)
  dx = jax.grad(lambda x: pooling.max_pool(x, (2, 2), (2, 2)).sum())(x)
  np.testing.assert_array_equal(np.asarray(dx)[0, :, :, 0], [[0, 1], [0, 0]])


def test_bfloat16_and_unbatched_inputs():
  x = _inputs((2, 12, 12, 3), 'relu_ties').astype(jnp.bfloat16)
  y = pooling.max_pool(x, (3, 3), (2, 2), 'SAME')
  assert y.dtype == jnp.bfloat16
  assert bool((y == _flax_pool(x, (3, 3), (2, 2), 'SAME')).all())
  assert bool((pooling.max_pool(x[0], (2, 2), (2, 2))
               == _flax_pool(x[0], (2, 2), (2, 2))).all())


def test_bad_arguments_raise_value_error():
  with pytest.raises(ValueError, match='floating'):
    pooling.max_pool(jnp.ones((1, 4, 4, 1), jnp.int32), (2, 2), (2, 2))
  with pytest.raises(ValueError, match='larger than'):
    pooling.max_pool(jnp.ones((1, 2, 2, 1)), (3, 3), (1, 1))


# Every model class that max-pools, at an input size where its pools are
# active; widths and depth cut so that compiling stays short (the pooling
# code path is the model's own).
def _resnet_stem_model():
  from sslj.models import resnet
  return resnet.ResNet(stage_sizes=(1, 1), block_cls=resnet.BasicBlock,
                       num_classes=10, width=8, stem='imagenet')


MODELS = [
    ('small_cnn', (28, 28, 1), {'widths': (8, 16, 32)}),
    ('resnet', (32, 32, 3), None),
    ('alexnet', (16, 16, 3), {'widths': (8, 16, 16, 16, 8), 'fc_width': 16,
                              'dropout_rate': 0.0}),
    ('convlarge', (16, 16, 3), {'dropout_rate': 0.0}),
    ('exemplar_small', (32, 32, 3), {'dropout_rate': 0.0}),
]


@pytest.fixture
def flax_pool_in_models(monkeypatch):
  """Makes every model pool with flax's `nn.max_pool` (the reference)."""
  def use_flax():
    monkeypatch.setattr(pooling, 'max_pool', _flax_pool)
  return use_flax


@pytest.mark.parametrize('name,image_shape,options', MODELS,
                         ids=[m[0] for m in MODELS])
def test_models_forward_and_gradients_equal_with_flax_pool(
    name, image_shape, options, flax_pool_in_models):
  model = (_resnet_stem_model() if options is None
           else models.build(name, num_classes=10, **options))
  # Images with flat regions, as real ones have: ties after every ReLU.
  x = _inputs((4, *image_shape), 'relu_ties', seed=2)
  x = x.at[:, : image_shape[0] // 3].set(0.0)
  ours = logits_and_gradients(model, x)
  flax_pool_in_models()
  assert_trees_equal(ours, logits_and_gradients(model, x))


def test_mean_teacher_train_steps_equal_with_flax_pool(flax_pool_in_models):
  ours = mean_teacher_states()
  flax_pool_in_models()
  assert_trees_equal(ours, mean_teacher_states())
