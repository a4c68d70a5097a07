"""Probes of frozen features: a linear classifier and a weighted kNN classifier.

Both ask how much a network's pooled features say about the classes without
training the network any further, so they compare representations learned
by different methods (or by none) on equal terms.

- `linear_probe`: multinomial logistic regression (scikit-learn, L-BFGS) on
  standardised features, trained on the labelled images: the frozen-feature
  linear classifier of DeepCluster and of Exemplar-CNN's evaluation. The
  standardisation's mean and deviation are the labelled images' own unless a
  `Standardizer` from more images is given: the methods pass one from every
  training image (labelled and unlabelled, `Moments`), as Coates et al.
  standardise their k-means features; with 10 labelled images a class and
  thousands of dimensions the labelled images alone give noisy deviations
  that blow up features which barely vary.
- `knn_probe`: each test image votes with its k most cosine-similar labelled
  images, neighbour i weighted by exp(s_i / T); the class with the largest
  summed weight wins. k=20 by default, a smaller k than the paper's ImageNet
  setting because a labelled subset of a few hundred images has few
  neighbours per class; T=0.07 as in the paper. Pure JAX: the similarities
  are computed a chunk of queries at a time, so memory stays
  O(chunk x labelled) whatever the test set size.

Top-k ties (equal scores, e.g. classes no neighbour voted for) go to the
lower class index in both probes, as `jax.lax.top_k` and a stable sort do.
Accuracies are percentages (0-100).

References:
  Caron, Bojanowski, Joulin, Douze. Deep Clustering for Unsupervised Learning
    of Visual Features. ECCV 2018 (linear classifiers on frozen features).
  Dosovitskiy, Fischer, Springenberg, Riedmiller, Brox. Discriminative
    Unsupervised Feature Learning with Exemplar Convolutional Neural
    Networks. NIPS 2014 / TPAMI 2016 (a linear classifier on pooled features).
  Wu, Xiong, Yu, Lin. Unsupervised Feature Learning via Non-Parametric
    Instance Discrimination. CVPR 2018 (weighted kNN, weights exp(s/T)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sslj.errors import UserError

KNN_K = 20
KNN_TEMPERATURE = 0.07
LINEAR_C = 1.0
# Queries per similarity chunk: bounds the [chunk, labelled] matrix.
KNN_CHUNK = 256


class Standardizer:
  """x -> (x - mean) / scale, scale = the deviation where it is > 0, else 1.

  The same rule as scikit-learn's `StandardScaler` (population deviation,
  constant features keep scale 1).
  """

  def __init__(self, mean, std):
    self.mean = np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)
    self.scale = np.where(std > 0, std, 1.0)

  @classmethod
  def fit(cls, x) -> 'Standardizer':
    x = np.asarray(x, np.float64)
    return cls(x.mean(axis=0), x.std(axis=0))

  def __call__(self, x) -> np.ndarray:
    return ((np.asarray(x, np.float64) - self.mean) / self.scale).astype(np.float32)


class Moments:
  """Per-feature mean and deviation over feature chunks, in float64.

  `add(x)` for each [n, D] chunk, then `standardizer()`: the statistics of all
  rows added, without holding them (Chan et al.'s pairwise update, so chunks
  of any size give the same numbers as one pass to rounding).
  """

  def __init__(self):
    self.count, self.mean, self.m2 = 0, None, None

  def add(self, x) -> None:
    x = np.asarray(x, np.float64)
    if not len(x):
      return
    n, mean = len(x), x.mean(axis=0)
    m2 = ((x - mean) ** 2).sum(axis=0)
    if self.count == 0:
      self.count, self.mean, self.m2 = n, mean, m2
      return
    total = self.count + n
    delta = mean - self.mean
    self.mean = self.mean + delta * (n / total)
    self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
    self.count = total

  def standardizer(self) -> Standardizer:
    if not self.count:
      raise ValueError('no features were added')
    return Standardizer(self.mean, np.sqrt(self.m2 / self.count))


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict:
  """{'top1': %, 'top5': %}: how often the label is among the k best scores.

  Ties go to the lower class index (a stable sort of -scores). With fewer
  classes than k every label counts as found.
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  order = np.argsort(-scores, axis=1, kind='stable')
  out = {}
  for k in ks:
    hits = np.any(order[:, :min(k, scores.shape[1])] == labels[:, None], axis=1)
    out[f'top{k}'] = 100.0 * float(np.sum(hits)) / len(labels) if len(labels) else 0.0
  return out


def _check(train_features, train_labels, test_features, test_labels):
  train_features = np.asarray(train_features, np.float32)
  test_features = np.asarray(test_features, np.float32)
  if train_features.ndim != 2 or test_features.ndim != 2 or (
      train_features.shape[1] != test_features.shape[1]):
    raise UserError(f'probe features must be [N, D] and [M, D]; got {train_features.shape} '
                    f'and {test_features.shape}.')
  if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
    raise UserError('probe features and labels differ in length.')
  if not len(train_features) or not len(test_features):
    raise UserError('a probe needs labelled images to fit and images to test on; one set is empty.')
  return (train_features, np.asarray(train_labels, np.int64), test_features,
          np.asarray(test_labels, np.int64))


def linear_probe(train_features, train_labels, test_features, test_labels, *,
                 num_classes: int, c: float = LINEAR_C, max_iter: int = 1000,
                 standardizer: Standardizer | None = None) -> dict:
  """Top-1/top-5 of logistic regression on standardised frozen features.

  The mean and standard deviation are `standardizer`'s (from training images,
  never the test set) or, without one, the labelled features' own (constant
  features keep scale 1).

  Args:
    train_features / train_labels: the labelled images' features [N, D] and
      int labels [N].
    test_features / test_labels: the evaluated images' [M, D] and [M].
    num_classes: classes of the task; classes absent from the training labels
      score -inf (never predicted).
    c: inverse L2 regularisation strength of LogisticRegression.
    max_iter: L-BFGS iterations.
    standardizer: statistics of more training features than the labelled ones.
  """
  from sklearn import linear_model  # pylint: disable=g-import-not-at-top
  train_x, train_y, test_x, test_y = _check(train_features, train_labels, test_features,
                                            test_labels)
  if len(np.unique(train_y)) < 2:
    raise UserError('the linear probe needs labelled images of at least 2 classes.')
  scale = standardizer or Standardizer.fit(train_x)
  classifier = linear_model.LogisticRegression(C=c, max_iter=max_iter)
  classifier.fit(scale(train_x), train_y)
  scores = np.full((len(test_x), num_classes), -np.inf)
  # predict_log_proba has one column per seen class even with 2 classes
  # (decision_function collapses those to one column).
  scores[:, classifier.classes_] = classifier.predict_log_proba(scale(test_x))
  return top_k_accuracy(scores, test_y)


def _l2_normalize(x):
  # The epsilon keeps an all-zero feature (a dead network) at zero, not NaN.
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=('num_classes', 'k'))
def _knn_chunk_scores(bank, bank_labels, queries, temperature, *, num_classes: int, k: int):
  """Class scores [q, C] of one chunk of L2-normalised queries."""
  # HIGHEST: accelerators otherwise multiply float32 in reduced precision
  # (TF32, bf16 passes), which can reorder near-equal neighbours.
  sims = jnp.matmul(queries, bank.T, precision=jax.lax.Precision.HIGHEST)
  top_sims, top_index = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  votes = jax.nn.one_hot(bank_labels[top_index], num_classes, dtype=jnp.float32)
  return jnp.einsum('qk,qkc->qc', weights, votes, precision=jax.lax.Precision.HIGHEST)


def knn_class_scores(train_features, train_labels, test_features, *, num_classes: int,
                     k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
                     chunk: int = KNN_CHUNK) -> np.ndarray:
  """Summed neighbour weights per class, float32 [M, num_classes].

  score[i, c] = sum over the k labelled neighbours j of test image i (by cosine
  similarity s_ij of the features) with label c of exp(s_ij / temperature).
  k is capped at the number of labelled images.
  """
  bank = _l2_normalize(jnp.asarray(train_features, jnp.float32))
  bank_labels = jnp.asarray(train_labels, jnp.int32)
  queries = np.asarray(test_features, np.float32)
  k = min(k, bank.shape[0])
  out = np.empty((len(queries), num_classes), np.float32)
  for start in range(0, len(queries), chunk):
    block = queries[start:start + chunk]
    n = len(block)
    if n < chunk:  # Pad to the chunk size so one compilation serves every chunk.
      block = np.concatenate([block, np.zeros((chunk - n, block.shape[1]), np.float32)])
    scores = _knn_chunk_scores(bank, bank_labels, _l2_normalize(jnp.asarray(block)),
                               jnp.float32(temperature), num_classes=num_classes, k=k)
    out[start:start + n] = np.asarray(scores)[:n]
  return out


def knn_probe(train_features, train_labels, test_features, test_labels, *,
              num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
              chunk: int = KNN_CHUNK) -> dict:
  """Top-1/top-5 of the weighted kNN classifier (see `knn_class_scores`)."""
  train_x, train_y, test_x, test_y = _check(train_features, train_labels, test_features,
                                            test_labels)
  scores = knn_class_scores(train_x, train_y, test_x, num_classes=num_classes, k=k,
                            temperature=temperature, chunk=chunk)
  return top_k_accuracy(scores, test_y)
