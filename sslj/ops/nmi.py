"""Normalised mutual information between two labelings of the same points.

NMI(A, B) = I(A; B) / ((H(A) + H(B)) / 2), with natural logarithms; the
labels are arbitrary integers (only which points share a label matters), so
NMI is invariant to renaming the clusters. DeepCluster tracks it between the
cluster assignments of consecutive epochs (how much the clustering still
moves) and between the assignments and the true classes.

Conventions (those of scikit-learn's `normalized_mutual_info_score` with
its default arithmetic mean): two single-cluster labelings score 1; any
other pair with zero mutual information scores 0.

References:
  Strehl & Ghosh, "Cluster ensembles - a knowledge reuse framework for
    combining multiple partitions", JMLR 2002.
  Caron, Bojanowski, Joulin & Douze, "Deep clustering for unsupervised
    learning of visual features", ECCV 2018 (Section 4.2, Fig. 2).
"""

from __future__ import annotations

import numpy as np

from sslj.errors import UserError


def _entropy(counts: np.ndarray, n: int) -> float:
  p = counts[counts > 0] / n
  return float(-np.sum(p * np.log(p)))


def normalized_mutual_info(labels_a, labels_b) -> float:
  """NMI (arithmetic normalisation) of two integer labelings of n points."""
  a = np.asarray(labels_a).reshape(-1)
  b = np.asarray(labels_b).reshape(-1)
  if len(a) != len(b):
    raise UserError(f'NMI needs two labelings of the same points; got {len(a)} and {len(b)} labels.')
  if not len(a):
    return 1.0
  _, a = np.unique(a, return_inverse=True)
  _, b = np.unique(b, return_inverse=True)
  ka, kb = a.max() + 1, b.max() + 1
  if ka == kb == 1:
    return 1.0
  n = len(a)
  # Joint counts of the (a, b) pairs that occur: a sparse contingency table,
  # so 10,000 x 10,000 clusters never make a dense matrix.
  pairs, joint = np.unique(a.astype(np.int64) * kb + b, return_counts=True)
  count_a = np.bincount(a, minlength=ka)
  count_b = np.bincount(b, minlength=kb)
  pa, pb = count_a[pairs // kb], count_b[pairs % kb]
  mi = float(np.sum(joint / n * (np.log(joint) + np.log(n) - np.log(pa) - np.log(pb))))
  mi = max(mi, 0.0)  # round-off can leave a tiny negative value
  if mi == 0.0:
    return 0.0
  return mi / ((_entropy(count_a, n) + _entropy(count_b, n)) / 2)
