"""Flax Linen classifiers, built by name.

Every model takes NHWC float images and is called as
`module.apply(variables, x, train=False, return_features=False, rngs=...)`:
it returns float32 logits [B, num_classes] (a tuple of `num_heads` of them
when num_heads > 1), or the float32 pooled penultimate features [B, D] when
return_features=True. BatchNorm statistics live in the 'batch_stats'
collection (pass mutable=['batch_stats'] with train=True). Parameters are
float32 whatever the compute `dtype`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from sslj.errors import UserError
from sslj.models.alexnet import AlexNet
from sslj.models.convlarge import ConvLarge
from sslj.models.dcgan import DCGANDiscriminator, DCGANGenerator
from sslj.models import exemplar as _exemplar
from sslj.models import resnet as _resnet
from sslj.models.resnet import ResNet
from sslj.models.small_cnn import SmallCNN

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    'small_cnn': SmallCNN,
    'alexnet': AlexNet,
    'convlarge': ConvLarge,
    'exemplar_small': _exemplar.exemplar_small,
    'exemplar_large': _exemplar.exemplar_large,
    'dcgan_discriminator': DCGANDiscriminator,
    **{f'resnet{d}': functools.partial(_resnet.resnet, d) for d in (18, 34, 50, 101, 152)},
}

NAMES = tuple(_REGISTRY)

# Generators (latent vectors -> images); not classifiers, so not in NAMES.
GENERATORS: dict[str, Callable[..., nn.Module]] = {'dcgan': DCGANGenerator}


def build_generator(name: str, *, image_shape, dtype: Any = jnp.float32, **kw) -> nn.Module:
  """The generator `name` for images of `image_shape` (H, W, C).

  Raises:
    UserError: unknown name or keyword.
  """
  if name not in GENERATORS:
    raise UserError(f'unknown generator {name!r}; valid generators: {", ".join(GENERATORS)}')
  try:
    return GENERATORS[name](image_shape=tuple(image_shape), dtype=dtype, **kw)
  except TypeError as e:
    raise UserError(f'generator {name}: bad option ({e}); see the attributes of '
                    f'its class in sslj/models/') from e


def build(name: str, *, num_classes: int, dtype: Any = jnp.float32,
          num_heads: int = 1, **kw) -> nn.Module:
  """The model `name` with `num_classes` outputs per head.

  Args:
    name: one of NAMES.
    num_classes: logits per head.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    num_heads: number of linear heads on the shared features.
    **kw: further attributes of the model class (e.g. stem='small' for the
      ResNets, input_noise_std for ConvLarge, widths for small_cnn).

  Raises:
    UserError: unknown name, bad class/head count or unknown keyword.
  """
  if name not in _REGISTRY:
    raise UserError(f'unknown model {name!r}; valid models: {", ".join(NAMES)}')
  if num_classes < 1 or num_heads < 1:
    raise UserError(f'model {name}: num_classes ({num_classes}) and num_heads '
                    f'({num_heads}) must be positive')
  try:
    return _REGISTRY[name](num_classes=num_classes, dtype=dtype,
                           num_heads=num_heads, **kw)
  except TypeError as e:
    raise UserError(f'model {name}: bad option ({e}); see the attributes of '
                    f'its class in sslj/models/') from e


__all__ = ['GENERATORS', 'NAMES', 'build', 'build_generator', 'ConvLarge', 'DCGANDiscriminator',
           'DCGANGenerator', 'ResNet', 'SmallCNN']
