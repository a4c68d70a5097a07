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

import time
from typing import Callable

from absl import logging
import jax
import numpy as np

from sslj import parallel


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


def score_networks(features_fn, networks: dict, data, probe: Callable, *, batch_size: int,
                   mesh) -> dict:
  """`probe` fitted on each network's labeled-image features, scored on the test split.

  Args:
    features_fn: jitted `(variables, uint8 images) -> float32 [B, D]`.
    networks: {model name: variables}.
    data: the run's `SemiSupervisedData`.
    probe: `(train_x, train_y, test_x, test_y, num_classes=) -> {'top1', 'top5'}`.

  Returns:
    {model name: {'top1', 'top5'}}.
  """
  batch_size = probe_batch_size(batch_size, data, mesh)
  scores = {}
  for name, variables in networks.items():
    start = time.perf_counter()
    train_x, test_x = (network_features(features_fn, variables, images, batch_size=batch_size,
                                        mesh=mesh)
                       for images in (data.labeled_images, data.test_images))
    scores[name] = probe(train_x, data.labeled_labels, test_x, data.test_labels,
                         num_classes=data.num_classes)
    logging.info('%s: %d features, top-1 %.2f%%, top-5 %.2f%% (%.1f s).', name,
                 train_x.shape[1], scores[name]['top1'], scores[name]['top5'],
                 time.perf_counter() - start)
  return scores
