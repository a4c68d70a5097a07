"""Single-layer k-means centroid features with a linear SVM.

A pipeline, not gradient training (`train.py` runs `run_pipeline`):

1. `sample_patches`: random p x p patches of the unlabeled images, in the
   papers' pixel scale (0..255).
2. `normalize_patches`: per-patch brightness and contrast normalisation,
   (x - mean(x)) / sqrt(var(x) + 10), var with the n - 1 divisor as in
   Coates's MATLAB code (`var(patches, [], 2)`).
3. ZCA whitening (`sslj.ops.whitening.zca_fit`, eps 0.1) and k-means
   (`sslj.ops.kmeans.kmeans`) of the whitened patches: the centroids.
4. `encode`: every p x p patch of an image at a stride (extracted with
   `conv_general_dilated_patches`), normalised and whitened the same way,
   mapped to K activations and sum-pooled over the four quadrants of the
   grid of patch positions into 4K features. The "triangle" activation is
   f_k(x) = max(0, mean_j(z_j) - z_k) with z_k = ||x - c_k||; the "hard"
   baseline is the one-hot of the nearest centroid.
5. `linear_svm_scores`: an L2-regularised squared-hinge linear SVM
   (scikit-learn `LinearSVC`, one-vs-rest) on the labeled images' features,
   standardised with the mean and deviation of every training image's
   features (labeled and unlabeled, as Coates et al.; `standardize='labeled'`
   uses the labeled images' own; on Fashion-MNIST with 10 labels per class,
   seed 0, 75.69 against 74.39, docs/results.md); top-1/top-5 from its
   decision values on the test split. Raw pixels go through the same SVM as
   the floor.

The patch vectors are ordered (row, column, channel) everywhere, so a
centroid reshapes to a p x p x C picture (`centroids.npz`).

Departures from the papers: k-means is `sslj.ops.kmeans` (Lloyd with
greedy k-means++ seeding, scikit-learn's, and faiss-style re-seeding of
empty clusters; `kmeans_features.kmeans_init`) rather than Coates's damped
k-means from random normal centroids; one run, as there
(`kmeans_features.kmeans_n_init` = 1; more keep the least inertia). The
SVM's C is fixed by the config rather than chosen by cross-validation; the
quadrant split of an odd grid gives the extra row/column to the top/left,
as MATLAB's `round(n/2)` in Coates's code does.

References:
  Coates, Lee & Ng, "An analysis of single-layer networks in unsupervised
    feature learning", AISTATS 2011.
  Coates & Ng, "Learning feature representations with k-means", Neural
    Networks: Tricks of the Trade, 2012.
  Fan, Chang, Hsieh, Wang & Lin, "LIBLINEAR: a library for large linear
    classification", JMLR 2008 (the SVM solver behind LinearSVC).
"""

from __future__ import annotations

import functools
import os
import time
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sslj import logbook, parallel
from sslj.errors import UserError
from sslj.methods import base, frozen_features
from sslj.ops import kmeans as km
from sslj.ops import probes
from sslj.ops import whitening

_HIGHEST = jax.lax.Precision.HIGHEST
ACTIVATIONS = ('triangle', 'hard')


class Encoder(NamedTuple):
  """A fitted single-layer encoder: ZCA of normalised patches, then centroids.

  Attributes:
    zca: the whitening of normalised patches ([d] mean, [d, d] matrix).
    centroids: float32 [K, d] in whitened space, d = p * p * C in
      (row, column, channel) order.
  """
  zca: whitening.ZCAWhitening
  centroids: jax.Array


def sample_patches(images: np.ndarray, num: int, patch: int,
                   rng: np.random.Generator) -> np.ndarray:
  """`num` random p x p windows of uniformly chosen images, float32 [num, p*p*C].

  Image and position are uniform (with replacement); vectorised numpy
  gathers, so a 100,000-image uint8 pool is never copied as floats.
  """
  n, h, w, c = images.shape
  if not 1 <= patch <= min(h, w):
    raise UserError(f'kmeans_features.patch_size={patch} must be between 1 and the '
                    f'image size {min(h, w)}.')
  idx = rng.integers(0, n, num)
  top = rng.integers(0, h - patch + 1, num)
  left = rng.integers(0, w - patch + 1, num)
  offsets = np.arange(patch)
  rows = (top[:, None] + offsets)[:, :, None]
  cols = (left[:, None] + offsets)[:, None, :]
  windows = images[idx[:, None, None], rows, cols]  # [num, p, p, C]
  return windows.reshape(num, patch * patch * c).astype(np.float32)


def normalize_patches(x, eps: float):
  """Per-patch brightness and contrast normalisation of rows [..., d].

  (x - mean) / sqrt(var + eps), var with the n - 1 divisor (MATLAB's `var`);
  eps = 10 for pixels in 0..255 keeps flat patches from being blown up to
  unit contrast noise.
  """
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centred = x - mean
  var = jnp.sum(centred * centred, axis=-1, keepdims=True) / (x.shape[-1] - 1)
  return centred / jnp.sqrt(var + eps)


def fit(patches: np.ndarray, *, num_centroids: int, num_iters: int, key,
        normalize_eps: float, zca_eps: float, init: str = 'k-means++',
        n_init: int = 1, mesh=None) -> Encoder:
  """Normalises, ZCA-whitens and clusters raw patches [n, d] (the best of
  `n_init` k-means runs)."""
  x = normalize_patches(jnp.asarray(patches, jnp.float32), normalize_eps)
  zca = whitening.zca_fit(x, eps=zca_eps)
  result = km.kmeans(whitening.zca_apply(zca, x), num_centroids, num_iters=num_iters,
                     key=key, init=init, n_init=n_init, mesh=mesh)
  return Encoder(zca, result.centroids)


def dense_patches(images, patch: int, stride: int):
  """Every p x p patch at `stride` of float images [B, H, W, C]: [B, R, S, p*p*C].

  `conv_general_dilated_patches` flattens in (channel, row, column) order;
  the last axis is reordered to (row, column, channel) to match
  `sample_patches` and the stored centroids.
  """
  b, _, _, c = images.shape
  x = jax.lax.conv_general_dilated_patches(
      images, (patch, patch), (stride, stride), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HIGHEST)
  r, s = x.shape[1:3]
  x = x.reshape(b, r, s, c, patch * patch)
  return jnp.swapaxes(x, -1, -2).reshape(b, r, s, patch * patch * c)


def quadrant_sum(maps):
  """Sum-pools [B, R, S, K] over the four quadrants of the R x S grid: [B, 4K].

  The top/left halves take round(R/2) rows and round(S/2) columns (half
  rounded up, as MATLAB's `round` in Coates's code); features are ordered
  (top-left, top-right, bottom-left, bottom-right), K each.
  """
  r, s = maps.shape[1:3]
  hr, hs = (r + 1) // 2, (s + 1) // 2
  quads = [maps[:, rows, cols].sum(axis=(1, 2))
           for rows in (slice(0, hr), slice(hr, r))
           for cols in (slice(0, hs), slice(hs, s))]
  return jnp.concatenate(quads, axis=-1)


def activations(x, centroids, kind: str):
  """Maps whitened patches [..., d] to [..., K] activations.

  'triangle': max(0, mean_j z_j - z_k), z_k = ||x - c_k||, so about half the
  features are zero and the rest say how much nearer than average c_k is;
  'hard': one-hot of the nearest centroid.
  """
  # ||x||^2 - 2 x.c + ||c||^2: one matmul; full float32 (no TF32 on GPUs),
  # since the triangle code depends on differences between distances.
  sq = (jnp.sum(x * x, axis=-1, keepdims=True)
        - 2 * jnp.dot(x, centroids.T, precision=_HIGHEST)
        + jnp.sum(centroids * centroids, axis=-1))
  if kind == 'hard':
    return jax.nn.one_hot(jnp.argmin(sq, axis=-1), centroids.shape[0], dtype=jnp.float32)
  if kind == 'triangle':
    z = jnp.sqrt(jnp.maximum(sq, 0.0))  # cancellation can go slightly negative
    return jnp.maximum(jnp.mean(z, axis=-1, keepdims=True) - z, 0.0)
  raise UserError(f"unknown activation '{kind}'; use one of {ACTIVATIONS}.")


@functools.partial(jax.jit, static_argnames=('patch', 'stride', 'normalize_eps', 'kinds'))
def encode(images, encoder: Encoder, *, patch: int, stride: int, normalize_eps: float,
           kinds: tuple[str, ...] = ACTIVATIONS) -> dict:
  """uint8 images [B, H, W, C] -> {kind: float32 [B, 4K] quadrant-pooled features}."""
  x = dense_patches(images.astype(jnp.float32), patch, stride)
  x = normalize_patches(x, normalize_eps)
  x = jnp.dot(x - encoder.zca.mean, encoder.zca.matrix, precision=_HIGHEST)
  return {kind: quadrant_sum(activations(x, encoder.centroids, kind)) for kind in kinds}


def chunk_images(image_shape, patch: int, stride: int, num_centroids: int,
                 budget_mb: float) -> int:
  """Images per `encode` call so that its largest buffers stay near `budget_mb`.

  Per image: the patches (d floats per position) and, per activation, the
  distances and activations (K floats each per position).
  """
  h, w, c = image_shape
  positions = ((h - patch) // stride + 1) * ((w - patch) // stride + 1)
  per_image = 4 * positions * (patch * patch * c + 3 * num_centroids)
  return max(1, int(budget_mb * 2**20 // per_image))


def extract_features(images: np.ndarray, encoder: Encoder, *, patch: int, stride: int,
                     normalize_eps: float, budget_mb: float, mesh=None,
                     kinds: tuple[str, ...] = ACTIVATIONS, on_chunk=None,
                     label: str = 'k-means features') -> dict:
  """`encode` over a host image set in chunks of one fixed size (one compile).

  Each chunk is padded to a multiple of the devices and sharded over the
  mesh's `data` axis; the encoder is replicated. With `on_chunk`, each chunk's
  {kind: features} goes to it instead and nothing is kept ({} is returned):
  statistics of sets too large to hold. A long pass logs its progress
  (`label`, images done, rate and ETA) every 30 s.
  """
  mesh = mesh or parallel.make_mesh()
  devices = mesh.devices.size
  chunk = chunk_images(images.shape[1:], patch, stride, encoder.centroids.shape[0], budget_mb)
  chunk = min(chunk, len(images))
  chunk = -(-chunk // devices) * devices
  encoder = jax.device_put(encoder, parallel.replicated(mesh))
  out = {kind: [] for kind in kinds}
  progress = logbook.Progress(label, len(images))
  for start in range(0, len(images), chunk):
    x = images[start:start + chunk]
    real = len(x)
    if real < chunk:
      x = np.concatenate([x, np.zeros((chunk - real,) + x.shape[1:], x.dtype)])
    feats = encode(parallel.to_global(x, parallel.batch_sharded(mesh)), encoder,
                   patch=patch, stride=stride, normalize_eps=normalize_eps, kinds=kinds)
    feats = {kind: np.asarray(f[:real]) for kind, f in jax.device_get(feats).items()}
    progress.update(start + real)
    if on_chunk is not None:
      on_chunk(feats, images[start:start + real])
      continue
    for kind, f in feats.items():
      out[kind].append(f)
  if on_chunk is not None:
    return {}
  return {kind: np.concatenate(v) for kind, v in out.items()}


def linear_svm_scores(train_x, train_y, test_x, test_y, *, num_classes: int, c: float,
                      max_iter: int = 10000,
                      standardizer: probes.Standardizer | None = None) -> dict:
  """Top-1/top-5 (percent) on the test set of a linear SVM fit on the train set.

  Features are standardised with `standardizer` (statistics of training
  images, never the test set) or, without one, the train (labeled) set's own;
  the SVM is scikit-learn's `LinearSVC` (one-vs-rest, squared hinge, L2), and
  the top-k come from its per-class decision values, scored by
  `sslj.ops.probes.top_k_accuracy` (classes absent from the train labels
  score -inf; ties go to the lower class index, as in the other probes).
  """
  from sklearn.svm import LinearSVC  # pylint: disable=g-import-not-at-top
  scale = standardizer or probes.Standardizer.fit(train_x)
  svm = LinearSVC(C=c, max_iter=max_iter).fit(scale(train_x), train_y)
  decision = svm.decision_function(scale(test_x))
  if decision.ndim == 1:  # two classes: one column, positive = classes_[1]
    decision = np.stack([-decision, decision], axis=1)
  scores = np.full((len(test_x), num_classes), -np.inf)
  scores[:, svm.classes_] = decision
  return probes.top_k_accuracy(scores, test_y)


def _timed(what, fn, *args, **kw):
  start = time.perf_counter()
  out = fn(*args, **kw)
  jax.block_until_ready(out)
  logging.info('%s took %.1f s.', what, time.perf_counter() - start)
  return out


def run_pipeline(config, data, workdir: str):
  """Fits the encoder on unlabeled patches and scores SVMs on three feature sets.

  Returns ({'triangle', 'hard', 'raw_pixels'} -> {'top1', 'top5'}, 'triangle').
  """
  kf = config.kmeans_features
  if config.model.name != 'none':
    raise UserError(f"kmeans_svm trains no network: leave model unset (got '{config.model.name}').")
  if len(data.unlabeled_images) == 0:
    raise UserError('kmeans_svm learns its centroids from unlabeled images, but every training '
                    'image is labeled; set labels_per_class (e.g. :labels_per_class=10).')
  if config.num_steps < 0:
    raise UserError(f'num_steps (k-means iterations) must be >= 0, got {config.num_steps}.')
  checks = [(kf.stride >= 1, 'stride must be >= 1'),
            (1 <= kf.num_centroids <= kf.num_patches,
             'num_centroids must be between 1 and num_patches'),
            (kf.svm_c > 0, 'svm_c must be positive'),
            (kf.chunk_mb > 0, 'chunk_mb must be positive')]
  for ok, message in checks:
    if not ok:
      raise UserError(f'kmeans_features.{message} (got {dict(kf)}).')
  km.check_options(kf.kmeans_init, kf.kmeans_n_init,
                   fields=('kmeans_features.kmeans_init', 'kmeans_features.kmeans_n_init'))
  frozen_features.check_standardize(kf.standardize, 'kmeans_features.standardize')
  rng = np.random.default_rng(config.seed)
  patches = _timed(f'Sampling {kf.num_patches} patches of {kf.patch_size}x{kf.patch_size}',
                   sample_patches, data.unlabeled_images, kf.num_patches, kf.patch_size, rng)
  mesh = parallel.make_mesh()
  encoder = _timed(f'ZCA + k-means ({kf.num_centroids} centroids, {config.num_steps} '
                   'iterations)', fit, patches, num_centroids=kf.num_centroids,
                   num_iters=config.num_steps, key=jax.random.key(config.seed),
                   normalize_eps=kf.normalize_eps, zca_eps=kf.zca_eps, init=kf.kmeans_init,
                   n_init=kf.kmeans_n_init, mesh=mesh)
  if jax.process_index() == 0:
    h = w = kf.patch_size
    np.savez(os.path.join(workdir, 'centroids.npz'),
             centroids=np.asarray(encoder.centroids), zca_mean=np.asarray(encoder.zca.mean),
             zca_matrix=np.asarray(encoder.zca.matrix),
             patch_shape=np.array([h, w, data.labeled_images.shape[-1]]))

  # Labeled and test images in one pass: one compiled chunk size.
  images = np.concatenate([data.labeled_images, data.test_images])
  num_labeled = len(data.labeled_images)
  start = time.perf_counter()
  features = extract_features(images, encoder, patch=kf.patch_size, stride=kf.stride,
                              normalize_eps=kf.normalize_eps, budget_mb=kf.chunk_mb, mesh=mesh,
                              label='Features of the labeled and test images')
  elapsed = time.perf_counter() - start
  logging.info('Features of %d images (%d each) took %.1f s (%.0f images/s).', len(images),
               features['triangle'].shape[1], elapsed, len(images) / elapsed)
  features['raw_pixels'] = images.reshape(len(images), -1).astype(np.float32)

  standardizers = {}
  if kf.standardize == 'train':
    start = time.perf_counter()
    moments = {name: probes.Moments() for name in features}

    def add(feats, x):
      feats['raw_pixels'] = x.reshape(len(x), -1).astype(np.float32)
      for name, m in moments.items():
        m.add(feats[name])

    for name, m in moments.items():  # the labeled images' are already here
      m.add(features[name][:num_labeled])
    extract_features(data.unlabeled_images, encoder, patch=kf.patch_size, stride=kf.stride,
                     normalize_eps=kf.normalize_eps, budget_mb=kf.chunk_mb, mesh=mesh,
                     on_chunk=add, label="Feature statistics of the unlabeled images")
    standardizers = {name: m.standardizer() for name, m in moments.items()}
    logging.info('Feature statistics of the %d training images took %.1f s.',
                 moments['triangle'].count, time.perf_counter() - start)

  scores = {}
  for name in ('triangle', 'hard', 'raw_pixels'):
    f = features[name]
    start = time.perf_counter()
    scores[name] = linear_svm_scores(f[:num_labeled], data.labeled_labels, f[num_labeled:],
                                     data.test_labels, num_classes=data.num_classes,
                                     c=kf.svm_c, standardizer=standardizers.get(name))
    logging.info('SVM on %s features (%d): top-1 %.2f%%, top-5 %.2f%% (%.1f s).', name,
                 f.shape[1], scores[name]['top1'], scores[name]['top5'],
                 time.perf_counter() - start)
  return scores, 'triangle'


def trained_features(config, workdir: str, images: np.ndarray):
  """The t-SNE map's representation: triangle features from the run's saved encoder."""
  path = os.path.join(workdir, 'centroids.npz')
  if not os.path.exists(path):
    raise base.NotApplicable('no centroids.npz yet, so no k-means features')
  with np.load(path) as z:
    encoder = Encoder(whitening.ZCAWhitening(z['zca_mean'], z['zca_matrix']), z['centroids'])
  kf = config.kmeans_features
  feats = extract_features(images, encoder, patch=kf.patch_size, stride=kf.stride,
                           normalize_eps=kf.normalize_eps, budget_mb=kf.chunk_mb,
                           kinds=('triangle',))['triangle']
  # The SVM sees standardised features; so does the map.
  feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
  return 'k-means triangle features (standardised)', feats, 'centroids.npz'


METHOD = base.register(base.Definition(
    name='kmeans_svm', summary='single-layer k-means centroid features and a linear SVM',
    run_pipeline=run_pipeline, features=trained_features,
    fields_added={'kmeans_features.standardize': 'labeled'}))
