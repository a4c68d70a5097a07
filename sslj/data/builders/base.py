"""Shared pieces of sslj's TensorFlow-free tfds builders.

tfds's `Image` feature needs TensorFlow to encode PNGs, so our builders store
images as zlib-compressed raw uint8 tensors (`tfds.features.Tensor` with
`Encoding.ZLIB`) and labels as `ClassLabel`: both encode and decode with numpy
alone. Records go to ArrayRecord files so `tfds.data_source` can read them back
by index, again without TensorFlow.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
import os

import numpy as np
import tensorflow_datasets as tfds

from sslj.errors import UserError

# Label stored for examples of an unlabeled split (ClassLabel accepts -1).
UNLABELED = -1


def image_features(
    shape: Sequence[int | None], class_names: Sequence[str]
) -> tfds.features.FeaturesDict:
  """The feature spec every sslj builder uses: a uint8 HWC image and a label."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(
          shape=tuple(shape),
          dtype=np.uint8,
          encoding=tfds.features.Encoding.ZLIB,
      ),
      'label': tfds.features.ClassLabel(names=list(class_names)),
  })


def manual_dir_or_none(dl_manager) -> str | None:
  """The manual directory if one was given and holds files, else None.

  tfds's `dl_manager.manual_dir` raises when the directory is missing or empty;
  for us that only means "download instead", so it is not an error.
  """
  try:
    return os.fspath(dl_manager.manual_dir)
  except AssertionError:
    return None


def find_or_download(dl_manager, filename: str, url: str) -> str:
  """Path of `filename` in the manual dir, or of a fresh download of `url`.

  No checksum is registered for these URLs (redistributed copies, such as
  Debian's recompressed Fashion-MNIST, would never match one), so tfds
  downloads without verifying.
  """
  manual = manual_dir_or_none(dl_manager)
  if manual is not None:
    path = os.path.join(manual, filename)
    if os.path.isfile(path):
      return path
  try:
    return os.fspath(dl_manager.download(url))
  except Exception as e:  # pylint: disable=broad-except
    # Network errors come in many types; all mean the same thing to a user.
    where = f'the manual directory {manual}' if manual else 'a manual directory'
    reason = ' '.join(str(e).split())[:200]
    raise UserError(
        f'{filename} is not in {where} and downloading {url} failed '
        f'({type(e).__name__}: {reason}); put {filename} in a folder and pass '
        'it as manual_dir.'
    ) from e


class ImageClassificationBuilder(
    tfds.core.GeneratorBasedBuilder, skip_registration=True
):
  """Base of sslj builders: ordered ArrayRecord files of (image, label).

  Shuffling is disabled so that examples keep the order of the source files:
  STL-10's official folds are indices into the train split as published.
  Subclasses yield integer keys 0..N-1 per split.
  """

  HOMEPAGE: str | None = None

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(*args, **kwargs)

  @abc.abstractmethod
  def _image_shape(self) -> tuple[int | None, ...]:
    """HWC shape of the stored images (None for a size that varies)."""

  @abc.abstractmethod
  def _class_names(self) -> Sequence[str]:
    """Names of the classes, in label order."""

  def _metadata(self) -> tfds.core.MetadataDict | None:
    """Extra JSON metadata saved with the prepared data (STL-10's folds)."""
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(type(self).__doc__ or '').strip().splitlines()[0],
        features=image_features(self._image_shape(), self._class_names()),
        supervised_keys=('image', 'label'),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,
        metadata=self._metadata(),
    )
