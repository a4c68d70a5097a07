"""Features of a frozen network over a host image set, and probes on them.

The unsupervised methods (Exemplar-CNN, DeepCluster) have no logits for the
test classes; they are scored by fitting a classifier on the labeled images'
features of the trained network and, as the floor, of a randomly initialised
network of the same architecture. DeepCluster also needs the features of its
whole unlabeled pool before every epoch's clustering.

References:
  Caron, Bojanowski, Joulin & Douze, "Deep clustering for unsupervised
    learning of visual features", ECCV 2018 (linear classifiers on frozen
    features, a random network as the baseline).
  Dosovitskiy, Fischer, Springenberg, Riedmiller & Brox, "Discriminative
    unsupervised feature learning with exemplar convolutional neural
    networks", TPAMI 2016.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

from absl import logging
import jax
import numpy as np

from sslj import logbook, parallel
from sslj.errors import UserError
from sslj.ops import probes


def network_features(features_fn, variables, images: np.ndarray, *, batch_size: int,
                     mesh) -> np.ndarray:
  """`features_fn(variables, uint8 images)` over a host image set in padded batches.

  Every batch has `batch_size` rows (the last is zero-padded and the padding
  dropped), so `features_fn` compiles once.
  """
  out = []
  for start in range(0, len(images), batch_size):
    x = images[start:start + batch_size]
    real = len(x)
    if real < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - real,) + x.shape[1:], x.dtype)])
    f = features_fn(variables, parallel.to_global(x, parallel.batch_sharded(mesh)))
    out.append(np.asarray(jax.device_get(f))[:real])
  return np.concatenate(out)


def random_network(init: Callable, seed: int, mesh):
  """The method's own `init` from a key of its own: same initialisers, new weights.

  `init` is compiled the same way the loop compiles it, so its compilation
  is reused.
  """
  return jax.jit(init, out_shardings=parallel.replicated(mesh))(
      jax.random.fold_in(jax.random.key(seed), 1))


def probe_batch_size(batch_size: int, data, mesh) -> int:
  """One batch size for the labeled and the test images: one compilation.

  At most the larger set, rounded up to a multiple of the devices.
  """
  batch_size = min(batch_size, max(len(data.labeled_images), len(data.test_images)))
  return -(-batch_size // mesh.devices.size) * mesh.devices.size


STANDARDIZE = ('train', 'labeled')
# Images per chunk when the statistics of every training image are gathered.
MOMENTS_CHUNK = 4096


def check_standardize(value, field: str) -> None:
  if value not in STANDARDIZE:
    raise UserError(f"{field} must be one of {list(STANDARDIZE)} ('train': the mean and "
                    "deviation of every training image's features, labeled and unlabeled; "
                    f"'labeled': the labeled images' own), got {value!r}.")


def training_moments(features_of: Callable[[np.ndarray], np.ndarray], data) -> probes.Moments:
  """Per-feature moments over every training image (labeled, then unlabeled), in chunks."""
  moments = probes.Moments()
  progress = logbook.Progress('Feature statistics of the training images',
                              len(data.labeled_images) + len(data.unlabeled_images))
  for images in (data.labeled_images, data.unlabeled_images):
    for start in range(0, len(images), MOMENTS_CHUNK):
      moments.add(features_of(images[start:start + MOMENTS_CHUNK]))
      progress.update(moments.count)
  return moments


def score_networks(features_fn, networks: dict, data, probe: Callable, *, batch_size: int,
                   mesh, standardize: str = 'train') -> dict:
  """`probe` fitted on each network's labeled-image features, scored on the test split.

  Args:
    features_fn: jitted `(variables, uint8 images) -> float32 [B, D]`.
    networks: {model name: variables}.
    data: the run's `SemiSupervisedData`.
    probe: `(train_x, train_y, test_x, test_y, num_classes=, standardizer=)
      -> {'top1', 'top5'}`.
    standardize: 'train' standardises the features with the statistics of
      every training image (Coates et al.'s rule), 'labeled' with the labeled
      images' own.

  Returns:
    {model name: {'top1', 'top5'}}.
  """
  batch_size = probe_batch_size(batch_size, data, mesh)
  scores = {}
  for name, variables in networks.items():
    start = time.perf_counter()
    features_of = functools.partial(network_features, features_fn, variables,
                                    batch_size=batch_size, mesh=mesh)
    train_x, test_x = features_of(data.labeled_images), features_of(data.test_images)
    standardizer = (training_moments(features_of, data).standardizer()
                    if standardize == 'train' else None)
    scores[name] = probe(train_x, data.labeled_labels, test_x, data.test_labels,
                         num_classes=data.num_classes, standardizer=standardizer)
    logging.info('%s: %d features, top-1 %.2f%%, top-5 %.2f%% (%.1f s).', name,
                 train_x.shape[1], scores[name]['top1'], scores[name]['top5'],
                 time.perf_counter() - start)
  return scores
