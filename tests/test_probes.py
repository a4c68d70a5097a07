"""Frozen-feature probes against direct numpy and scikit-learn references."""

import numpy as np
import pytest
from sklearn import linear_model

from sslj.errors import UserError
from sslj.ops import probes


def _features(seed, n, num_classes=6, dim=16, spread=2.5):
  """Overlapping Gaussian classes (the same centres for every seed)."""
  centres = np.random.default_rng(1234).normal(size=(num_classes, dim))
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def _knn_reference(bank, bank_labels, queries, num_classes, k, temperature):
  """Wu et al.'s weighted kNN, written out in float64 numpy."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = unit(queries.astype(np.float64)) @ unit(bank.astype(np.float64)).T
  scores = np.zeros((len(queries), num_classes))
  for i, row in enumerate(sims):
    for j in np.argsort(-row, kind='stable')[:k]:
      scores[i, bank_labels[j]] += np.exp(row[j] / temperature)
  return scores


def _hits(scores, labels, k):
  """Label among the k best: fewer than k classes beat it (ties: lower index first)."""
  mine = scores[np.arange(len(labels)), labels][:, None]
  index = np.arange(scores.shape[1])[None, :]
  ahead = (scores > mine) | ((scores == mine) & (index < labels[:, None]))
  return 100 * float(np.sum(ahead.sum(1) < k)) / len(labels)


def test_knn_matches_a_direct_numpy_implementation():
  bank, bank_labels = _features(0, 150)
  queries, labels = _features(1, 203)  # 4 chunks of 64, the last one padded
  got = probes.knn_class_scores(bank, bank_labels, queries, num_classes=6, k=20,
                                temperature=0.07, chunk=64)
  want = _knn_reference(bank, bank_labels, queries, 6, 20, 0.07)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  assert np.all((got > 0).sum(1) <= 6) and np.any(got == 0)  # unvoted classes score 0
  scores = probes.knn_probe(bank, bank_labels, queries, labels, num_classes=6, k=20,
                            temperature=0.07, chunk=64)
  assert scores == {'top1': _hits(want, labels, 1), 'top5': _hits(want, labels, 5)}
  assert 30 < scores['top1'] < 95 and scores['top5'] < 100  # neither trivial nor chance


def test_knn_caps_k_at_the_labelled_set_and_finds_tight_clusters():
  bank, bank_labels = _features(2, 12, spread=0.01)
  queries, labels = _features(2, 12, spread=0.01)
  got = probes.knn_class_scores(bank, bank_labels, queries, num_classes=6, k=20)
  np.testing.assert_allclose(got, _knn_reference(bank, bank_labels, queries, 6, 12, 0.07),
                             rtol=2e-5)
  assert probes.knn_probe(bank, bank_labels, queries, labels, num_classes=6)['top1'] == 100


def test_linear_probe_matches_scikit_learn_on_standardised_features():
  train_x, train_y = _features(3, 300)
  test_x, test_y = _features(4, 250)
  got = probes.linear_probe(train_x, train_y, test_x, test_y, num_classes=6, c=0.5)
  mean, std = train_x.mean(0), train_x.std(0)
  reference = linear_model.LogisticRegression(C=0.5, max_iter=1000)
  reference.fit((train_x - mean) / std, train_y)
  standardised = (test_x - mean) / std
  assert got['top1'] == pytest.approx(100 * reference.score(standardised, test_y), abs=1e-9)
  assert got['top5'] == pytest.approx(
      _hits(reference.predict_proba(standardised), test_y, 5), abs=1e-9)
  assert 30 < got['top1'] < 95 and got['top5'] < 100


def test_linear_probe_ranks_unseen_classes_below_every_seen_one():
  train_x, train_y = _features(5, 200, num_classes=4)
  test_x, _ = _features(6, 50, num_classes=4)
  # Class 7 of 8 has no labelled image: it scores -inf, below the 4 seen
  # classes and (by the tie rule) below the unseen classes 4, 5 and 6.
  unseen = probes.linear_probe(train_x, train_y, test_x, np.full(50, 7), num_classes=8)
  assert unseen == {'top1': 0.0, 'top5': 0.0}
  with pytest.raises(UserError, match='2 classes'):
    probes.linear_probe(train_x, np.zeros_like(train_y), test_x, np.zeros(50), num_classes=8)


def test_top_k_ties_go_to_the_lower_class_index():
  scores = np.array([[0.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
  assert probes.top_k_accuracy(scores, np.array([2, 0]), ks=(1,)) == {'top1': 50.0}
  assert probes.top_k_accuracy(scores, np.array([1, 3]), ks=(1, 3)) == {'top1': 50.0,
                                                                        'top3': 50.0}


def test_moments_over_chunks_equal_one_pass_and_scikit_learns_scaler():
  from sklearn.preprocessing import StandardScaler
  x, _ = _features(5, 301, dim=9)
  x[:, 4] = 3.0  # a constant feature keeps scale 1
  moments = probes.Moments()
  for start, stop in ((0, 1), (1, 64), (64, 64), (64, 300), (300, 301)):
    moments.add(x[start:stop])
  assert moments.count == 301
  got = moments.standardizer()
  np.testing.assert_allclose(got.mean, x.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
  reference = StandardScaler().fit(x.astype(np.float64))
  np.testing.assert_allclose(got.scale, reference.scale_, rtol=1e-10)
  assert got.scale[4] == 1.0
  np.testing.assert_allclose(got(x), reference.transform(x.astype(np.float64)), rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(ValueError):
    probes.Moments().standardizer()


def test_linear_probe_standardises_with_the_given_statistics():
  """With a standardizer from a larger pool the probe is sklearn on that pool's scale."""
  from sklearn.preprocessing import StandardScaler
  train_x, train_y = _features(3, 40)
  pool_x, _ = _features(6, 2000, spread=6.0)  # wider than the 40 labelled images
  test_x, test_y = _features(4, 250)
  standardizer = probes.Standardizer.fit(np.concatenate([train_x, pool_x]))
  got = probes.linear_probe(train_x, train_y, test_x, test_y, num_classes=6, c=0.05,
                            standardizer=standardizer)
  scaler = StandardScaler().fit(np.concatenate([train_x, pool_x]).astype(np.float64))
  reference = linear_model.LogisticRegression(C=0.05, max_iter=1000)
  reference.fit(scaler.transform(train_x), train_y)
  assert got['top1'] == pytest.approx(100 * reference.score(scaler.transform(test_x), test_y),
                                      abs=1e-9)
  own = probes.linear_probe(train_x, train_y, test_x, test_y, num_classes=6, c=0.05)
  own_reference = linear_model.LogisticRegression(C=0.05, max_iter=1000)
  own_scaler = StandardScaler().fit(train_x.astype(np.float64))
  own_reference.fit(own_scaler.transform(train_x), train_y)
  assert own['top1'] == pytest.approx(
      100 * own_reference.score(own_scaler.transform(test_x), test_y), abs=1e-9)
