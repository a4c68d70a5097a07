"""A small batch-normalised CNN for tiny images and CPU-sized runs.

Three stages of [conv 3x3, BN, ReLU] with widths (32, 64, 128); every stage
but the last ends in a 2x2 max-pool while the map is at least 8 pixels high, so
28x28 Fashion-MNIST goes 28 -> 14 -> 7 and the 8x8 digits go 8 -> 4 -> 4
(never pooling below 4x4 keeps spatial structure for the last stage). Global
average pooling gives the features, then the dense heads. The features
before the last ReLU (`heads.record_features_before_relu`) are the network
with that ReLU removed: the last stage's BatchNorm output averaged over
positions. ReLU and averaging do not commute, so relu of them is not the
features (it is at most them, elementwise). It exists so the
default `digits` runs and the Fashion-MNIST runs finish in minutes on a
laptop CPU; the ResNets and ConvLarge are the models of the papers.

References:
  Ioffe, Szegedy. Batch Normalization: Accelerating Deep Network Training by
    Reducing Internal Covariate Shift. ICML 2015.
  Lin, Chen, Yan. Network In Network. ICLR 2014 (global average pooling).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sslj.models.heads import classifier_heads, record_features_before_relu
from sslj.ops import activations, pooling

# Stages pool only while the map is at least this high (see module docstring).
MIN_POOL_HEIGHT = 8


class SmallCNN(nn.Module):
  """Small CNN classifier.

  Attributes:
    num_classes: logits per head.
    num_heads: linear heads on the shared features (2 for Mean Teacher).
    widths: channels of each [conv, BN, ReLU] stage.
    dropout_rate: dropout on the pooled features in training (0 = off); needs
      the 'dropout' rng when > 0 and train=True.
    first_kernel_size: side of the first convolution's kernel (3 like the
      others by default). A larger one (5, 7) gives first-layer filters that
      can be read as pictures (edges, blobs), as the 7x7 and 11x11 first
      layers of the ResNets and AlexNet do; 3x3 filters of one grey channel
      are nine numbers each.
    bn_momentum: decay of BatchNorm's running averages (Flax's convention:
      running = m * running + (1 - m) * batch; PyTorch's momentum is 1 - m).
    dtype: compute dtype; parameters stay float32.
  """
  num_classes: int
  num_heads: int = 1
  widths: Sequence[int] = (32, 64, 128)
  dropout_rate: float = 0.0
  first_kernel_size: int = 3
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding='SAME',
                             use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
                             param_dtype=jnp.float32)
    x = jnp.asarray(x, self.dtype)
    for i, width in enumerate(self.widths):
      kernel = self.first_kernel_size if i == 0 else 3
      bn = norm()
      x = bn(conv(width, kernel_size=(kernel, kernel))(x))
      if i == len(self.widths) - 1:
        record_features_before_relu(
            self, lambda x=x: jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
      # nn.relu's values and gradient, against a per-channel zero that XLA:CPU
      # does not materialise at the activation's size (sslj.ops.activations).
      x = activations.relu(x, activations.channel_zero(bn.variables['params']['bias'], x.dtype))
      if i < len(self.widths) - 1 and x.shape[1] >= MIN_POOL_HEIGHT:
        x = pooling.max_pool(x, (2, 2), strides=(2, 2))
    # Pool in float32: a bf16 mean over many positions loses precision.
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if return_features and not self.is_initializing():
      return features
    # Dropout acts on what the heads see; returned features stay clean.
    pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    logits = classifier_heads(self, pooled, return_features=False)
    return features if return_features else logits
