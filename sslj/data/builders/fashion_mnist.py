"""Fashion-MNIST from its four IDX files, parsed with numpy.

Debian's `dataset-fashion-mnist` package installs the files recompressed, so
tfds's recorded checksums reject them; this builder reads whatever gzip
compression they carry and checks the IDX headers instead.

References:
  Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
  Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds

from sslj.data.builders import base
from sslj.errors import UserError

# Where Debian's dataset-fashion-mnist package puts the files.
DEFAULT_MANUAL_DIR = '/usr/share/datasets/fashion-mnist'
URL = 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'
FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
CLASS_NAMES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)
# IDX magic numbers: two zero bytes, the element type (0x08 = uint8), and the
# number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def read_idx(path: str, magic: int) -> np.ndarray:
  """Reads a gzip-compressed IDX file of uint8 values into an array.

  Raises:
    UserError: the file is not gzip, has the wrong magic number (for example
      a label file given as images), or holds fewer bytes than its header says.
  """
  name = os.path.basename(path)
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise UserError(
        f'{path} is not a readable gzip file ({e}); download {name} again.'
    ) from e
  ndim = magic & 0xFF
  header_size = 4 * (1 + ndim)
  found = int.from_bytes(data[:4], 'big') if len(data) >= 4 else None
  if found != magic or len(data) < header_size:
    raise UserError(
        f'{path} is not an IDX file of uint8 {ndim}-d data (magic '
        f'{found if found is None else hex(found)}, expected {hex(magic)}); '
        f'download {name} again.'
    )
  shape = tuple(
      int.from_bytes(data[4 * (i + 1) : 4 * (i + 2)], 'big') for i in range(ndim)
  )
  size = int(np.prod(shape))
  if len(data) - header_size != size:
    raise UserError(
        f'{path} holds {len(data) - header_size} bytes of data but its header '
        f'says {shape} = {size}; the file is truncated or corrupt, download '
        f'{name} again.'
    )
  return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def read_split(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
  """One split's images [N, 28, 28, 1] and labels [N], checked to agree."""
  images = read_idx(images_path, IMAGES_MAGIC)
  labels = read_idx(labels_path, LABELS_MAGIC)
  if len(images) != len(labels):
    raise UserError(
        f'{images_path} has {len(images)} images but {labels_path} has '
        f'{len(labels)} labels; use files of the same split.'
    )
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise UserError(
        f'{labels_path} has label {labels.max()}, Fashion-MNIST has 10 '
        'classes; download it again.'
    )
  return images[..., None], labels


class SsljFashionMnist(base.ImageClassificationBuilder):
  """Fashion-MNIST: 60,000 + 10,000 28x28 grey images of clothes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  HOMEPAGE = 'https://github.com/zalandoresearch/fashion-mnist'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put the four *-ubyte.gz IDX files in the manual directory (Debian: '
      f'apt install dataset-fashion-mnist puts them in {DEFAULT_MANUAL_DIR}).'
  )

  def _image_shape(self):
    return (28, 28, 1)

  def _class_names(self):
    return CLASS_NAMES

  def _split_generators(self, dl_manager):
    generators = {}
    for split, (images_file, labels_file) in FILES.items():
      images_path = base.find_or_download(dl_manager, images_file, URL + images_file)
      labels_path = base.find_or_download(dl_manager, labels_file, URL + labels_file)
      # Parse now, not lazily, so a bad file fails before anything is written.
      generators[split] = self._generate_examples(*read_split(images_path, labels_path))
    return generators

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label)}
