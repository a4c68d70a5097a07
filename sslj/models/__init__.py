"""Flax Linen classifiers, built by name.

Every model takes NHWC float images and is called as
`module.apply(variables, x, train=False, return_features=False, rngs=...)`:
it returns float32 logits [B, num_classes] (a tuple of `num_heads` of them
when num_heads > 1), or the float32 pooled penultimate features [B, D] when
return_features=True. BatchNorm statistics live in the 'batch_stats'
collection (pass mutable=['batch_stats'] with train=True). Parameters are
float32 whatever the compute `dtype`.

A model name is a module class and the attributes the name fixes (`Preset`);
the class's other attributes are the model's fields (`fields(name)`), which
`config.model.<field>` sets. `bn_momentum`, a field of every model with
BatchNorm, is Flax's `BatchNorm.momentum`: the decay of the running averages,
running = bn_momentum * running + (1 - bn_momentum) * batch, as TF's
`momentum`; PyTorch's `momentum` is the weight of the batch, 1 - bn_momentum.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from sslj.errors import UserError
from sslj.models.alexnet import AlexNet
from sslj.models.convlarge import ConvLarge
from sslj.models.dcgan import DCGANDiscriminator, DCGANGenerator
from sslj.models import exemplar as _exemplar
from sslj.models import resnet as _resnet
from sslj.models import wide_resnet as _wide_resnet
from sslj.models.resnet import ResNet
from sslj.models.small_cnn import SmallCNN
from sslj.models.wide_resnet import WideResNet


class Preset(NamedTuple):
  """A model name: its Flax module class and the attributes the name fixes."""
  module: type
  fixed: dict


_REGISTRY: dict[str, Preset] = {
    'small_cnn': Preset(SmallCNN, {}),
    'alexnet': Preset(AlexNet, {}),
    'convlarge': Preset(ConvLarge, {}),
    'exemplar_small': Preset(_exemplar.ExemplarCNN, _exemplar.PRESETS['exemplar_small']),
    'exemplar_large': Preset(_exemplar.ExemplarCNN, _exemplar.PRESETS['exemplar_large']),
    'dcgan_discriminator': Preset(DCGANDiscriminator, {}),
    **{f'resnet{d}': Preset(ResNet, fixed) for d, fixed in _resnet.PRESETS.items()},
    **{name: Preset(WideResNet, fixed) for name, fixed in _wide_resnet.PRESETS.items()},
}

NAMES = tuple(_REGISTRY)

# Generators (latent vectors -> images); not classifiers, so not in NAMES.
GENERATORS: dict[str, Preset] = {'dcgan': Preset(DCGANGenerator, {})}

# Attributes `build` / `build_generator` set themselves (and Flax's own):
# never model fields of a config.
_SET_BY_BUILD = ('parent', 'name', 'num_classes', 'num_heads', 'dtype', 'image_shape')


def _fields(preset: Preset) -> dict[str, Any]:
  out = {}
  for f in dataclasses.fields(preset.module):
    if not f.init or f.name in _SET_BY_BUILD or f.name in preset.fixed:
      continue
    if f.default is not dataclasses.MISSING:
      out[f.name] = f.default
    elif f.default_factory is not dataclasses.MISSING:
      out[f.name] = f.default_factory()
  return out


def fields(name: str) -> dict[str, Any]:
  """The attributes of model `name` a config may set (`config.model.<field>`),
  with their defaults: the module's dataclass fields less those the name fixes
  (e.g. a ResNet's depth) and those `build` sets. {} for names not registered.
  """
  preset = _REGISTRY.get(name) or GENERATORS.get(name)
  return _fields(preset) if preset else {}


def check_options(name: str, options) -> None:
  """Refuses, in one line naming the allowed ones, options model `name` lacks.

  Raises:
    UserError: an option that is not one of `fields(name)`.
  """
  allowed = fields(name)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise UserError(f'model {name} has no field {", ".join(unknown)}; its fields are '
                    f'{", ".join(sorted(allowed)) or "none"}.')


def build_generator(name: str, *, image_shape, dtype: Any = jnp.float32, **kw) -> nn.Module:
  """The generator `name` for images of `image_shape` (H, W, C).

  Raises:
    UserError: unknown name or keyword.
  """
  if name not in GENERATORS:
    raise UserError(f'unknown generator {name!r}; valid generators: {", ".join(GENERATORS)}')
  check_options(name, kw)
  preset = GENERATORS[name]
  return preset.module(image_shape=tuple(image_shape), dtype=dtype, **preset.fixed, **kw)


def build(name: str, *, num_classes: int, dtype: Any = jnp.float32,
          num_heads: int = 1, **kw) -> nn.Module:
  """The model `name` with `num_classes` outputs per head.

  Args:
    name: one of NAMES.
    num_classes: logits per head.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    num_heads: number of linear heads on the shared features.
    **kw: further attributes of the model class, any of `fields(name)` (e.g.
      stem='small' for the ResNets, bn_momentum for every model with
      BatchNorm, widths for small_cnn).

  Raises:
    UserError: unknown name, bad class/head count or unknown keyword.
  """
  if name not in _REGISTRY:
    raise UserError(f'unknown model {name!r}; valid models: {", ".join(NAMES)}')
  if num_classes < 1 or num_heads < 1:
    raise UserError(f'model {name}: num_classes ({num_classes}) and num_heads '
                    f'({num_heads}) must be positive')
  check_options(name, kw)
  preset = _REGISTRY[name]
  return preset.module(num_classes=num_classes, dtype=dtype, num_heads=num_heads,
                       **preset.fixed, **kw)


__all__ = ['GENERATORS', 'NAMES', 'build', 'build_generator', 'check_options', 'fields',
           'ConvLarge', 'DCGANDiscriminator', 'DCGANGenerator', 'ResNet', 'SmallCNN',
           'WideResNet']
