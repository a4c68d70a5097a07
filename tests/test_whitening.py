"""PCA / ZCA whitening and L2 normalisation against numpy references."""

import numpy as np
import pytest

from sslj.errors import UserError
from sslj.ops import whitening


def _correlated(n=3000, d=12, seed=0):
  """Correlated data with a well-separated spectrum (eigenvectors are then
  unique up to sign, so a projection can be compared)."""
  rng = np.random.default_rng(seed)
  rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
  scales = np.geomspace(10.0, 0.3, d)
  z = rng.normal(size=(n, d)) * scales
  return (z @ rotation.T + rng.normal(size=d) * 5).astype(np.float32)


def _numpy_eig(x):
  x = x.astype(np.float64)
  evals, evecs = np.linalg.eigh(np.cov(x, rowvar=False))
  return x.mean(0), evals[::-1], evecs[:, ::-1]


def test_pca_whitening_gives_identity_covariance():
  x = _correlated()
  params = whitening.pca_whiten_fit(x, dim=6, eps=0.0)
  y = np.asarray(whitening.pca_whiten_apply(params, x), np.float64)
  assert y.shape == (3000, 6)
  np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(6), atol=2e-4)
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)


def test_pca_whitening_matches_numpy_projection_up_to_sign():
  x = _correlated()
  eps = 0.5
  params = whitening.pca_whiten_fit(x, dim=6, eps=eps)
  mean, evals, evecs = _numpy_eig(x)
  reference = (x - mean) @ evecs[:, :6] / np.sqrt(evals[:6] + eps)
  y = np.asarray(whitening.pca_whiten_apply(params, x), np.float64)
  signs = np.sign(np.sum(y * reference, axis=0))
  np.testing.assert_allclose(y * signs, reference, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(np.asarray(params.scale),
                             1 / np.sqrt(evals[:6] + eps), rtol=1e-4)
  # With eps the covariance is diag(lambda / (lambda + eps)), not identity.
  np.testing.assert_allclose(np.cov(y, rowvar=False),
                             np.diag(evals[:6] / (evals[:6] + eps)), atol=2e-4)


def test_pca_sign_convention_is_fixed():
  x = _correlated(seed=1)
  comps = np.asarray(whitening.pca_whiten_fit(x, dim=4).components)
  pivots = comps[np.arange(4), np.abs(comps).argmax(1)]
  assert (pivots > 0).all()
  np.testing.assert_allclose(comps @ comps.T, np.eye(4), atol=1e-5)


def test_zca_matches_numpy_reference():
  # Coates & Ng: per-patch normalisation, then ZCA with eps = 0.1.
  rng = np.random.default_rng(2)
  patches = _correlated(n=4000, d=27, seed=2) + rng.normal(size=(4000, 1)) * 3
  patches = patches - patches.mean(1, keepdims=True)
  patches = patches / np.sqrt(patches.var(1, keepdims=True) + 10)
  params = whitening.zca_fit(patches, eps=0.1)
  mean, evals, evecs = _numpy_eig(patches)
  matrix = evecs @ np.diag(1 / np.sqrt(evals + 0.1)) @ evecs.T
  np.testing.assert_allclose(np.asarray(params.matrix), matrix, atol=2e-4)
  np.testing.assert_allclose(np.asarray(params.mean), mean, atol=1e-5)
  y = np.asarray(whitening.zca_apply(params, patches))
  np.testing.assert_allclose(y, (patches - mean) @ matrix, atol=1e-3)


def test_zca_without_eps_whitens():
  x = _correlated(seed=3)
  y = np.asarray(whitening.zca_apply(whitening.zca_fit(x, eps=0.0), x))
  np.testing.assert_allclose(np.cov(y.astype(np.float64), rowvar=False),
                             np.eye(12), atol=2e-4)


def test_l2_normalize():
  x = np.array([[3.0, 4.0], [0.0, 0.0], [-1e-3, 0.0]], np.float32)
  y = np.asarray(whitening.l2_normalize(x))
  np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]],
                             rtol=1e-6)


def test_bad_input_raises_user_error():
  x = _correlated(n=10, d=4)
  with pytest.raises(UserError, match='PCA dim'):
    whitening.pca_whiten_fit(x, dim=5)
  with pytest.raises(UserError, match='eps'):
    whitening.zca_fit(x, eps=-1.0)
  with pytest.raises(UserError, match='n >= 2'):
    whitening.zca_fit(x[:1])
