"""STL-10 from the official binary archive, read as a stream.

References:
  Coates, Lee & Ng, "An Analysis of Single-Layer Networks in Unsupervised
  Feature Learning", AISTATS 2011.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from sslj.data.builders import archives
from sslj.data.builders import base
from sslj.errors import UserError

ARCHIVE = 'stl10_binary.tar.gz'
URL = 'http://ai.stanford.edu/~acoates/stl10/' + ARCHIVE
CLASS_NAMES = (
    'airplane', 'bird', 'car', 'cat', 'deer',
    'dog', 'horse', 'monkey', 'ship', 'truck',
)
SIZE = 96
RECORD_BYTES = SIZE * SIZE * 3
# 1,000 images of 27 KB: 28 MB per chunk whatever the split's size.
CHUNK_RECORDS = 1000
SPLIT_FILES = {
    'train': ('train_X.bin', 'train_y.bin'),
    'test': ('test_X.bin', 'test_y.bin'),
    'unlabelled': ('unlabeled_X.bin', None),
}


def decode_images(records: np.ndarray) -> np.ndarray:
  """uint8 [n, 27648] records -> [n, 96, 96, 3] HWC images.

  Each record stores its three channel planes in column-major (Fortran)
  order, so after splitting into [channel, column, row] the axes are
  reversed to [row, column, channel].
  """
  return records.reshape(-1, 3, SIZE, SIZE).transpose(0, 3, 2, 1)


def parse_labels(data: bytes, name: str) -> np.ndarray:
  """1-based uint8 labels -> 0-based; UserError if one is out of 1..10."""
  labels = np.frombuffer(data, np.uint8).astype(np.int64) - 1
  if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
    raise UserError(f'{name} has labels outside 1..10: download {ARCHIVE} again.')
  return labels


def parse_folds(text: str, num_train: int) -> list[list[int]]:
  """fold_indices.txt (one line of 0-based train indices per fold) -> lists."""
  folds = [[int(i) for i in line.split()] for line in text.splitlines() if line.strip()]
  if not folds or any(not 0 <= i < num_train for fold in folds for i in fold):
    raise UserError(
        f'fold_indices.txt in {ARCHIVE} is empty or has indices outside '
        f'0..{num_train - 1}: download {ARCHIVE} again.'
    )
  return folds


class SsljStl10(base.ImageClassificationBuilder):
  """STL-10: 5,000 labelled + 100,000 unlabelled train, 8,000 test, 96x96."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  HOMEPAGE = 'https://cs.stanford.edu/~acoates/stl10/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Put {ARCHIVE} (from {URL}), or the stl10_binary/ folder extracted '
      'from it, in the manual directory.'
  )

  def _image_shape(self):
    return (SIZE, SIZE, 3)

  def _class_names(self):
    return CLASS_NAMES

  def _metadata(self):
    # Filled in by _split_generators; saved as metadata.json with the data.
    return tfds.core.MetadataDict()

  def _split_generators(self, dl_manager):
    source = self._locate(dl_manager)
    # One pass over the archive for the small members; the big image files
    # are streamed later, one split at a time.
    small = archives.read_small_members(
        source,
        {'train_y.bin', 'test_y.bin', 'class_names.txt', 'fold_indices.txt'},
    )
    names = tuple(small['class_names.txt'].decode().split())
    if names != CLASS_NAMES:
      raise UserError(
          f'class_names.txt in {source} lists {names}, not the STL-10 classes: '
          f'use the official {ARCHIVE}.'
      )
    labels = {
        split: parse_labels(small[y], y)
        for split, (_, y) in SPLIT_FILES.items() if y is not None
    }
    self.info.metadata['folds'] = parse_folds(
        small['fold_indices.txt'].decode(), len(labels['train'])
    )
    return {
        split: self._generate_examples(source, x, labels.get(split))
        for split, (x, _) in SPLIT_FILES.items()
    }

  def _locate(self, dl_manager) -> str:
    """The archive, or an extracted stl10_binary/ folder, in the manual dir."""
    manual = base.manual_dir_or_none(dl_manager)
    if manual is not None:
      folder = os.path.join(manual, 'stl10_binary')
      if os.path.isfile(os.path.join(folder, 'train_X.bin')):
        return folder
    return base.find_or_download(dl_manager, ARCHIVE, URL)

  def _generate_examples(self, source, member, labels):
    index = 0
    for images in archives.iter_record_chunks(
        source, member, RECORD_BYTES, CHUNK_RECORDS, decode_images
    ):
      if labels is not None and index + len(images) > len(labels):
        raise UserError(
            f'{member} in {source} has more images than its labels file has '
            f'labels ({len(labels)}): download {ARCHIVE} again.'
        )
      for image in images:
        label = base.UNLABELED if labels is None else int(labels[index])
        yield index, {'image': image, 'label': label}
        index += 1
    if labels is not None and index != len(labels):
      raise UserError(
          f'{member} in {source} has {index} images but its labels file has '
          f'{len(labels)}: download {ARCHIVE} again.'
      )
