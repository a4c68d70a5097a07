"""AlexNet with batch normalisation, the network DeepCluster trains.

DeepCluster's AlexNet (Caron et al. 2018, following Krizhevsky et al. 2012
without local response normalisation and without the two-GPU groups): five
convolutions with 96, 256, 384, 384, 256 channels, each followed by
BatchNorm and ReLU; 3x3 max-pools with stride 2 after the first, second and
fifth; then two fully connected layers of 4096 units with ReLU and dropout
0.5; then the linear head. The features (`return_features=True`) are the
second fully connected layer's output after its ReLU: what DeepCluster
clusters by default and what its linear probes here see. The features before
the last ReLU (`heads.record_features_before_relu`) are fc7's output before
its ReLU, what DeepCluster's code clusters; relu of them is the features.

The paper's layers are for 224x224 inputs (conv1 11x11 stride 4, conv2 5x5,
conv3-5 3x3, a 6x6x256 map at the end). So that the same network also runs
on small images, the first convolution adapts to the input height H:

  H >= 128: 11x11, stride 4 (the paper's; 224 -> 56 -> 28 -> 14 -> 7)
  64 <= H < 128: 11x11, stride 2 (STL-10's 96 -> 48 -> 24 -> 12 -> 6, the
    paper's 6x6 map)
  H < 64: 5x5, stride 1 (Fashion-MNIST's 28 -> 14 -> 7; digits' 8 -> 4)

Convolutions are 'SAME'-padded, and a max-pool is skipped when the map is
already below 8 pixels high (as in `small_cnn`), so 8x8 digits keep a 4x4
map. The first fully connected layer sees the whole flattened final map.

References:
  Krizhevsky, Sutskever & Hinton, "ImageNet classification with deep
    convolutional neural networks", NIPS 2012.
  Caron, Bojanowski, Joulin & Douze, "Deep clustering for unsupervised
    learning of visual features", ECCV 2018 (the BN variant, Section 5).
  Ioffe & Szegedy, "Batch normalization", ICML 2015.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sslj.models.heads import classifier_heads, record_features_before_relu
from sslj.ops import pooling

# Max-pools act only while the map is at least this high.
MIN_POOL_HEIGHT = 8
# The convolutions after which the paper max-pools (0-based).
_POOL_AFTER = (0, 1, 4)


def first_conv(height: int) -> tuple[int, int]:
  """(kernel size, stride) of conv1 for inputs `height` pixels high."""
  if height >= 128:
    return 11, 4
  if height >= 64:
    return 11, 2
  return 5, 1


class AlexNet(nn.Module):
  """AlexNet with BatchNorm (DeepCluster's variant).

  Attributes:
    num_classes: logits per head.
    num_heads: linear heads on the features.
    widths: channels of the five convolutions.
    fc_width: units of each of the two fully connected layers.
    dropout_rate: dropout before each fully connected layer in training;
      needs the 'dropout' rng when > 0 and train=True.
    bn_momentum: decay of BatchNorm's running averages (Flax's convention:
      running = m * running + (1 - m) * batch; PyTorch's momentum is 1 - m).
    dtype: compute dtype; parameters stay float32.
  """
  num_classes: int
  num_heads: int = 1
  widths: Sequence[int] = (96, 256, 384, 384, 256)
  fc_width: int = 4096
  dropout_rate: float = 0.5
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
                             param_dtype=jnp.float32)
    x = jnp.asarray(x, self.dtype)
    kernel, stride = first_conv(x.shape[1])
    for i, width in enumerate(self.widths):
      size = (kernel if i == 0 else 5 if i == 1 else 3,) * 2
      x = nn.Conv(width, size, strides=stride if i == 0 else 1, padding='SAME',
                  use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)(x)
      x = nn.relu(norm()(x))
      if i in _POOL_AFTER and x.shape[1] >= MIN_POOL_HEIGHT:
        x = pooling.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    x = x.reshape(x.shape[0], -1)
    for name in ('fc6', 'fc7'):
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.Dense(self.fc_width, dtype=self.dtype, param_dtype=jnp.float32, name=name)(x)
      if name == 'fc7':
        record_features_before_relu(self, lambda x=x: x.astype(jnp.float32))
      x = nn.relu(x)
    return classifier_heads(self, x.astype(jnp.float32), return_features=return_features)
