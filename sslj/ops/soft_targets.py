"""Soft targets from a network's own predictions, and the losses that use them.

MixMatch and UDA both turn predictions on unlabeled images into sharpened
class distributions and train other views towards them. The targets are
constants for autodiff: every function here that makes one stops the
gradient, so nothing flows back through the predictions that made it.

  sharpen(p, T)_k = p_k^(1/T) / sum_j p_j^(1/T)            (MixMatch, Eq. 7)
  temperature_targets(z, T) = softmax(z / T)               (UDA, Sec. 3.2)

The two agree: softmax(z / T) = sharpen(softmax(z), T). T < 1 lowers the
entropy; T = 1 leaves the distribution as it is.

References: Berthelot et al. 2019, "MixMatch: a holistic approach to
semi-supervised learning" (Eqs. 3-7); Xie et al. 2020, "Unsupervised data
augmentation for consistency training" (Sec. 3.2, "sharpening predictions").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def sharpen(p, temperature: float):
  """p^(1/T), renormalised over the last axis; a constant for autodiff."""
  p = jax.lax.stop_gradient(p).astype(jnp.float32)
  powered = p ** (1.0 / temperature)
  return powered / jnp.sum(powered, axis=-1, keepdims=True)


def temperature_targets(logits, temperature: float):
  """softmax(logits / T) in float32; a constant for autodiff."""
  return jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32) / temperature, axis=-1)


def temperature_log_targets(logits, temperature: float):
  """log softmax(logits / T) in float32; a constant for autodiff."""
  return jax.nn.log_softmax(jax.lax.stop_gradient(logits).astype(jnp.float32) / temperature,
                            axis=-1)


def kl_divergence(log_targets, logits):
  """Per example KL(target || softmax(logits)) = sum_k t_k (log t_k - log q_k), [B].

  `log_targets` are log-probabilities (a constant target: pass
  `temperature_log_targets`); zero-probability classes add nothing.
  """
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  t = jnp.exp(log_targets)
  return jnp.sum(jnp.where(t > 0, t * (log_targets - log_q), 0.0), axis=-1)


def soft_cross_entropy(logits, targets):
  """Mean over the batch of -sum_k t_k log softmax(logits)_k, in float32."""
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32),
                                              targets.astype(jnp.float32)))


def probability_mse(logits, targets):
  """Mean over the batch AND the K classes of (t_k - softmax(logits)_k)^2.

  MixMatch's L_U (Eq. 5) divides by K |U'|, as its code's `reduce_mean`
  over both axes does.
  """
  q = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean((targets.astype(jnp.float32) - q) ** 2)
