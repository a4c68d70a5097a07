"""Training signal annealing (TSA): UDA's release of the labeled loss over a run.

With few labels a network soon fits them while the unlabeled term is still
learning. TSA drops from the labeled loss every example whose predicted
probability of its own class already exceeds a threshold eta_t that rises
from 1/K to 1 over the run (K classes, t = step / total steps in [0, 1]):

  eta_t = alpha_t (1 - 1/K) + 1/K
  linear: alpha_t = t;  log: alpha_t = 1 - exp(-5 t);  exp: alpha_t = exp(5 (t - 1))

'log' releases the signal early, 'exp' late (for the problems that overfit
soonest); 'none' keeps every example (eta = 1). The loss averages the
cross-entropy over the examples kept, max(kept, 1) in the denominator, as
the UDA code does (USB averages over the whole batch instead).

References: Xie et al. 2020, "Unsupervised data augmentation for consistency
training" (Sec. 3.2, "training signal annealing", Fig. 2); reference code
github.com/google-research/uda (`image/main.py`: `get_tsa_threshold`,
`anneal_sup_loss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('none', 'linear', 'log', 'exp')
SCALE = 5.0  # the code's `scale` of the log and exp schedules


def threshold(schedule: str, progress, num_classes: int):
  """eta_t for `progress` t (a float32 scalar, clipped to [0, 1]); 1 for 'none'."""
  if schedule not in SCHEDULES:
    raise ValueError(f'unknown TSA schedule {schedule!r}; use one of {SCHEDULES}')
  if schedule == 'none':
    return jnp.ones((), jnp.float32)
  t = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
  if schedule == 'linear':
    alpha = t
  elif schedule == 'log':
    alpha = 1.0 - jnp.exp(-SCALE * t)
  else:
    alpha = jnp.exp(SCALE * (t - 1.0))
  return alpha * (1.0 - 1.0 / num_classes) + 1.0 / num_classes


def annealed_cross_entropy(logits, labels, eta):
  """(loss, kept float32 [B]): cross-entropy over the examples with p(label) <= eta.

  An example whose probability of its label is above `eta` is dropped (the
  mask is a constant for autodiff); the loss is the sum over the kept ones
  divided by max(number kept, 1).
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
  p_label = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
  kept = (p_label <= eta).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(kept * ce) / jnp.maximum(jnp.sum(kept), 1.0), kept
