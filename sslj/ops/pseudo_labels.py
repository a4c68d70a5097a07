"""Hard pseudo-labels from a network's own predictions, and their masked loss.

Pseudo-Label and FixMatch both turn the class with the highest predicted
probability into a target, optionally only where that probability reaches a
threshold, and train with cross-entropy against it. K-means pseudo-labels
name clusters by the majority class of their labeled members
(`name_clusters`). The targets are
constants: `hard_pseudo_labels` stops the gradient before the softmax, so
nothing flows back through the predictions that made them.

References: Lee 2013, "Pseudo-Label: the simple and efficient semi-supervised
learning method for deep neural networks"; Sohn et al. 2020, "FixMatch:
simplifying semi-supervised learning with consistency and confidence" (Eq. 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def hard_pseudo_labels(logits, threshold: float = 0.0):
  """(argmax labels int32, mask float32, max probability) of `logits` [B, K].

  The mask is 1 where the largest softmax probability is >= `threshold`
  (threshold 0 keeps every example). All three are constants for autodiff.
  """
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  max_prob = jnp.max(probs, axis=-1)
  labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  mask = (max_prob >= threshold).astype(jnp.float32)
  return labels, mask, max_prob


def masked_cross_entropy(logits, labels, mask):
  """Mean over ALL examples of mask * CE(logits, labels), in float32.

  Dividing by the batch size, not by the number kept, is FixMatch's Eq. 4:
  the loss shrinks while few predictions are confident.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.mean(mask * ce)


def name_clusters(clusters, labels, *, num_clusters: int, num_classes: int):
  """Names each cluster by the majority class of the labeled points in it.

  Args:
    clusters: int [n], the cluster of each labeled point.
    labels: int [n], its class.

  Returns:
    (names int32 [num_clusters], named bool [num_clusters]): a tie goes to the
    lowest class index; a cluster without labeled points is not named (its
    name is 0 and `named` False).
  """
  clusters = np.asarray(clusters, np.int64)
  labels = np.asarray(labels, np.int64)
  counts = np.zeros((num_clusters, num_classes), np.int64)
  np.add.at(counts, (clusters, labels), 1)
  return counts.argmax(axis=1).astype(np.int32), counts.sum(axis=1) > 0
