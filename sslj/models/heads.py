"""The linear output heads every sslj model puts on its pooled features.

Mean Teacher trains a classification head and a separate consistency head on
the same features ("dual output"), so every model takes `num_heads`; the
heads share nothing but the features.

References:
  Tarvainen, Valpola. Mean teachers are better role models. NeurIPS 2017
    (Section 3.2, decoupling the classification and consistency outputs).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


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
