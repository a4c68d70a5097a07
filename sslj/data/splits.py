"""Labelled/unlabelled splits of a training set for semi-supervised learning.

`labeled_subset` picks a stratified, seeded label budget; `semi_supervised`
turns an `ArraySplits` into the labelled set, the unlabelled pool, the test
set and the normalisation statistics a run needs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sslj.data.sources import ArraySplits
from sslj.errors import UserError

# Images per step of the chunked mean/std pass (bounds the float64 copy).
_STATS_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class SemiSupervisedData:
  """What a semi-supervised run trains and evaluates on.

  Attributes:
    labeled_images: uint8 [L, H, W, C].
    labeled_labels: int32 [L].
    unlabeled_images: uint8 [U, H, W, C]: train images outside the labelled
      set (unless excluded), then the dataset's extra unlabelled split.
    test_images: uint8 [T, H, W, C].
    test_labels: int32 [T].
    num_classes: number of classes.
    class_names: label i is class_names[i].
    mean: float32 [C], per-channel mean of labelled + unlabelled images in
      [0, 1] scale.
    std: float32 [C], per-channel (population) standard deviation of the same.
    labeled_indices: sorted int64 indices into the train split of the
      labelled images (to record or reproduce the split).
    unlabeled_labels: int32 [U], the class of each unlabelled image where the
      dataset knows it (train images) and -1 where it does not (the extra
      split); None when not known at all. Never given to a method: the loop
      only scores methods' pseudo-labels against it, for the logs.
  """

  labeled_images: np.ndarray
  labeled_labels: np.ndarray
  unlabeled_images: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  mean: np.ndarray
  std: np.ndarray
  labeled_indices: np.ndarray
  unlabeled_labels: np.ndarray | None = None


def labeled_subset(
    labels: np.ndarray,
    labels_per_class: int | None,
    seed: int,
    *,
    num_classes: int | None = None,
) -> np.ndarray:
  """Sorted indices of `labels_per_class` examples of every class.

  Each class is sampled without replacement with one generator seeded by
  `seed`, so the subset depends only on (labels, labels_per_class, seed).

  Args:
    labels: int labels [N].
    labels_per_class: examples to keep per class; None keeps all.
    seed: seed of the choice.
    num_classes: if given, classes 0..num_classes-1 must all be present;
      otherwise the classes are those occurring in `labels`.

  Returns:
    int64 indices into `labels`, sorted, num_classes * labels_per_class long.

  Raises:
    UserError: labels_per_class < 1, or more than the smallest class holds.
  """
  labels = np.asarray(labels)
  if labels_per_class is None:
    return np.arange(len(labels), dtype=np.int64)
  if (
      isinstance(labels_per_class, bool)
      or not isinstance(labels_per_class, (int, np.integer))
      or labels_per_class < 1
  ):
    raise UserError(
        f'labels_per_class={labels_per_class!r} must be an integer >= 1; for every '
        'label, use labels_per_class=all in the config string.'
    )
  classes = np.arange(num_classes) if num_classes is not None else np.unique(labels)
  if len(classes) == 0:
    raise UserError('there are no labelled examples to choose from.')
  counts = np.array([np.count_nonzero(labels == c) for c in classes])
  smallest = int(np.argmin(counts))
  if counts[smallest] < labels_per_class:
    raise UserError(
        f'labels_per_class={labels_per_class} is more than class '
        f'{classes[smallest]} has ({counts[smallest]} labelled examples): use '
        f'labels_per_class <= {counts[smallest]}.'
    )
  rng = np.random.default_rng(seed)
  chosen = [
      rng.choice(np.flatnonzero(labels == c), labels_per_class, replace=False)
      for c in classes
  ]
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def semi_supervised(
    arrays: ArraySplits,
    labels_per_class: int | None,
    seed: int,
    fold: int | None = None,
    unlabeled_from_train: bool = True,
) -> SemiSupervisedData:
  """Splits the training set into a labelled set and an unlabelled pool.

  Args:
    arrays: a loaded dataset.
    labels_per_class: labelled examples per class; None for all of them.
    seed: seed of the labelled subset.
    fold: an official fold (STL-10) to use as the labelled set. With a fold,
      labels_per_class=None takes the whole fold and an int subsamples each
      class within the fold (it must not exceed the fold's smallest class).
    unlabeled_from_train: whether train images outside the labelled set join
      the unlabelled pool (they always precede the extra unlabelled split).

  Raises:
    UserError: a fold on a dataset without folds or out of range, or an
      impossible labels_per_class.
  """
  num_classes = len(arrays.class_names)
  if fold is None:
    labeled = labeled_subset(arrays.train_labels, labels_per_class, seed, num_classes=num_classes)
  else:
    if arrays.folds is None:
      raise UserError(f'{arrays.name} has no official folds: leave fold unset.')
    if not 0 <= fold < len(arrays.folds):
      raise UserError(
          f'fold={fold} is out of range: {arrays.name} has folds '
          f'0..{len(arrays.folds) - 1}.'
      )
    pool = np.asarray(arrays.folds[fold], dtype=np.int64)
    within = labeled_subset(arrays.train_labels[pool], labels_per_class, seed)
    labeled = np.sort(pool[within])
  rest = np.ones(len(arrays.train_labels), dtype=bool)
  rest[labeled] = False
  unknown = np.full(len(arrays.unlabeled_images), -1, np.int32)
  if unlabeled_from_train and rest.any():
    unlabeled = np.concatenate([arrays.train_images[rest], arrays.unlabeled_images])
    unlabeled_labels = np.concatenate([arrays.train_labels[rest].astype(np.int32), unknown])
  else:
    unlabeled = arrays.unlabeled_images  # No copy: it may be gigabytes.
    unlabeled_labels = unknown
  labeled_images = arrays.train_images[labeled]
  mean, std = channel_stats([labeled_images, unlabeled])
  return SemiSupervisedData(
      labeled_images=labeled_images,
      labeled_labels=arrays.train_labels[labeled].astype(np.int32),
      unlabeled_images=unlabeled,
      test_images=arrays.test_images,
      test_labels=arrays.test_labels.astype(np.int32),
      num_classes=num_classes,
      class_names=tuple(arrays.class_names),
      mean=mean,
      std=std,
      labeled_indices=labeled,
      unlabeled_labels=unlabeled_labels,
  )


def channel_stats(image_sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of uint8 NHWC images, in [0, 1] scale.

  Accumulates sums in float64 chunk by chunk, so no float copy of a
  100,000-image pool is ever made.
  """
  channels = image_sets[0].shape[-1]
  total = np.zeros(channels)
  total_sq = np.zeros(channels)
  count = 0
  for images in image_sets:
    for start in range(0, len(images), _STATS_CHUNK):
      chunk = images[start : start + _STATS_CHUNK].reshape(-1, channels).astype(np.float64)
      total += chunk.sum(axis=0)
      total_sq += np.square(chunk).sum(axis=0)
      count += len(chunk)
  mean = total / count / 255.0
  var = np.maximum(total_sq / count / 255.0**2 - mean**2, 0.0)
  return mean.astype(np.float32), np.sqrt(var).astype(np.float32)
