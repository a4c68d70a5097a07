"""Consistency costs and ramps of Mean Teacher (and Pi-model-style methods).

All functions average over the batch and return float32 scalars.

References: Tarvainen & Valpola 2017, "Mean teachers are better role models";
Laine & Aila 2017, "Temporal ensembling for semi-supervised learning"
(the sigmoid ramp-up exp(-5 (1 - t)^2)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_mse(student_logits, teacher_logits):
  """Mean over the batch of sum_k (p_s - p_t)^2 / K, as the original code divides by K."""
  ps = jax.nn.softmax(student_logits.astype(jnp.float32), axis=-1)
  pt = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum((ps - pt) ** 2, axis=-1)) / student_logits.shape[-1]


def softmax_kl(student_logits, teacher_logits):
  """Mean over the batch of KL(p_teacher || p_student)."""
  log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1))


def logit_distance(a, b):
  """Mean over the batch of sum_k (a - b)^2 / K: the cost tying the two heads."""
  diff = a.astype(jnp.float32) - b.astype(jnp.float32)
  return jnp.mean(jnp.sum(diff ** 2, axis=-1)) / a.shape[-1]


def sigmoid_rampup(progress, length):
  """exp(-5 (1 - t)^2) with t = clip(progress / length, 0, 1); 1 when length is 0."""
  if length == 0:
    return jnp.ones((), jnp.float32)
  t = jnp.clip(jnp.asarray(progress, jnp.float32) / length, 0.0, 1.0)
  return jnp.exp(-5.0 * (1.0 - t) ** 2)


def linear_ramp(progress, start, end, final_value):
  """0 before `start`, rising linearly to `final_value` at `end`, then flat.

  Pseudo-Label's alpha(t) schedule (Lee 2013, with T1 = start, T2 = end).
  """
  progress = jnp.asarray(progress, jnp.float32)
  if end <= start:
    return jnp.where(progress >= start, final_value, 0.0).astype(jnp.float32)
  t = jnp.clip((progress - start) / (end - start), 0.0, 1.0)
  return (t * final_value).astype(jnp.float32)
