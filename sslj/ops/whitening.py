"""PCA whitening, ZCA whitening and L2 normalisation of feature vectors.

DeepCluster reduces the CNN features to 256 dimensions by PCA whitening and
L2-normalises them before every k-means; the single-layer k-means features of
Coates & Ng ZCA-whiten the (per-patch normalised) image patches before
clustering them. Both whitenings come from the eigendecomposition of the
sample covariance (divided by n - 1, like numpy's `np.cov` and MATLAB's `cov`
in Coates & Ng's code), computed in float32 with full-precision matmuls
(GPUs would otherwise use TF32) and `eigh`.

PCA: y = ((x - mean) @ components.T) * scale, components = the top-`dim`
  eigenvectors (rows, largest eigenvalue first), scale = (eigenvalue + eps)^-1/2.
ZCA: y = (x - mean) @ V diag((eigenvalue + eps)^-1/2) V^T, which whitens
  while staying as close as possible to the input (a rotation back into the
  pixel basis), so whitened patches still look like patches.

References:
  Caron, Bojanowski, Joulin & Douze, "Deep clustering for unsupervised
    learning of visual features", ECCV 2018.
  Coates, Lee & Ng, "An analysis of single-layer networks in unsupervised
    feature learning", AISTATS 2011.
  Coates & Ng, "Learning feature representations with k-means", Neural
    Networks: Tricks of the Trade, 2012.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sslj.errors import UserError

_HIGHEST = jax.lax.Precision.HIGHEST


class PCAWhitening(NamedTuple):
  """A fitted PCA whitening.

  Attributes:
    mean: float32 [d], mean of the fitted data.
    components: float32 [dim, d], principal directions as rows, largest
      eigenvalue first; each row's largest-magnitude entry is positive so a
      fit is reproducible despite eigenvectors' arbitrary signs.
    scale: float32 [dim], (eigenvalue + eps)^-1/2.
  """
  mean: jax.Array
  components: jax.Array
  scale: jax.Array


class ZCAWhitening(NamedTuple):
  """A fitted ZCA whitening: y = (x - mean) @ matrix (matrix symmetric)."""
  mean: jax.Array
  matrix: jax.Array


def _check(x, what):
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2 or x.shape[0] < 2:
    raise UserError(f'{what} needs a [n, d] array with n >= 2 rows, got shape '
                    f'{x.shape}')
  return x


def _check_eps(eps):
  if not eps >= 0:
    raise UserError(f'whitening eps must be >= 0, got {eps}')


@jax.jit
def _eigh_cov(x):
  """Mean, and eigenvalues (descending) and eigenvectors (columns) of cov."""
  mean = jnp.mean(x, axis=0)
  centred = x - mean
  cov = jnp.dot(centred.T, centred, precision=_HIGHEST) / (x.shape[0] - 1)
  evals, evecs = jnp.linalg.eigh(cov)
  # Round-off makes near-null eigenvalues slightly negative.
  return mean, jnp.maximum(evals[::-1], 0.0), evecs[:, ::-1]


def pca_whiten_fit(x, dim: int, eps: float = 1e-5) -> PCAWhitening:
  """Fits PCA whitening of the rows of `x` [n, d] to `dim` <= d dimensions."""
  x = _check(x, 'pca_whiten_fit')
  if not 1 <= dim <= x.shape[1]:
    raise UserError(f'PCA dim must be between 1 and the feature size '
                    f'{x.shape[1]}, got {dim}')
  _check_eps(eps)
  mean, evals, evecs = _eigh_cov(x)
  components = evecs[:, :dim].T
  # Fix each direction's sign: the entry of largest magnitude is positive.
  pivot = jnp.take_along_axis(
      components, jnp.argmax(jnp.abs(components), axis=1)[:, None], axis=1)
  components = components * jnp.where(pivot < 0, -1.0, 1.0)
  return PCAWhitening(mean, components, jax.lax.rsqrt(evals[:dim] + eps))


@jax.jit
def pca_whiten_apply(params: PCAWhitening, x) -> jax.Array:
  """Projects `x` [n, d] onto the fitted directions and whitens: [n, dim]."""
  projected = jnp.dot(jnp.asarray(x, jnp.float32) - params.mean,
                      params.components.T, precision=_HIGHEST)
  return projected * params.scale


def zca_fit(x, eps: float = 0.1) -> ZCAWhitening:
  """Fits ZCA whitening of the rows of `x` [n, d].

  eps = 0.1 is Coates & Ng's value for patches normalised to zero mean and
  unit variance per patch; it damps the noisy low-variance directions.
  """
  x = _check(x, 'zca_fit')
  _check_eps(eps)
  mean, evals, evecs = _eigh_cov(x)
  matrix = jnp.dot(evecs * jax.lax.rsqrt(evals + eps), evecs.T,
                   precision=_HIGHEST)
  return ZCAWhitening(mean, matrix)


@jax.jit
def zca_apply(params: ZCAWhitening, x) -> jax.Array:
  """Whitens `x` [n, d] with a fitted ZCA transform: [n, d]."""
  return jnp.dot(jnp.asarray(x, jnp.float32) - params.mean, params.matrix,
                 precision=_HIGHEST)


def l2_normalize(x, eps: float = 1e-12, axis: int = -1) -> jax.Array:
  """x / max(||x||_2, eps) along `axis`; eps keeps zero vectors at zero."""
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)
