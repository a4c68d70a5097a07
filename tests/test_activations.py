"""sslj.ops.activations.relu against jax.nn.relu, exactly.

The op alone (values with NaN, infinities and signed zeros; gradients with
x == 0) under `jax.jit`, the small CNN's logits and gradients, and the state
after three Mean Teacher steps, each against the same code with `nn.relu`.
Equality is `==`: the change only moves where XLA:CPU gets its zero from.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal, logits_and_gradients, mean_teacher_states
from sslj import models
from sslj.ops import activations


def _ours(x):
  return activations.relu(x, activations.channel_zero(jnp.ones(x.shape[-1]), x.dtype))


@pytest.fixture
def nn_relu_in_models(monkeypatch):
  """Makes the models apply `nn.relu(x)` (the reference) instead."""
  def use_nn_relu():
    monkeypatch.setattr(activations, 'relu', lambda x, zero: nn.relu(x))
  return use_nn_relu


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_values_and_gradient_equal_nn_relu(dtype):
  x = np.random.default_rng(0).normal(size=(4, 5, 5, 3)).astype(np.float32)
  x[0, 0, 0] = [np.nan, np.inf, -np.inf]
  x[0, 0, 1] = [0.0, -0.0, 1e-38]
  x[1] = np.round(x[1])          # exact zeros: where the gradient rule matters
  x = jnp.asarray(x, dtype)
  y = jax.jit(_ours)(x)
  y_ref = jax.jit(nn.relu)(x)
  assert y.dtype == y_ref.dtype
  np.testing.assert_array_equal(np.isnan(np.asarray(y, np.float32)),
                                np.isnan(np.asarray(y_ref, np.float32)))
  same = (y == y_ref) | (jnp.isnan(y) & jnp.isnan(y_ref))
  assert bool(same.all())
  g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), dtype)
  dx = jax.jit(lambda x: jax.vjp(_ours, x)[1](g)[0])(x)
  dx_ref = jax.jit(lambda x: jax.vjp(nn.relu, x)[1](g)[0])(x)
  assert bool((dx == dx_ref).all())
  assert float(dx[1][x[1] == 0].sum()) == 0.0


def test_nan_parameter_gives_nan_activation():
  # A diverged parameter must not be hidden: the activation is NaN.
  x = jnp.ones((2, 3))
  y = activations.relu(x, activations.channel_zero(jnp.array([0.0, np.nan, np.inf]), x.dtype))
  assert bool(jnp.isnan(y[:, 1:]).all()) and bool((y[:, 0] == 1).all())


def test_small_cnn_logits_and_gradients_equal_with_nn_relu(nn_relu_in_models):
  model = models.build('small_cnn', num_classes=10, widths=(8, 16, 32))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 28, 28, 1)).astype(np.float32))
  ours = logits_and_gradients(model, x)
  nn_relu_in_models()
  assert_trees_equal(ours, logits_and_gradients(model, x))


def test_mean_teacher_train_steps_equal_with_nn_relu(nn_relu_in_models):
  ours = mean_teacher_states()
  nn_relu_in_models()
  assert_trees_equal(ours, mean_teacher_states())
