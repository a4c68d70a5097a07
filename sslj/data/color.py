"""Saturation and hue adjustments of float RGB images, branch-free and jit-safe.

Used by `sslj.data.augment`'s colour jitter (and RandAugment's colour ops
through it). The tests compare them with dm-pix on concrete inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Saturation and hue are computed here rather than with dm-pix's
# adjust_saturation / adjust_hue (same HSV definitions, same results on
# concrete inputs; the tests compare them). dm-pix picks each pixel's hue
# formula by float equality (`value == red`, `value == green`) and rebuilds
# the image with a channel stack. Under jit on XLA:CPU (jax 0.10.2), after a
# resampling, that fused program returned wrong colours (channels as if the
# blue formula had been used) even with an optimization_barrier; the forms
# below use no float equality and no stack, and agree with and without jit.


def adjust_saturation(image: jax.Array, factor) -> jax.Array:
  """Scales HSV saturation by `factor` (clipped at 1), keeping hue and value.

  With v = max, m = min over RGB and s = (v - m) / v, every channel is
  c = v - v*s*(1 - d_c(hue)); so a new saturation s' gives
  c' = v - (v - c) * s'/s, where s'/s = min(factor, v / (v - m)).
  """
  v = jnp.max(image, axis=-1, keepdims=True)
  chroma = v - jnp.min(image, axis=-1, keepdims=True)
  ratio = jnp.minimum(factor, v / jnp.where(chroma > 0, chroma, 1.0))
  return jnp.where(chroma > 0, v - (v - image) * ratio, image)


def adjust_hue(image: jax.Array, delta) -> jax.Array:
  """Rotates HSV hue by `delta` turns, keeping saturation and value.

  Hue in sextants is h6 = (g - b)/C, (b - r)/C + 2 or (r - g)/C + 4 for a
  red, green or blue maximum (C = max - min); choosing the maximum by
  argmax, not float equality, can only pick a near-tie, where the formulas
  agree. Back to RGB: c = v - C * clip(min(k, 4 - k), 0, 1) with
  k = (n_c + h6) mod 6, n = (5, 3, 1) for (r, g, b).
  """
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  v = jnp.max(image, axis=-1)
  chroma = v - jnp.min(image, axis=-1)
  safe = jnp.where(chroma > 0, chroma, 1.0)
  top = jnp.argmax(image, axis=-1)
  h6 = jnp.where(top == 0, (g - b) / safe,
                 jnp.where(top == 1, (b - r) / safe + 2, (r - g) / safe + 4))
  h6 = h6 + 6 * delta
  h6 = h6 - 6 * jnp.floor(h6 / 6)  # mod 6; jnp.mod's remainder is slower
  k = jnp.array([5.0, 3.0, 1.0]) + h6[..., None]
  k = jnp.where(k >= 6, k - 6, k)  # mod 6, as k lies in [0, 12)
  return v[..., None] - chroma[..., None] * jnp.clip(jnp.minimum(k, 4 - k), 0, 1)
