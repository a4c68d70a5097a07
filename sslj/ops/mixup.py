"""MixUp as MixMatch uses it, and the interleaving of MixMatch's forward passes.

`sample_mixup(key, n, alpha)` draws the randomness of one MixUp of n examples
from a key (so it runs inside a jitted step): per example a coefficient
lambda_i ~ Beta(alpha, alpha) (`jax.random.beta`) and one uniform
permutation that picks each example's partner. `mixup(x, y, lam, perm)` is
the pure mix (MixMatch, Eqs. 8-11):

  lambda'_i = max(lambda_i, 1 - lambda_i)
  x'_i = lambda'_i x_i + (1 - lambda'_i) x_perm(i)
  y'_i = lambda'_i y_i + (1 - lambda'_i) y_perm(i)

so each mixed example stays closer to its own original (lambda' >= 1/2),
which is what lets MixMatch keep the labeled and the unlabeled terms apart
after mixing both with partners drawn from the two sets together.

`interleave(groups)` rearranges K + 1 equal batches (the mixed labeled batch
and the K mixed unlabeled views) so that each is a cross-section of all of
them: split every batch into K + 1 slices; output batch 0 takes slice p of
batch p, and output batch j > 0 is batch j with its slice j swapped for
batch 0's slice j. The rearrangement is its own inverse. The MixMatch code
runs one forward pass per interleaved batch and updates BatchNorm's running
statistics from the first, whose slices come from every batch.

References: Zhang et al. 2018, "mixup: beyond empirical risk minimization";
Berthelot et al. 2019, "MixMatch: a holistic approach to semi-supervised
learning" (Sec. 3.3, Eqs. 8-11, Algorithm 1); github.com/google-research/
mixmatch (`libml/layers.py`: `MixMode` 'xxy.yxy', `interleave`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def sample_mixup(key: jax.Array, n: int, alpha: float):
  """(lam float32 [n] ~ Beta(alpha, alpha), perm int32 [n]) for one MixUp of n examples.

  alpha = 0 means no mixing: every lambda is 1 (MixUp's limit as alpha -> 0
  puts its mass on 0 and 1, and lambda' = max(lambda, 1 - lambda) is then 1).
  """
  lam_key, perm_key = jax.random.split(key)
  perm = jax.random.permutation(perm_key, n).astype(jnp.int32)
  if alpha == 0:
    return jnp.ones((n,), jnp.float32), perm
  return jax.random.beta(lam_key, alpha, alpha, (n,), jnp.float32), perm


def mixup(x, y, lam, perm):
  """Mixes each example i with example perm[i] at lambda'_i = max(lam_i, 1 - lam_i).

  Args:
    x: [n, ...] inputs; y: [n, K] targets (one-hot or distributions).
    lam: [n] coefficients in [0, 1]; perm: int [n], each example's partner.

  Returns:
    (mixed x, mixed y, lambda' [n]); x and y are mixed with the same weights
    and partners.
  """
  lam = jnp.maximum(lam, 1.0 - lam).astype(jnp.float32)

  def mix(v):
    w = lam.reshape((-1,) + (1,) * (v.ndim - 1)).astype(v.dtype)
    return w * v + (1 - w) * v[perm]

  return mix(x), mix(y), lam


def slice_bounds(batch: int, parts: int) -> list[int]:
  """Start offsets of `parts` near-equal slices of `batch` rows, and the end.

  The last `batch % parts` slices are one row longer, as in the MixMatch code.
  """
  sizes = [batch // parts] * parts
  for p in range(batch % parts):
    sizes[parts - 1 - p] += 1
  bounds = [0]
  for size in sizes:
    bounds.append(bounds[-1] + size)
  return bounds


def interleave(groups: Sequence[jax.Array]) -> list[jax.Array]:
  """The K + 1 `groups` (each [B, ...], same B) rearranged as described above.

  interleave(interleave(g)) == g, so the same call puts the passes' logits
  back in their original order.
  """
  n = len(groups)
  batch = groups[0].shape[0]
  if any(g.shape[0] != batch for g in groups):
    raise ValueError(f'interleave needs equal batches, got {[g.shape[0] for g in groups]}')
  bounds = slice_bounds(batch, n)

  def source(j, p):
    """The group whose slice p lands in output batch j."""
    if j == 0:
      return p
    return 0 if p == j else j

  return [jnp.concatenate([groups[source(j, p)][bounds[p]:bounds[p + 1]] for p in range(n)])
          for j in range(n)]
