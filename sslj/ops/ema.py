"""The Mean Teacher weight average, as an optax-style transform.

Not `optax.ema`, which averages *gradient updates*: this averages the
student's *parameters* into the teacher after each optimizer step.

References: Tarvainen & Valpola 2017, "Mean teachers are better role models:
weight-averaged consistency targets improve semi-supervised deep learning
results" (Eq. 2 and the warm-up in their released code).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class EmaState(NamedTuple):
  count: jax.Array  # updates applied so far
  average: Any      # the teacher's parameters


class ParameterEma(NamedTuple):
  init: Any
  update: Any


def decay_at(count, decay: float):
  """`min(1 - 1/(t+1), decay)` for the t-th update (t = 1, 2, ...).

  Early on the average is short (0.5, 0.67, 0.75, ...), so the teacher is not
  anchored to the random initialisation for thousands of steps.
  """
  t = jnp.asarray(count, jnp.float32)
  return jnp.minimum(1.0 - 1.0 / (t + 1.0), decay)


def parameter_ema(decay: float, rampup_decay: float | None = None,
                  rampup_steps: int = 0) -> ParameterEma:
  """`init(params)` copies the student; `update(params, state)` folds them in.

  update returns `(teacher_params, new_state)` with
  teacher <- d_t * teacher + (1 - d_t) * params, computed by
  `optax.incremental_update(new, old, step_size=1 - d_t)`, where
  d_t = `decay_at(t, rampup_decay)` for the first `rampup_steps` updates
  (when `rampup_decay` is given) and `decay_at(t, decay)` after: the paper's
  "0.99 during the ramp-up, 0.999 for the rest of training" (Tarvainen &
  Valpola 2017, Appendix B) is `parameter_ema(0.999, 0.99, rampup_steps)`.
  """
  def init(params) -> EmaState:
    return EmaState(count=jnp.zeros((), jnp.int32),
                    average=jax.tree.map(jnp.asarray, params))

  def update(params, state: EmaState):
    count = state.count + 1
    d = decay_at(count, decay)
    if rampup_decay is not None and rampup_steps > 0:
      d = jnp.where(count <= rampup_steps, decay_at(count, rampup_decay), d)
    average = optax.incremental_update(params, state.average, step_size=1.0 - d)
    return average, EmaState(count=count, average=average)

  return ParameterEma(init, update)
