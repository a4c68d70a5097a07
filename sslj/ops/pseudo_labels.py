"""Hard pseudo-labels from a network's own predictions, their masks and their loss.

Pseudo-Label and FixMatch both turn the class with the highest predicted
probability into a target, optionally only where that probability reaches a
threshold, and train with cross-entropy against it. K-means pseudo-labels
name clusters by the majority class of their labeled members
(`name_clusters`). The targets are
constants: `hard_labels` stops the gradient before the softmax, so
nothing flows back through the predictions that made them.

Which pseudo-labels count is a `ConfidenceMask`, an optax-style pair of pure
functions with its own state: `init(num_unlabeled, num_classes) -> state`
and `update(probs, indices, state) -> (mask, state)`, where `probs` are the
weak views' class probabilities [B, K] and `indices` their rows in the
unlabeled pool (the loop gives every step these). FixMatch's fixed threshold
is the stateless case (`fixed_threshold`); thresholds that adapt per class
from the predictions so far (FlexMatch, FreeMatch; `sslj.ops.thresholds`)
keep their statistics in the state, which the method carries in its train
state.

References: Lee 2013, "Pseudo-Label: the simple and efficient semi-supervised
learning method for deep neural networks"; Sohn et al. 2020, "FixMatch:
simplifying semi-supervised learning with consistency and confidence" (Eq. 4).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class ConfidenceMask(NamedTuple):
  """Which pseudo-labels train: `init(num_unlabeled, num_classes) -> state`;
  `update(probs [B, K], indices int32 [B], state) -> (mask float32 [B], state)`.

  The mask may be soft (a weight in [0, 1] per pseudo-label, SoftMatch's).
  `describe(state) -> {name: scalar}`, if given, is what a train step logs of
  the state (the mean threshold, say)."""
  init: Callable[[int, int], Any]
  update: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
  describe: Callable[[Any], dict] | None = None


def fixed_threshold(threshold: float) -> ConfidenceMask:
  """1 where the largest probability is >= `threshold` (FixMatch's Eq. 4); no state."""

  def init(num_unlabeled: int, num_classes: int):
    del num_unlabeled, num_classes
    return ()

  def update(probs, indices, state):
    del indices
    return (jnp.max(probs, axis=-1) >= threshold).astype(jnp.float32), state

  return ConfidenceMask(init, update)


def class_probabilities(logits):
  """Softmax of `logits` [B, K] in float32, a constant for autodiff."""
  return jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)


def hard_labels(logits, threshold: float = 0.0):
  """(argmax labels int32, mask float32, max probability) of `logits` [B, K].

  The mask is 1 where the largest softmax probability is >= `threshold`
  (threshold 0 keeps every example). All three are constants for autodiff.
  """
  probs = class_probabilities(logits)
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
