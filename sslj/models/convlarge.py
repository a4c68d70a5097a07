"""The 13-layer "ConvLarge" CNN of Temporal Ensembling and Mean Teacher.

  [input noise N(0, 0.15^2) in training: config.augment.noise_std]
  3 x [conv 128 3x3 same, BN, LeakyReLU 0.1]
  max-pool 2x2/2, dropout 0.5
  3 x [conv 256 3x3 same, BN, LeakyReLU 0.1]
  max-pool 2x2/2, dropout 0.5
  conv 512 3x3 valid, conv 256 1x1, conv 128 1x1 (each BN, LeakyReLU 0.1)
  global average pool, dense heads

On 32x32 inputs the valid conv leaves 6x6 maps, which the paper averages. On
inputs smaller than 12 pixels (the 8x8 digits) two pools leave maps under
3x3, so that conv is padded ('same') instead: the network still runs, with
the same parameters.

References:
  Laine, Aila. Temporal Ensembling for Semi-Supervised Learning. ICLR 2017
    (Table 5, the network).
  Tarvainen, Valpola. Mean teachers are better role models. NeurIPS 2017
    (Appendix B.1, Table 5: the same network with batch normalisation).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sslj.models.heads import classifier_heads
from sslj.ops import pooling


class ConvLarge(nn.Module):
  """ConvLarge classifier.

  Attributes:
    num_classes: logits per head.
    num_heads: linear heads on the shared features (2 for Mean Teacher).
    dropout_rate: dropout after each pooling (0.5 in the papers).
    bn_momentum: decay of BatchNorm's running averages (Flax's convention:
      running = m * running + (1 - m) * batch; PyTorch's momentum is 1 - m).
    dtype: compute dtype; parameters stay float32.

  When train=True, `apply` needs the 'dropout' rng (if dropout_rate > 0). The
  papers' Gaussian input noise is not a layer here: it is the preprocessing's
  `augment.noise_std`, so every model can use it (the same noise on the
  normalised input).
  """
  num_classes: int
  num_heads: int = 1
  dropout_rate: float = 0.5
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=jnp.float32,
                             use_bias=False)  # BN's bias makes a conv bias redundant.
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
                             param_dtype=jnp.float32)

    def block(y, features, kernel, padding='SAME'):
      y = conv(features, (kernel, kernel), padding=padding)(y)
      return nn.leaky_relu(norm()(y), negative_slope=0.1)

    x = jnp.asarray(x, self.dtype)

    for features in (128, 256):
      for _ in range(3):
        x = block(x, features, 3)
      x = pooling.max_pool(x, (2, 2), strides=(2, 2))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)

    small = min(x.shape[1], x.shape[2]) < 3
    x = block(x, 512, 3, padding='SAME' if small else 'VALID')
    x = block(x, 256, 1)
    x = block(x, 128, 1)

    # Pool in float32: a bf16 mean over many positions loses precision.
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return classifier_heads(self, features, return_features)
