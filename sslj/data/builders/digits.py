"""scikit-learn's bundled 8x8 handwritten digits as a tfds dataset.

The 1,797 images ship inside scikit-learn, so this dataset needs neither
network nor TensorFlow; it is every config's default.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from sslj.data.builders import base

# Fraction of each class held out for the test split.
TEST_FRACTION = 0.25
# Fixed seed of the train/test split: changing it changes every digits result.
SPLIT_SEED = 0


def load_images() -> tuple[np.ndarray, np.ndarray]:
  """All digits as uint8 [1797, 8, 8, 1] images in 0..255 and int labels."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  # Pixel values are counts 0..16 of set pixels in 4x4 blocks; map to 0..255.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images[..., None], digits.target.astype(np.int64)


def test_split_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Boolean mask of a stratified test split: `fraction` of every class.

  Our own numpy code (one fixed-seed permutation per class) rather than
  scikit-learn's splitter, whose output may change between versions.
  """
  rng = np.random.default_rng(seed)
  mask = np.zeros(len(labels), dtype=bool)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    chosen = rng.permutation(members)[: int(round(fraction * len(members)))]
    mask[chosen] = True
  return mask


class SsljDigits(base.ImageClassificationBuilder):
  """scikit-learn's 8x8 digits (1,797 images), 75/25 stratified split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  HOMEPAGE = 'https://archive.ics.uci.edu/dataset/80'

  def _image_shape(self):
    return (8, 8, 1)

  def _class_names(self):
    return [str(d) for d in range(10)]

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ship with scikit-learn.
    images, labels = load_images()
    test = test_split_mask(labels, TEST_FRACTION, SPLIT_SEED)
    return {
        'train': self._generate_examples(images[~test], labels[~test]),
        'test': self._generate_examples(images[test], labels[test]),
    }

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label)}
