"""CIFAR-10 from the official binary archive.

References:
  Krizhevsky, "Learning Multiple Layers of Features from Tiny Images",
  technical report, University of Toronto, 2009.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from sslj.data.builders import archives
from sslj.data.builders import base
from sslj.errors import UserError

ARCHIVE = 'cifar-10-binary.tar.gz'
URL = 'https://www.cs.toronto.edu/~kriz/' + ARCHIVE
CLASS_NAMES = (
    'airplane', 'automobile', 'bird', 'cat', 'deer',
    'dog', 'frog', 'horse', 'ship', 'truck',
)
SIZE = 32
# One label byte, then the red, green and blue 32x32 planes, row-major.
RECORD_BYTES = 1 + 3 * SIZE * SIZE
SPLIT_FILES = {
    'train': tuple(f'data_batch_{i}.bin' for i in range(1, 6)),
    'test': ('test_batch.bin',),
}


def decode_records(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [n, 3073] records -> (images [n, 32, 32, 3], labels [n])."""
  images = records[:, 1:].reshape(-1, 3, SIZE, SIZE).transpose(0, 2, 3, 1)
  return images, records[:, 0].astype(np.int64)


class SsljCifar10(base.ImageClassificationBuilder):
  """CIFAR-10: 50,000 train and 10,000 test 32x32 colour images."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  HOMEPAGE = 'https://www.cs.toronto.edu/~kriz/cifar.html'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Put {ARCHIVE} (from {URL}), or the cifar-10-batches-bin/ folder '
      'extracted from it, in the manual directory.'
  )

  def _image_shape(self):
    return (SIZE, SIZE, 3)

  def _class_names(self):
    return CLASS_NAMES

  def _split_generators(self, dl_manager):
    source = self._locate(dl_manager)
    meta = archives.read_small_members(source, {'batches.meta.txt'})
    names = tuple(meta['batches.meta.txt'].decode().split())
    if names != CLASS_NAMES:
      raise UserError(
          f'batches.meta.txt in {source} lists {names}, not the CIFAR-10 '
          f'classes: use the official {ARCHIVE}.'
      )
    return {
        split: self._generate_examples(source, members)
        for split, members in SPLIT_FILES.items()
    }

  def _locate(self, dl_manager) -> str:
    """The archive, or an extracted cifar-10-batches-bin/ folder."""
    manual = base.manual_dir_or_none(dl_manager)
    if manual is not None:
      folder = os.path.join(manual, 'cifar-10-batches-bin')
      if os.path.isfile(os.path.join(folder, 'test_batch.bin')):
        return folder
    return base.find_or_download(dl_manager, ARCHIVE, URL)

  def _generate_examples(self, source, members):
    # The archive (170 MB) is small enough to read each batch file in one go;
    # batches are read in name order whatever their order in the archive.
    batches = archives.read_small_members(source, set(members))
    index = 0
    for member in members:
      data = batches[member]
      if len(data) % RECORD_BYTES:
        raise UserError(
            f'{member} in {source} ends with a partial record: download '
            f'{ARCHIVE} again.'
        )
      images, labels = decode_records(
          np.frombuffer(data, np.uint8).reshape(-1, RECORD_BYTES)
      )
      if labels.size and labels.max() >= len(CLASS_NAMES):
        raise UserError(f'{member} has labels above 9: download {ARCHIVE} again.')
      for image, label in zip(images, labels):
        yield index, {'image': image, 'label': int(label)}
        index += 1
