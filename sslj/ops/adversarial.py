"""Virtual adversarial directions: per-example normalisation and the power iteration.

The virtual adversarial perturbation of a batch x is the r of norm epsilon
(per example) that most increases a divergence D(r) between the prediction
at x and at x + r, with D(0) = 0 and grad D(0) = 0. To second order
D(r) ~ r^T H r / 2, so r is epsilon times the top eigenvector of the
Hessian H of D at 0, found by the power iteration

  d <- normalize(grad_r D(r) at r = xi * normalize(d))   (num_iters times)

whose gradient at r = xi d equals xi H d + O(xi^2): a finite difference of
the gradient, one forward and backward pass per iteration. The functions
here take D as a function of r alone, so a method decides what it closes
over (the network, its variables, the target prediction, BatchNorm mode).

`normalize` is the reference code's `get_normalized_vector`: each example
is first divided by 1e-12 + its largest absolute value, then by
sqrt(1e-6 + its sum of squares) over all of its dimensions (pixels and
channels). The first division makes the 1e-6 negligible whatever the
scale of a gradient (which is tiny: about xi * H d / batch size), down to
the 1e-12 floor, below which an example's norm shrinks (a zero example
stays zero): so a perturbation's norm is epsilon unless its power-iteration
gradient vanished.

References: Miyato, Maeda, Koyama, Ishii 2018, "Virtual adversarial
training: a regularization method for supervised and semi-supervised
learning", TPAMI (Sec. 3: the power iteration and the finite
difference); reference code github.com/takerum/vat_tf (`vat.py`:
`get_normalized_vector`, `generate_virtual_adversarial_perturbation`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# The reference code's constants in `get_normalized_vector`.
MAX_ABS_FLOOR = 1e-12
SQUARED_NORM_FLOOR = 1e-6


def _example_axes(d):
  return tuple(range(1, d.ndim))


def normalize(d):
  """Each example of `d` ([B, ...]) to unit L2 norm over all its dimensions.

  d / (1e-12 + max |d|), then / sqrt(1e-6 + sum d^2), per example: the norm
  is 1 - O(1e-6) unless max |d| is near or below 1e-12.
  """
  axes = _example_axes(d)
  d = d / (MAX_ABS_FLOOR + jnp.max(jnp.abs(d), axis=axes, keepdims=True))
  return d / jnp.sqrt(SQUARED_NORM_FLOOR + jnp.sum(d * d, axis=axes, keepdims=True))


def example_norms(d):
  """The L2 norm of each example of `d` over all its dimensions, [B]."""
  return jnp.sqrt(jnp.sum(jnp.square(d.astype(jnp.float32)), axis=_example_axes(d)))


def power_iteration(divergence: Callable, d, *, xi: float, num_iters: int):
  """(direction, last gradient): `num_iters` finite-difference power iterations.

  `divergence(r)` is a scalar function of a perturbation shaped like `d`;
  `d` is the starting vector (the method draws it from N(0, I)). Returns
  `normalize(g)` of the last gradient g = grad divergence(xi * normalize(d))
  and g itself (for diagnostics: it vanishes where the finite difference
  is lost to rounding). No gradient flows out of either.
  """
  if num_iters < 1:
    raise ValueError(f'num_iters={num_iters} must be at least 1')
  grad = jax.grad(divergence)

  def one(_, d):
    return jax.lax.stop_gradient(grad(xi * normalize(d)))

  g = jax.lax.fori_loop(0, num_iters, one, jax.lax.stop_gradient(d))
  return normalize(g), g


def virtual_adversarial_perturbation(divergence: Callable, d, *, xi: float, epsilon: float,
                                     num_iters: int = 1):
  """(r_adv, last power-iteration gradient): r_adv = epsilon * the power iteration's direction."""
  direction, g = power_iteration(divergence, d, xi=xi, num_iters=num_iters)
  return epsilon * direction, g
