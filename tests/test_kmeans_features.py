"""k-means features: patches, normalisation, ZCA, triangle and hard codes and
their quadrant pooling against direct numpy loops; the SVM scores; a tiny run."""

import json
import types

import jax
import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from conftest import tiny_config
from sslj import train
from sslj.errors import UserError
from sslj.methods import kmeans_features as kf


def _images(n=3, h=9, w=8, c=2, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, c)).astype(np.uint8)


def _np_normalize(x, eps):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + eps)


def _np_zca(x, eps):
  """Coates's MATLAB recipe: C = cov(x); [V, D] = eig(C); P = V diag((D + eps)^-1/2) V'."""
  x = x.astype(np.float64)
  evals, evecs = np.linalg.eigh(np.cov(x, rowvar=False))
  return x.mean(0), evecs @ np.diag(1 / np.sqrt(evals + eps)) @ evecs.T


def _np_features(images, mean, zca, centroids, p, stride, eps):
  """Per image, per position, per centroid loops; quadrants as round(n/2)."""
  n, h, w, _ = images.shape
  rows = range(0, h - p + 1, stride)
  cols = range(0, w - p + 1, stride)
  hr, hc = round(len(rows) / 2 + 1e-9), round(len(cols) / 2 + 1e-9)  # half up
  k = len(centroids)
  out = {kind: np.zeros((n, 4 * k)) for kind in ('triangle', 'hard')}
  for b in range(n):
    for i, r in enumerate(rows):
      for j, c in enumerate(cols):
        x = images[b, r:r + p, c:c + p, :].astype(np.float64).reshape(-1)
        x = (_np_normalize(x[None], eps)[0] - mean) @ zca
        z = np.array([np.sqrt(np.sum((x - ck) ** 2)) for ck in centroids])
        q = (0 if i < hr else 2) + (0 if j < hc else 1)
        out['triangle'][b, q * k:(q + 1) * k] += np.maximum(z.mean() - z, 0)
        out['hard'][b, q * k + np.argmin(z)] += 1
  return out


def test_dense_patches_match_numpy_windows():
  images = _images().astype(np.float32)
  got = np.asarray(kf.dense_patches(images, 3, 2))
  assert got.shape == (3, 4, 3, 18)
  for i, r in enumerate(range(0, 7, 2)):
    for j, c in enumerate(range(0, 6, 2)):
      np.testing.assert_array_equal(got[:, i, j], images[:, r:r + 3, c:c + 3].reshape(3, -1))


def test_sample_patches_are_seeded_windows_of_the_images():
  images = _images(n=5)
  a = kf.sample_patches(images, 50, 4, np.random.default_rng(7))
  b = kf.sample_patches(images, 50, 4, np.random.default_rng(7))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (50, 32) and a.dtype == np.float32
  windows = {images[n, r:r + 4, c:c + 4].tobytes() for n in range(5) for r in range(6)
             for c in range(5)}
  assert all(row.astype(np.uint8).tobytes() in windows for row in a)
  with pytest.raises(UserError, match='patch_size'):
    kf.sample_patches(images, 5, 9, np.random.default_rng(0))


def test_normalize_patches_matches_numpy():
  x = np.random.default_rng(1).uniform(0, 255, (20, 27)).astype(np.float32)
  x[0] = 7.0  # a flat patch stays finite: 0 / sqrt(0 + eps)
  got = np.asarray(jax.jit(kf.normalize_patches, static_argnums=1)(x, 10.0))
  np.testing.assert_allclose(got, _np_normalize(x.astype(np.float64), 10.0), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[0], 0.0)


def test_fit_zca_and_encoded_features_match_numpy():
  images = _images(n=3)
  patches = kf.sample_patches(_images(n=40, seed=3), 600, 3, np.random.default_rng(0))
  encoder = kf.fit(patches, num_centroids=5, num_iters=3, key=jax.random.key(0),
                   normalize_eps=10.0, zca_eps=0.1)
  mean, zca = _np_zca(_np_normalize(patches.astype(np.float64), 10.0), 0.1)
  np.testing.assert_allclose(encoder.zca.mean, mean, atol=1e-5)
  np.testing.assert_allclose(encoder.zca.matrix, zca, rtol=1e-3, atol=1e-4)

  got = kf.encode(images, encoder, patch=3, stride=2, normalize_eps=10.0)
  want = _np_features(images, mean, zca, np.asarray(encoder.centroids, np.float64), 3, 2, 10.0)
  assert got['triangle'].shape == (3, 20)
  np.testing.assert_allclose(got['triangle'], want['triangle'], rtol=1e-3, atol=1e-3)
  np.testing.assert_array_equal(got['hard'], want['hard'])
  assert np.all(np.asarray(got['hard']).reshape(3, 4, 5).sum(-1) == [[4, 2, 4, 2]] * 3)


def test_quadrant_split_gives_the_middle_to_top_and_left():
  counts = np.asarray(kf.quadrant_sum(np.ones((1, 3, 5, 1), np.float32)))
  np.testing.assert_array_equal(counts, [[2 * 3, 2 * 2, 1 * 3, 1 * 2]])


def test_chunked_extraction_equals_one_call():
  images = _images(n=7, h=8, w=8, c=1)
  rng = np.random.default_rng(0)
  encoder = kf.Encoder(kf.whitening.zca_fit(rng.normal(size=(100, 16)), 0.1),
                       jax.numpy.asarray(rng.normal(size=(6, 16)), jax.numpy.float32))
  whole = kf.encode(images, encoder, patch=4, stride=1, normalize_eps=10.0)
  # 25 positions x (16 + 3 x 6) floats per image: a budget of 3.5 images
  # gives calls of 3, the last one padded.
  budget = 3.5 * 4 * 25 * (16 + 3 * 6) / 2**20
  assert kf.chunk_images((8, 8, 1), 4, 1, 6, budget) == 3
  chunked = kf.extract_features(images, encoder, patch=4, stride=1, normalize_eps=10.0,
                                budget_mb=budget)
  for kind in kf.ACTIVATIONS:
    np.testing.assert_allclose(chunked[kind], whole[kind], rtol=1e-6, atol=1e-6)


def test_linear_svm_scores_agree_with_sklearn_predictions():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(7, 10)) * 2
  train_y, test_y = rng.integers(0, 7, 70), rng.integers(0, 7, 200)
  train_x = centres[train_y] + rng.normal(size=(70, 10))
  test_x = centres[test_y] + rng.normal(size=(200, 10))
  got = kf.linear_svm_scores(train_x, train_y, test_x, test_y, num_classes=7, c=0.1)
  scaler = StandardScaler().fit(train_x)
  svm = LinearSVC(C=0.1, max_iter=10000).fit(scaler.transform(train_x), train_y)
  predicted = svm.predict(scaler.transform(test_x))
  assert got['top1'] == pytest.approx(100 * np.mean(predicted == test_y))
  assert got['top1'] <= got['top5'] <= 100
  binary = kf.linear_svm_scores(train_x, train_y % 2, test_x, test_y % 2, num_classes=2, c=0.1)
  assert binary['top5'] == 100.0 and 50 < binary['top1'] <= 100
  # A class with no labeled example is never predicted, but counts for top-5.
  absent = kf.linear_svm_scores(train_x[train_y < 6], train_y[train_y < 6], test_x, test_y,
                                num_classes=8, c=0.1)
  assert absent['top1'] <= 100 * np.mean(test_y < 6)


def test_tiny_pipeline_writes_results_and_centroids(tmp_path, data_dir):
  config = tiny_config('kmeans_svm', **{
      'data.data_dir': data_dir, 'kmeans_features.num_patches': 3000,
      'kmeans_features.num_centroids': 32, 'kmeans_features.patch_size': 4})
  results = train.train_and_evaluate(config, str(tmp_path))
  written = json.loads((tmp_path / 'results.json').read_text())
  assert written == json.loads(json.dumps(results))
  assert set(written['models']) == {'triangle', 'hard', 'raw_pixels'}
  assert written['top1'] == written['models']['triangle']['top1']
  assert written['method'] == 'kmeans_svm' and written['num_steps'] == 12
  assert written['labels_per_class'] == 10
  for scores in written['models'].values():
    assert 10 < scores['top1'] <= scores['top5'] <= 100
  saved = np.load(tmp_path / 'centroids.npz')
  assert saved['centroids'].shape == (32, 16) and saved['zca_matrix'].shape == (16, 16)
  assert list(saved['patch_shape']) == [4, 4, 1]


def test_config_defaults_follow_the_dataset_and_reject_a_network():
  digits = tiny_config('kmeans_svm')
  fashion = tiny_config('kmeans_svm', 'dataset=fashion_mnist')
  assert digits.kmeans_features.patch_size == 5 and digits.data.labels_per_class == 10
  assert fashion.kmeans_features.patch_size == 7
  assert fashion.kmeans_features.num_centroids == 1600
  with pytest.raises(AttributeError):
    digits.kmeans_features.patchsize = 3  # locked: a typo is an error
  bad = tiny_config('kmeans_svm', 'model=small_cnn')
  with pytest.raises(UserError, match='leave model unset'):
    kf.run_pipeline(bad, None, '/nonexistent')
  pool = types.SimpleNamespace(unlabeled_images=np.zeros((2, 8, 8, 1), np.uint8))
  for field, value in (('kmeans_init', 'kmeans'), ('kmeans_n_init', 0)):
    bad = tiny_config('kmeans_svm', **{f'kmeans_features.{field}': value})
    with pytest.raises(UserError, match=f'kmeans_features.{field}'):
      kf.run_pipeline(bad, pool, '/nonexistent')


def test_extraction_can_stream_its_chunks():
  images = _images(n=7, h=8, w=8, c=1)
  rng = np.random.default_rng(0)
  encoder = kf.Encoder(kf.whitening.zca_fit(rng.normal(size=(100, 16)), 0.1),
                       jax.numpy.asarray(rng.normal(size=(6, 16)), jax.numpy.float32))
  budget = 3.5 * 4 * 25 * (16 + 3 * 6) / 2**20  # calls of 3 images
  whole = kf.extract_features(images, encoder, patch=4, stride=1, normalize_eps=10.0,
                              budget_mb=budget)
  seen = []
  assert kf.extract_features(images, encoder, patch=4, stride=1, normalize_eps=10.0,
                             budget_mb=budget, on_chunk=lambda f, x: seen.append((f, x))) == {}
  assert [len(x) for _, x in seen] == [3, 3, 1]
  np.testing.assert_array_equal(np.concatenate([x for _, x in seen]), images)
  for kind in kf.ACTIVATIONS:
    np.testing.assert_array_equal(np.concatenate([f[kind] for f, _ in seen]), whole[kind])


@pytest.mark.parametrize('standardize', ['train', 'labeled'])
def test_the_svm_standardises_with_every_training_image_or_the_labeled_ones(
    tmp_path, data_dir, standardize):
  """The pipeline's SVM top-1 equals scikit-learn's on features rebuilt from centroids.npz."""
  config = tiny_config('kmeans_svm', **{
      'data.data_dir': data_dir, 'kmeans_features.num_patches': 3000,
      'kmeans_features.num_centroids': 16, 'kmeans_features.patch_size': 4,
      'kmeans_features.standardize': standardize})
  results = train.train_and_evaluate(config, str(tmp_path))
  data = train.load_data(config)
  with np.load(tmp_path / 'centroids.npz') as z:
    encoder = kf.Encoder(kf.whitening.ZCAWhitening(z['zca_mean'], z['zca_matrix']),
                         z['centroids'])
  kfc = config.kmeans_features

  def triangle(images):
    return kf.extract_features(images, encoder, patch=kfc.patch_size, stride=kfc.stride,
                               normalize_eps=kfc.normalize_eps, budget_mb=kfc.chunk_mb,
                               kinds=('triangle',))['triangle'].astype(np.float64)

  labeled, test = triangle(data.labeled_images), triangle(data.test_images)
  fitted_on = (np.concatenate([labeled, triangle(data.unlabeled_images)])
               if standardize == 'train' else labeled)
  scaler = StandardScaler().fit(fitted_on)
  svm = LinearSVC(C=kfc.svm_c, max_iter=10000).fit(scaler.transform(labeled),
                                                  data.labeled_labels)
  expected = 100 * np.mean(svm.predict(scaler.transform(test)) == data.test_labels)
  assert results['models']['triangle']['top1'] == pytest.approx(expected, abs=1e-9)


def test_a_bad_standardize_is_refused(tmp_path, data_dir):
  config = tiny_config('kmeans_svm', **{'data.data_dir': data_dir,
                                        'kmeans_features.standardize': 'test'})
  with pytest.raises(UserError, match="kmeans_features.standardize must be one of"):
    train.train_and_evaluate(config, str(tmp_path))
