"""ReLU against a per-channel zero, so that XLA:CPU need not build a zero tensor.

`jax.nn.relu(x)` is `max(x, 0)`. On XLA:CPU the YNNPACK fusions that take a
BatchNorm + ReLU (+ max-pool) into the next convolution accept operands
broadcast along the channels (the BatchNorm's mean, scale and bias) but not a
broadcast scalar, so XLA materialises the zero at the activation's full size
(64x28x28x32 floats on the Fashion-MNIST step: a `wrapped_broadcast` fusion
written every step and read by every such convolution). A zero of shape [C]
is no better when it is a constant: XLA folds it back into a scalar
broadcast. `relu(x, zero)` takes the zero as an operand; `channel_zero(p)`
makes one from a per-channel parameter as `0 * p`, which XLA does not fold
(`0 * x` is not 0 when x is NaN or infinite), so it stays a [C] operand that
the fusion takes like the BatchNorm's bias (docs/PERFORMANCE.md).

The values are `jax.nn.relu`'s: `max(x, 0)` with NaN kept, and the gradient
is `jax.nn.relu`'s (`g` where `x > 0`, else 0; none to the zero). Only where
`p` itself is NaN or infinite does the zero become NaN, and then the
activation is NaN too; the loss is already non-finite there (the BatchNorm
adds `p` to every element), so the training loop's non-finite watch fires
as before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def channel_zero(param, dtype) -> jax.Array:
  """A zero per channel, `0 * param` in `dtype`, opaque to XLA's constant folding."""
  return lax.stop_gradient(jnp.asarray(param, dtype) * jnp.zeros((), dtype))


@jax.custom_jvp
def relu(x, zero):
  """`max(x, zero)`, with `zero` a [C] array of zeros broadcast over the last axis."""
  return jnp.maximum(x, zero)


@relu.defjvp
def _relu_jvp(primals, tangents):
  x, zero = primals
  g, _ = tangents
  # jax.nn.relu's rule: the gradient at x == 0 is 0.
  return relu(x, zero), lax.select(x > 0, g, lax.full_like(g, 0))
