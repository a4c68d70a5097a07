"""The Exemplar-CNN networks: 64c5-64c5-128f and 64c5-128c5-256c5-512f.

"64c5" is a convolution with 64 filters of 5x5, "128f" a fully connected
layer of 128 units; every layer is followed by a ReLU, the first two
convolutions by 2x2 max-pooling, the fully connected layer by dropout, and a
softmax over the surrogate classes tops it (the `classifier_heads`).

The fully connected layer is written as a VALID convolution whose window is
the whole feature map of a training patch (`input_size` / 4): on a training
patch it is exactly a dense layer on the flattened map, and on a larger image
it slides, so the network can be applied convolutionally to whole images as
the paper does to compute features.

Features (`return_features=True`): as in the paper, the responses of every
layer but the softmax, each feature map max-pooled over the four quadrants of
the image and concatenated: 4 x (64 + 64 + 128) = 1,024 values for the
small network, 4 x (64 + 128 + 256 + 512) = 3,840 for the large one.

Departures from the paper: SAME padding (the paper's padding is not
stated), no BatchNorm (the paper predates it), and for maps with an odd
side the two halves of the quadrant split share the middle row/column.

References:
  Dosovitskiy, Springenberg, Riedmiller & Brox, "Discriminative unsupervised
    feature learning with convolutional neural networks", NIPS 2014.
  Dosovitskiy, Fischer, Springenberg, Riedmiller & Brox, "Discriminative
    unsupervised feature learning with exemplar convolutional neural
    networks", TPAMI 2016.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sslj.errors import UserError
from sslj.models.heads import classifier_heads
from sslj.ops import pooling


def quadrant_max(x):
  """Max over each quadrant of [B, H, W, C] maps: [B, 4C], quadrant-major.

  Halves are rows [0, ceil(H/2)) and [floor(H/2), H): disjoint for even H,
  sharing the middle row for odd H, and both the single row when H = 1 (the
  fully connected layer's 1x1 map on a training patch).
  """
  h, w = x.shape[1:3]
  rows = (slice(0, (h + 1) // 2), slice(h // 2, h))
  cols = (slice(0, (w + 1) // 2), slice(w // 2, w))
  return jnp.concatenate([jnp.max(x[:, r, c], axis=(1, 2)) for r in rows for c in cols],
                         axis=-1)


class ExemplarCNN(nn.Module):
  """Exemplar-CNN classifier over surrogate classes.

  Attributes:
    num_classes: surrogate classes (seed patches).
    num_heads: linear heads on the fully connected features.
    conv_widths: filters of each 5x5 convolution.
    fc_width: units of the fully connected layer.
    input_size: side of the training patches; fixes the fully connected
      layer's window (input_size / 2**pooled_layers).
    pooled_layers: convolutions followed by 2x2 max-pooling (the first ones).
    dropout_rate: dropout on the fully connected layer in training.
    dtype: compute dtype; parameters stay float32.
  """
  num_classes: int
  num_heads: int = 1
  conv_widths: Sequence[int] = (64, 64)
  fc_width: int = 128
  input_size: int = 32
  pooled_layers: int = 2
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    window = self.input_size
    for _ in range(self.pooled_layers):
      window //= 2
    if window < 1:
      raise UserError(f'exemplar network: input_size={self.input_size} is too small for '
                      f'{self.pooled_layers} 2x2 poolings.')
    conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=jnp.float32)
    in_hw = x.shape[1:3]
    x = jnp.asarray(x, self.dtype)
    maps = []
    for i, width in enumerate(self.conv_widths):
      x = nn.relu(conv(width, (5, 5), padding='SAME')(x))
      maps.append(x)
      if i < self.pooled_layers:
        x = pooling.max_pool(x, (2, 2), strides=(2, 2))
    fc = nn.relu(conv(self.fc_width, (window, window), padding='VALID', name='fc')(x))
    maps.append(fc)
    # Pooled in float32, like the other models' features.
    features = lambda: jnp.concatenate([quadrant_max(m.astype(jnp.float32)) for m in maps],
                                       axis=-1)
    if return_features and not self.is_initializing():
      return features()
    if fc.shape[1:3] != (1, 1):
      raise UserError(f'exemplar network: logits need {self.input_size}x{self.input_size} '
                      f'inputs, got {in_hw[0]}x{in_hw[1]}; use return_features=True on '
                      'images of other sizes.')
    hidden = nn.Dropout(self.dropout_rate, deterministic=not train)(
        fc.reshape(fc.shape[0], -1).astype(jnp.float32))
    logits = classifier_heads(self, hidden, return_features=False)
    return features() if return_features else logits  # the former: initialising


# The attributes each preset fixes (the model registry's presets).
PRESETS = {
    'exemplar_small': dict(conv_widths=(64, 64), fc_width=128, pooled_layers=2),  # 64c5-64c5-128f
    'exemplar_large': dict(conv_widths=(64, 128, 256), fc_width=512,
                           pooled_layers=2),  # 64c5-128c5-256c5-512f
}


def exemplar_small(**kw):
  """64c5-64c5-128f."""
  return ExemplarCNN(**PRESETS['exemplar_small'], **kw)


def exemplar_large(**kw):
  """64c5-128c5-256c5-512f."""
  return ExemplarCNN(**PRESETS['exemplar_large'], **kw)
