"""The pre-activation Wide ResNet of the FixMatch and MixMatch code, NHWC.

The network every FixMatch/MixMatch/ReMixMatch table was measured with
(`ResNet.classifier` in libml/models.py of github.com/google-research/FixMatch
and github.com/google-research/mixmatch):

  conv 3x3, 16 channels
  `groups` groups of `blocks_per_group` residual blocks; group g has
    16 * widen_factor * 2**g channels, and its first block strides 2
    (except in the first group)
  BN, leaky ReLU 0.1, global average pool, dense heads

A block is pre-activation: a = lrelu(BN(x)); y = conv3x3(lrelu(BN(conv3x3(a)))),
the first conv carrying the block's stride; out = shortcut + y. The shortcut
is x itself, or a strided 1x1 conv where the channels change. The first block
of the network ("activate before residual") feeds its shortcut a instead of x;
the first blocks of the later groups feed their 1x1 shortcut conv the raw x,
as the reference code does (the PyTorch ports differ here: USB's activates
every changing shortcut, kekmodel/FixMatch-pytorch feeds the raw x to the
first conv of those blocks).

As the reference: every conv has a bias and N(0, 2 / (k * k * out_channels))
weights (He init, fan-out, not truncated); BatchNorm has epsilon 1e-3 and
decay 0.999 (`bn_momentum`, see below); the head's weights are Glorot normal
(truncated, as TF 1's `glorot_normal_initializer`); convs are 'SAME'-padded
as TF pads them (a stride-2 3x3 conv pads one pixel at the bottom/right only).

Presets (the reference's flags; parameter counts for 10 classes unless said):
  wrn28_2: 3 groups of 4 blocks, 32/64/128 channels (--filters=32, --scales=3
    for 32x32 images), CIFAR-10 and SVHN: 1,469,642 parameters (the papers'
    "1.5M").
  wrn28_8: --filters=128, CIFAR-100 (github.com/google-research/FixMatch issues
    #25 and #26, "it's --filters=128"): 23,409,092 parameters for 100 classes.
  wrn37_2: 4 groups (--scales=4, which the FixMatch code's training script
    derives for 96x96 images as ilog2(96) - 2), 32/64/128/256 channels, STL-10:
    5,933,770 parameters, the "~6M parameter model" of
    github.com/google-research/FixMatch issue #34 (comment of
    2020-10-12 listing the network; the MixMatch/ReMixMatch papers' "23.8M"
    was an error there). "37" counts its convs: 1 + 4 x 4 x 2 + 4 shortcuts.
Counts are trainable parameters (BatchNorm's running statistics are not), as
the reference's model listing counts them.

`bn_momentum` is Flax's `BatchNorm.momentum`, the decay of the running
averages: running = bn_momentum * running + (1 - bn_momentum) * batch. TF's
`tf.layers.batch_normalization(momentum=0.999)` of the reference means the
same, so 0.999 here; PyTorch's `momentum` is the weight of the batch instead,
so USB's (microsoft/Semi-supervised-learning, semilearn/nets/wrn/wrn.py)
`momentum=0.001` is the same 0.999.

Departures from the reference code: the input is normalised by the data
pipeline, not by the network; Flax's running variance averages the biased
batch variance where TF's fused batch norm averages the unbiased one, a
factor n / (n - 1) with n = batch x height x width >= 4,096 for a batch of 64
8x8 maps (under 0.03%, in the evaluation statistics only, so not A/B'd);
`num_heads` > 1 adds Mean Teacher's extra heads; `dtype` can lower the
compute precision (float32 by default, as the reference).

References:
  Zagoruyko, Komodakis. Wide Residual Networks. BMVC 2016.
  He, Zhang, Ren, Sun. Identity Mappings in Deep Residual Networks. ECCV 2016
    (pre-activation blocks).
  Oliver et al. Realistic Evaluation of Deep Semi-Supervised Learning
    Algorithms. NeurIPS 2018 (WRN-28-2 with leaky ReLU 0.1 as the common SSL
    benchmark network).
  Berthelot et al. MixMatch. NeurIPS 2019; Sohn et al. FixMatch. NeurIPS 2020
    (the code cited above).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sslj.models.heads import classifier_heads

# The stem's channels, fixed in the reference code whatever the width.
STEM_WIDTH = 16
LEAKY_SLOPE = 0.1

# The reference's conv init: stddev = rsqrt(0.5 * k * k * out_channels).
_he_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# TF 1's glorot_normal_initializer draws from a truncated normal.
_glorot_truncated = nn.initializers.variance_scaling(1.0, 'fan_avg', 'truncated_normal')

# name -> the attributes that make the preset (see the module docstring).
PRESETS = {
    'wrn28_2': dict(groups=3, blocks_per_group=4, widen_factor=2),
    'wrn28_8': dict(groups=3, blocks_per_group=4, widen_factor=8),
    'wrn37_2': dict(groups=4, blocks_per_group=4, widen_factor=2),
}


def _lrelu(x):
  return nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)


class PreActBlock(nn.Module):
  """One pre-activation residual block (see the module docstring)."""
  features: int
  strides: int
  activate_before_residual: bool
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    a = _lrelu(self.norm(name='bn1')(x))
    shortcut = a if self.activate_before_residual else x
    y = self.conv(self.features, (3, 3), (self.strides, self.strides), name='conv1')(a)
    y = _lrelu(self.norm(name='bn2')(y))
    y = self.conv(self.features, (3, 3), name='conv2')(y)
    if x.shape[-1] != self.features:
      shortcut = self.conv(self.features, (1, 1), (self.strides, self.strides),
                           name='shortcut')(shortcut)
    return shortcut + y


class WideResNet(nn.Module):
  """A pre-activation Wide ResNet classifier (FixMatch/MixMatch layout).

  Attributes:
    num_classes: logits per head.
    groups: groups of blocks; every group after the first halves the map.
    blocks_per_group: residual blocks per group.
    widen_factor: the first group has 16 * widen_factor channels.
    num_heads: linear heads on the pooled features (2 for Mean Teacher).
    bn_momentum: decay of BatchNorm's running averages (Flax's convention,
      see the module docstring); 0.999 as the reference code.
    dropout_rate: dropout on the pooled features before the heads in
      training (the reference's `dropout` flag, 0 by default); needs the
      'dropout' rng when > 0 and train=True.
    dtype: compute dtype; parameters stay float32.
  """
  num_classes: int
  groups: int = 3
  blocks_per_group: int = 4
  widen_factor: int = 2
  num_heads: int = 1
  bn_momentum: float = 0.999
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    conv = functools.partial(nn.Conv, padding='SAME', use_bias=True, kernel_init=_he_fan_out,
                             dtype=self.dtype, param_dtype=jnp.float32)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-3, dtype=self.dtype,
                             param_dtype=jnp.float32)
    x = conv(STEM_WIDTH, (3, 3), name='stem_conv')(jnp.asarray(x, self.dtype))
    for g in range(self.groups):
      for b in range(self.blocks_per_group):
        first = b == 0
        x = PreActBlock(STEM_WIDTH * self.widen_factor * 2 ** g,
                        strides=2 if first and g > 0 else 1,
                        activate_before_residual=first and g == 0,
                        conv=conv, norm=norm, name=f'group{g + 1}_block{b + 1}')(x)
    x = _lrelu(norm(name='final_bn')(x))
    # Pool in float32: a bf16 mean over many positions loses precision.
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if return_features and not self.is_initializing():
      return features
    # Dropout acts on what the heads see; returned features stay clean.
    pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    logits = classifier_heads(self, pooled, return_features=False,
                              kernel_init=_glorot_truncated)
    return features if return_features else logits
