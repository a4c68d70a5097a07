"""The linear output heads every sslj model puts on its pooled features.

Mean Teacher trains a classification head and a separate consistency head on
the same features ("dual output"), so every model takes `num_heads`; the
heads share nothing but the features.

A model may also record what its features were before their last ReLU
(`record_features_before_relu`, read back with `features_before_relu`):
DeepCluster's code clusters the network with its last ReLU removed. Each
model's docstring says what that is for it.

References:
  Tarvainen, Valpola. Mean teachers are better role models. NeurIPS 2017
    (Section 3.2, decoupling the classification and consistency outputs).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# The 'intermediates' entry that holds the features before the last ReLU.
FEATURES_BEFORE_RELU = 'features_before_relu'


def classifier_heads(module: nn.Module, features: jnp.ndarray,
                     return_features: bool, kernel_init=nn.linear.default_kernel_init):
  """Applies `module.num_heads` Dense heads to float32 `features` [B, D].

  Call inside `module`'s compact `__call__`; `module` must have the attributes
  `num_classes` and `num_heads`. Returns `features` when
  `return_features`, else float32 logits [B, num_classes] for one head or a
  tuple of them for several. During init the heads are always created, so a
  model initialised with return_features=True can still give logits later.
  `kernel_init` initialises the heads' weights (Flax's LeCun normal unless a
  model's reference code uses another).
  """
  if return_features and not module.is_initializing():
    return features
  # The heads run in float32 whatever the model's compute dtype: they are a
  # negligible share of the work and the losses want full-precision logits.
  outs = tuple(
      nn.Dense(module.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
               kernel_init=kernel_init,
               name='head' if module.num_heads == 1 else f'head_{k}')(
                   features.astype(jnp.float32))
      for k in range(module.num_heads))
  if return_features:
    return features
  return outs[0] if module.num_heads == 1 else outs


def record_features_before_relu(module: nn.Module, compute: Callable[[], jnp.ndarray]) -> None:
  """Records `compute()` [B, D] float32 as the features before the last ReLU.

  Only when the caller asked for them (`mutable=['intermediates']`) and not
  while initialising (the variables `init` returns stay as they were), so
  every other call computes nothing more.
  """
  if module.is_mutable_collection('intermediates') and not module.is_initializing():
    module.sow('intermediates', FEATURES_BEFORE_RELU, compute())


def features_before_relu(apply_fn, variables, x, **kwargs) -> jnp.ndarray:
  """The features a model records with `record_features_before_relu`, for inputs `x`."""
  _, state = apply_fn(variables, x, return_features=True, mutable=['intermediates'], **kwargs)
  return state['intermediates'][FEATURES_BEFORE_RELU][0]


def records_features_before_relu(model: nn.Module, x) -> bool:
  """Whether `model` records its features before the last ReLU, for inputs like `x`.

  Traced abstractly (`jax.eval_shape`): nothing is computed or compiled.
  """
  def intermediates(key):
    variables = model.init({'params': key, 'dropout': key}, x, train=False)
    return model.apply(variables, x, train=False, return_features=True,
                       mutable=['intermediates'])[1]
  return FEATURES_BEFORE_RELU in jax.eval_shape(intermediates, jax.random.key(0)).get(
      'intermediates', {})
