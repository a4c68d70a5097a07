"""Fixed filters applied to normalised images before a network, by name.

A run's reported network (`sslj.methods.base.Reported.front_end`) and an
export name their front end here, so features, predictions and a loaded
export apply the same filter the network was trained behind.

References: Caron et al. 2018, "Deep clustering for unsupervised learning of
visual features" (the Sobel front end; facebookresearch/deepcluster,
`models/alexnet.py`, a fixed `nn.Conv2d(1, 2, 3, padding=1)` after a
grayscale conversion).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SOBEL_X = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)


def sobel(x: jax.Array) -> jax.Array:
  """Grayscale (channel mean), then the horizontal and vertical 3x3 Sobel filters.

  Cross-correlation with zero padding, as the paper's `nn.Conv2d(1, 2, 3,
  padding=1)`: [B, H, W, C] -> [B, H, W, 2].
  """
  gray = jnp.mean(x, axis=-1, keepdims=True)
  kernel = jnp.asarray(np.stack([SOBEL_X, SOBEL_X.T], axis=-1)[:, :, None, :])
  return jax.lax.conv_general_dilated(gray, kernel, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision=jax.lax.Precision.HIGHEST)


FRONT_ENDS = {'sobel': sobel}
