"""ResNet-18/34/50/101/152 in Flax Linen, NHWC.

Basic blocks (two 3x3 convs) for ResNet-18/34, bottleneck blocks (1x1, 3x3,
1x1 with 4x expansion) for ResNet-50/101/152. The bottleneck puts its stride
on the 3x3 conv (the "v1.5" placement used by torchvision and the Flax
ImageNet example), which is more accurate than the paper's stride on the first
1x1 and has the same parameter count. Shortcuts are identity, or a strided 1x1
conv + BN projection where the shape changes (the paper's option B).

Parameters are float32; `dtype` sets the compute dtype (e.g. bfloat16) and
the logits are cast back to float32 so losses are computed at full precision.

References:
  He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
  Goyal et al. Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour.
    2017 (zero-initialised last BN scale of each residual branch).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sslj.errors import UserError
from sslj.models.heads import classifier_heads
from sslj.ops import pooling

STEMS = ('imagenet', 'small', 'auto')

# Inputs at most this many pixels high get the 'small' stem under stem='auto':
# the ImageNet stem divides the size by 4 before the first stage, which would
# leave 32x32 images with a 1x1 map after the last stage, while 96x96 (STL-10)
# images still end with 3x3 maps and 4x less compute than with the small stem.
AUTO_SMALL_STEM_MAX_HEIGHT = 64

# He et al. initialise convs with N(0, 2 / fan) ("MSRA" init; fan_out as in
# torchvision), keeping the activation variance constant through ReLUs.
_he_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def resolve_stem(stem: str, height: int) -> str:
  """The concrete stem ('imagenet' or 'small') for `stem` at input `height`."""
  if stem not in STEMS:
    raise UserError(f'unknown ResNet stem {stem!r}; use one of {", ".join(STEMS)}')
  if stem == 'auto':
    return 'small' if height <= AUTO_SMALL_STEM_MAX_HEIGHT else 'imagenet'
  return stem


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection (ResNet-18/34)."""
  features: int
  strides: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.features, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3))(y)
    y = self.norm(last=True)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.features, (1, 1), (self.strides, self.strides),
                           name='proj_conv')(residual)
      residual = self.norm(name='proj_bn')(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, residual (ResNet-50+)."""
  features: int
  strides: int
  conv: Any
  norm: Any
  expansion: int = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.features, (1, 1))(x)))
    y = self.conv(self.features, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features * self.expansion, (1, 1))(y)
    y = self.norm(last=True)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.features * self.expansion, (1, 1),
                           (self.strides, self.strides), name='proj_conv')(residual)
      residual = self.norm(name='proj_bn')(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """A ResNet classifier.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block_cls: BasicBlock or BottleneckBlock.
    num_classes: logits per head.
    num_heads: number of linear heads on the shared pooled features (2 for
      Mean Teacher's classification + consistency outputs).
    width: channels of the first stage; later stages double it.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool), 'small' (3x3/1 conv, no
      pool) or 'auto' ('small' when the input is at most
      AUTO_SMALL_STEM_MAX_HEIGHT pixels high, else 'imagenet').
    zero_init_residual: start each residual branch's last BN scale at zero, so
      every block begins as the identity (Goyal et al. 2017).
    bn_momentum: decay of BatchNorm's running averages (Flax's convention:
      running = m * running + (1 - m) * batch); 0.9 is torchvision's
      momentum=0.1, which weighs the batch instead.
    dtype: compute dtype; parameters stay float32.
  """
  stage_sizes: Sequence[int]
  block_cls: Any
  num_classes: int
  num_heads: int = 1
  width: int = 64
  stem: str = 'auto'
  zero_init_residual: bool = False
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  def __post_init__(self):
    resolve_stem(self.stem, 0)  # a bad stem fails when the model is built, not in jit
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, padding='SAME',
                             kernel_init=_he_init, dtype=self.dtype,
                             param_dtype=jnp.float32)

    def norm(last: bool = False, name: str | None = None):
      scale_init = (nn.initializers.zeros if last and self.zero_init_residual
                    else nn.initializers.ones)
      # eps 1e-5 as in the reference models.
      return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                          epsilon=1e-5, scale_init=scale_init,
                          dtype=self.dtype, param_dtype=jnp.float32, name=name)

    x = jnp.asarray(x, self.dtype)
    if resolve_stem(self.stem, x.shape[1]) == 'imagenet':
      # torchvision pads the 7x7/2 conv by 3 and the pool by 1 on each side;
      # explicit padding keeps the same output grid for even sizes.
      x = conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
               name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = pooling.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(self.width, (3, 3), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))

    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.width * 2 ** i, strides, conv=conv, norm=norm,
                           name=f'stage{i + 1}_block{j + 1}')(x)

    # Pool in float32: a bf16 mean over many positions loses precision.
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return classifier_heads(self, features, return_features)


_BLOCKS = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), BottleneckBlock),
    101: ((3, 4, 23, 3), BottleneckBlock),
    152: ((3, 8, 36, 3), BottleneckBlock),
}


# The attributes each depth fixes (the model registry's presets).
PRESETS = {depth: dict(stage_sizes=stage_sizes, block_cls=block_cls)
           for depth, (stage_sizes, block_cls) in _BLOCKS.items()}


def resnet(depth: int, *, num_classes: int, **kw) -> ResNet:
  """ResNet-`depth` (18, 34, 50, 101 or 152); `kw` are ResNet attributes."""
  if depth not in _BLOCKS:
    raise UserError(f'unknown ResNet depth {depth}; use one of {sorted(_BLOCKS)}')
  return ResNet(num_classes=num_classes, **PRESETS[depth], **kw)
