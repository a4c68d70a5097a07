"""A user's own images as a tfds dataset: `<root>/{train,val}/<class>/*`.

Layout:
  <root>/train/<class>/...   labelled training images (sub-folders allowed)
  <root>/val/<class>/...     the test split; classes must also be in train/
  <root>/unlabeled/...       optional extra unlabelled images, flat or nested

Every file is tried with PIL whatever its extension, turned upright by its
EXIF orientation, converted to RGB and, if an image size was asked for,
resized (stretched, bilinear) to it. Files PIL cannot read, truncated images
and images over `MAX_PIXELS` (decompression bombs) are skipped and logged.
Each (folder, image size, folder contents) prepares as its own builder
config, so editing the folder prepares it anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import warnings

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow_datasets as tfds

from sslj.data.builders import base
from sslj.errors import UserError

SPLIT_FOLDERS = {'train': 'train', 'test': 'val', 'unlabelled': 'unlabeled'}
# Images with more pixels than this are refused before decoding: a small
# compressed file can otherwise expand to gigabytes (a decompression bomb).
MAX_PIXELS = 64 * 1024 * 1024
# How many skipped files to name in the log line and the metadata.
NAMES_SHOWN = 5


class ImageTooLarge(ValueError):
  """The image header declares more than MAX_PIXELS pixels."""


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """Which folder to read and what size to give its images.

  Attributes:
    root: absolute path of the folder.
    image_size: (height, width) to resize every image to, or None to keep
      the images' own size (they must then all have the same size).
    class_names: sub-folders of `root/train`, sorted; label i is class i.
  """

  root: str = ''
  image_size: tuple[int, int] | None = None
  class_names: tuple[str, ...] = ()


def _is_hidden(name: str) -> bool:
  return name.startswith('.')


def list_files(folder: str) -> list[str]:
  """All non-hidden files under `folder`, recursively, sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
    dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
    found.extend(os.path.join(dirpath, f) for f in filenames if not _is_hidden(f))
  return sorted(found)


def list_split(root: str, split: str, class_names) -> list[tuple[str, int]]:
  """(path, label) of every file of a split; label -1 for unlabelled ones."""
  folder = os.path.join(root, SPLIT_FOLDERS[split])
  if split == 'unlabelled':
    return [(path, base.UNLABELED) for path in list_files(folder)]
  files = []
  for label, name in enumerate(class_names):
    files.extend((path, label) for path in list_files(os.path.join(folder, name)))
  return files


def class_folders(folder: str) -> list[str]:
  """Sorted names of the non-hidden sub-folders of `folder`."""
  return sorted(
      d for d in os.listdir(folder)
      if not _is_hidden(d) and os.path.isdir(os.path.join(folder, d))
  )


def make_config(root: str, image_size: int | tuple[int, int] | None) -> ImageFolderConfig:
  """Checks the folder's layout and names a config for its current contents.

  Raises:
    UserError: the folder, `train/` or `val/` is missing, `train/` has no
      class folders or one is empty, `val/` has no images or a class train/
      lacks, or image_size is not positive.
  """
  root = os.path.abspath(os.path.expanduser(root))
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  if image_size is not None:
    image_size = tuple(int(s) for s in image_size)
    if len(image_size) != 2 or min(image_size) < 1:
      raise UserError(f'image_size={image_size} must be a positive int or (height, width).')
  class_names = check_layout(root)
  # The name keys the prepared data: a different folder, size or content
  # (files added, removed or rewritten) prepares separately.
  digest = hashlib.sha256('\n'.join([root, str(image_size)]).encode())
  for split in SPLIT_FOLDERS:
    for path, _ in list_split(root, split, class_names):
      stat = os.stat(path)
      digest.update(f'\n{os.path.relpath(path, root)}\t{stat.st_size}\t{stat.st_mtime_ns}'.encode())
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(root).lower()).strip('_') or 'root'
  size = f'{image_size[0]}x{image_size[1]}' if image_size else 'native'
  return ImageFolderConfig(
      name=f'{slug}_{size}_{digest.hexdigest()[:16]}',
      description=f'Images of {root}, {size}.',
      root=root,
      image_size=image_size,
      class_names=class_names,
  )


def check_layout(root: str) -> tuple[str, ...]:
  """The class names of an image folder; UserError if its layout is wrong."""
  layout = f'{root}/train/<class>/ and {root}/val/<class>/ folders of images'
  if not os.path.isdir(root):
    raise UserError(f'{root} is not a folder: an image folder dataset needs {layout}.')
  if not [n for n in os.listdir(root) if not _is_hidden(n)]:
    raise UserError(f'{root} is empty: an image folder dataset needs {layout}.')
  for sub in ('train', 'val'):
    if not os.path.isdir(os.path.join(root, sub)):
      raise UserError(f'{root}/{sub} is not a folder: an image folder dataset needs {layout}.')
  class_names = tuple(class_folders(os.path.join(root, 'train')))
  if not class_names:
    raise UserError(
        f"{root}/train has no class folders: put each class's images in "
        f'{root}/train/<class name>/.'
    )
  extra = sorted(set(class_folders(os.path.join(root, 'val'))) - set(class_names))
  if extra:
    raise UserError(
        f'{root}/val has classes {extra} that {root}/train lacks: use the same '
        'class folder names in both.'
    )
  empty = [n for n in class_names if not list_files(os.path.join(root, 'train', n))]
  if empty:
    raise UserError(f'{root}/train has empty class folders {empty}: add images or remove them.')
  if not list_split(root, 'test', class_names):
    raise UserError(f'{root}/val has no images: put held-out images in {root}/val/<class>/.')
  return class_names


def decode_image(path: str, image_size: tuple[int, int] | None) -> np.ndarray:
  """Reads an image file as uint8 RGB [H, W, 3], resized if a size is given.

  Raises whatever PIL raises for an unreadable file, and `ImageTooLarge`.
  """
  with warnings.catch_warnings():
    # A damaged file either decodes or is skipped and counted; PIL's
    # warnings about it would only repeat that, once per file.
    warnings.simplefilter('ignore', UserWarning)
    # PIL only warns between its own limit and twice that; refuse those too.
    warnings.simplefilter('error', Image.DecompressionBombWarning)
    with Image.open(path) as image:
      if image.width * image.height > MAX_PIXELS:
        raise ImageTooLarge(f'{image.width}x{image.height} pixels')
      # Camera photos are often stored sideways with an EXIF orientation tag.
      image = ImageOps.exif_transpose(image)
      image = image.convert('RGB')  # Decodes fully: truncation raises here.
  if image_size is not None and image.size != (image_size[1], image_size[0]):
    image = image.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
  return np.asarray(image, dtype=np.uint8)


def decode_or_none(path: str, image_size: tuple[int, int] | None) -> np.ndarray | None:
  """`decode_image`, or None for a file that is not a readable image.

  PIL raises many types for bad files (OSError, ValueError, SyntaxError,
  struct.error, DecompressionBombError...): all mean "skip it".
  """
  try:
    return decode_image(path, image_size)
  except Exception:  # pylint: disable=broad-except
    return None


class SsljImageFolder(base.ImageClassificationBuilder):
  """Images from a folder of class sub-folders (see the module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}

  def __init__(self, *, config: ImageFolderConfig, **kwargs):
    super().__init__(config=config, **kwargs)
    # Without image_size, the first image decoded fixes the size of all.
    self._native_shape = None

  def _image_shape(self):
    size = self.builder_config.image_size
    return (*size, 3) if size else (None, None, 3)

  def _class_names(self):
    return self.builder_config.class_names

  def _metadata(self):
    return tfds.core.MetadataDict(skipped={})

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are local.
    config = self.builder_config
    generators = {}
    for split, folder in SPLIT_FOLDERS.items():
      if split == 'unlabelled' and not os.path.isdir(os.path.join(config.root, folder)):
        continue
      files = list_split(config.root, split, config.class_names)
      if files or split != 'unlabelled':
        generators[split] = self._generate_examples(split, files)
    return generators

  def _generate_examples(self, split, files):
    config = self.builder_config
    skipped = []
    index = 0
    for path, label in files:
      image = decode_or_none(path, config.image_size)
      if image is None:
        skipped.append(os.path.relpath(path, config.root))
        continue
      self._check_same_shape(image, path)
      yield index, {'image': image, 'label': label}
      index += 1
    self.info.metadata['skipped'][split] = {
        'count': len(skipped), 'first': skipped[:NAMES_SHOWN]
    }
    if skipped:
      logging.warning(
          'image_folder: skipped %d unreadable or oversized files of %s: %s%s',
          len(skipped), split, ', '.join(skipped[:NAMES_SHOWN]),
          ', ...' if len(skipped) > NAMES_SHOWN else '',
      )
    if not index:
      raise UserError(
          f'no readable images in {config.root}/{SPLIT_FOLDERS[split]}: none of its '
          f'{len(skipped)} files is an image PIL can read within {MAX_PIXELS} pixels '
          f'({", ".join(skipped[:NAMES_SHOWN])}); add PNG or JPEG files there.'
      )

  def _check_same_shape(self, image, path):
    if self.builder_config.image_size is not None:
      return
    if self._native_shape is None:
      self._native_shape = (image.shape, path)
    elif image.shape != self._native_shape[0]:
      first_shape, first_path = self._native_shape
      raise UserError(
          f'images differ in size ({first_path} is {first_shape[1]}x'
          f'{first_shape[0]}, {path} is {image.shape[1]}x{image.shape[0]}): '
          'pass an image size (for example image_size=96) to resize them all.'
      )
