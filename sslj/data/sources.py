"""Dataset names -> prepared tfds data -> uint8 numpy arrays.

`load_arrays` is the one entry point: it prepares a dataset the first time
(through our TensorFlow-free builders, or tfds's own catalogue builders for
`tfds:<name>`), then reads every split with `tfds.data_source`, which needs
no TensorFlow.

Dataset names:
  digits, fashion_mnist, stl10, cifar10   our builders (see sslj.data.builders)
  image_folder:<path>                     a folder of class sub-folders
  tfds:<catalog name>                     any tfds dataset with image/label
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from sslj.data import builders
from sslj.data.builders import fashion_mnist
from sslj.data.builders import image_folder
from sslj.errors import UserError

BUILDERS = {
    'digits': builders.SsljDigits,
    'fashion_mnist': builders.SsljFashionMnist,
    'stl10': builders.SsljStl10,
    'cifar10': builders.SsljCifar10,
}
# Manual directories used when the caller gives none.
DEFAULT_MANUAL_DIRS = {'fashion_mnist': fashion_mnist.DEFAULT_MANUAL_DIR}
VALID_NAMES = (*BUILDERS, 'image_folder:<path>', 'tfds:<catalog name>')
# Records per __getitems__ call: large enough to amortise the call, small
# enough that one chunk of decoded examples stays small.
READ_CHUNK = 2048
# Splits at least this long get progress lines while being read.
PROGRESS_MIN = 20_000
TEST_SPLITS = ('test', 'validation')
UNLABELED_SPLITS = ('unlabelled', 'unlabeled')


@dataclasses.dataclass(frozen=True)
class ArraySplits:
  """Every split of a dataset, in memory.

  Attributes:
    name: the dataset name as given to `load_arrays`.
    class_names: label i is class_names[i].
    train_images: uint8 [N, H, W, C].
    train_labels: int32 [N].
    test_images: uint8 [T, H, W, C].
    test_labels: int32 [T].
    unlabeled_images: uint8 [M, H, W, C], the extra unlabelled split (M may
      be 0).
    folds: the official labelled folds (STL-10) as sorted int arrays of
      indices into train, or None.
  """

  name: str
  class_names: tuple[str, ...]
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  unlabeled_images: np.ndarray
  folds: tuple[np.ndarray, ...] | None


def load_arrays(
    name: str,
    *,
    data_dir: str | None,
    manual_dir: str | None = None,
    fold: int | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> ArraySplits:
  """Prepares `name` if needed and reads all its splits into memory.

  Args:
    name: a dataset name (see the module docstring).
    data_dir: where prepared data live; None for tfds's default
      (~/tensorflow_datasets or $TFDS_DATA_DIR).
    manual_dir: where source files were put by hand (archives, IDX files);
      None for tfds's default (<data_dir>/downloads/manual), or for
      fashion_mnist Debian's /usr/share/datasets/fashion-mnist.
    fold: an official fold the caller will train on; checked here so a bad
      value fails before any work. The selection itself is
      `splits.semi_supervised(..., fold=)`.
    image_size: size (int or (height, width)) to resize every image to. An
      image folder is resized while preparing (each size prepares
      separately); other datasets are resized while reading. None keeps the
      stored size.

  Returns:
    The dataset's splits as uint8 images and int32 labels.

  Raises:
    UserError: unknown name, missing or corrupt data, a bad fold, images of
      different sizes without an image_size.
  """
  size = _as_size(image_size)
  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise UserError(
        f'manual_dir {manual_dir} is not a folder: create it and put the '
        "dataset's files there, or leave manual_dir unset."
    )
  builder = _prepared_builder(name, data_dir, manual_dir, size)
  if isinstance(builder, builders.SsljImageFolder):
    size = None  # Already resized while preparing.
  split_names = _split_names(builder)
  # Checked before reading, which takes a while for big datasets.
  folds = _folds(builder)
  if fold is not None:
    if folds is None:
      raise UserError(f'{name} has no official folds: leave fold unset.')
    if not 0 <= fold < len(folds):
      raise UserError(f'fold={fold} is out of range: {name} has folds 0..{len(folds) - 1}.')

  data_sources = builder.as_data_source()
  train_images, train_labels = _read_split(data_sources['train'], name, 'train', size)
  if not len(train_images):
    raise UserError(f'{name} has an empty train split: it cannot be trained on.')
  empty = np.zeros((0, *train_images.shape[1:]), np.uint8)
  test_images, test_labels = _read_split(data_sources[split_names['test']], name, 'test', size)
  test_images = test_images if len(test_images) else empty
  unlabeled = empty
  if split_names['unlabeled']:
    unlabeled, _ = _read_split(data_sources[split_names['unlabeled']], name, 'unlabeled', size)
    unlabeled = unlabeled if len(unlabeled) else empty
  if {test_images.shape[1:], unlabeled.shape[1:]} != {train_images.shape[1:]}:
    raise UserError(
        f'{name}: splits have different image sizes ({train_images.shape[1:]}, '
        f'{test_images.shape[1:]}, {unlabeled.shape[1:]}): pass an image size.'
    )
  return ArraySplits(
      name=name,
      class_names=tuple(builder.info.features['label'].names),
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      unlabeled_images=unlabeled,
      folds=folds,
  )


def _as_size(image_size) -> tuple[int, int] | None:
  if image_size is None:
    return None
  size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  if len(size) != 2 or min(size) < 1:
    raise UserError(f'image_size={image_size!r} must be a positive int or (height, width).')
  return tuple(int(s) for s in size)


def _prepared_builder(name: str, data_dir, manual_dir, size):
  """The tfds builder of dataset `name`, prepared.

  With several processes, process 0 prepares first and the others wait for
  it: hosts that share a file system then read what it wrote, instead of
  preparing into the same folder at once (tfds's final rename fails for all
  but one). Hosts with their own disks each find nothing and prepare.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return _prepare_builder(name, data_dir, manual_dir, size)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  first = jax.process_index() == 0
  builder = _prepare_builder(name, data_dir, manual_dir, size) if first else None
  multihost_utils.sync_global_devices(f'sslj: {name} prepared')
  return builder if first else _prepare_builder(name, data_dir, manual_dir, size)


def _prepare_builder(name: str, data_dir, manual_dir, size):
  if name.startswith('image_folder:'):
    path = name.partition(':')[2]
    if not path:
      raise UserError('image_folder: needs a path, e.g. image_folder:/data/my_images.')
    config = image_folder.make_config(path, size)
    return _prepare(lambda: builders.SsljImageFolder(config=config, data_dir=data_dir), name,
                    download_config=_own_download_config(manual_dir))
  if name.startswith('tfds:'):
    return _catalog_builder(name.partition(':')[2], data_dir, manual_dir)
  if name in BUILDERS:
    return _prepare(lambda: BUILDERS[name](data_dir=data_dir), name,
                    download_config=_own_download_config(
                        manual_dir or DEFAULT_MANUAL_DIRS.get(name)))
  raise UserError(f'unknown dataset {name!r}: use one of {", ".join(VALID_NAMES)}.')


@contextlib.contextmanager
def _preparation_lock(builder):
  """Holds an exclusive lock beside the dataset's folder while it is prepared.

  Two runs started at once on one machine would otherwise both prepare into
  the same folder, and tfds's final rename fails for the second. The lock is
  an advisory `flock` on `<the dataset's folder>.lock` (for digits,
  `~/tensorflow_datasets/sslj_digits.lock`); folders on remote file systems
  (`gs://...`) are not locked.
  """
  folder = os.path.dirname(os.fspath(builder.data_dir))
  if '://' in folder:
    yield
    return
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  with open(folder + '.lock', 'a') as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def _own_download_config(manual_dir: str | None):
  # Our builders exist only here: never look for them on GCS.
  return tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)


def _prepare(make_builder, name: str, **prepare_kwargs):
  """The builder `make_builder()` for `name`, prepared once; later calls find it prepared.

  `make_builder` is called again after the lock is taken: another process
  may have prepared the data while this one waited, and a builder made
  before that reads no splits. `prepare_kwargs` go to `download_and_prepare`.
  """
  builder = make_builder()
  if builder.is_prepared():
    return builder
  with _preparation_lock(builder):
    builder = make_builder()
    if not builder.is_prepared():
      logging.info('Preparing %s in %s (first use; later runs reuse it).', name, builder.data_dir)
      builder.download_and_prepare(**prepare_kwargs)
  return builder


def _catalog_builder(catalog_name: str, data_dir, manual_dir):
  """tfds's own builder for `catalog_name`, prepared as ArrayRecord."""
  try:
    builder = tfds.builder(catalog_name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise UserError(
        f'tfds has no dataset {catalog_name!r}: pick a name from '
        'https://www.tensorflow.org/datasets/catalog (e.g. tfds:cifar100).'
    ) from e
  features = builder.info.features
  if not {'image', 'label'} <= set(features.keys()) or not isinstance(
      features['label'], tfds.features.ClassLabel
  ):
    raise UserError(
        f'tfds:{catalog_name} has features {sorted(features.keys())}; sslj needs '
        'an image feature "image" and a ClassLabel feature "label".'
    )
  if builder.is_prepared():
    formats = {builder.info.file_format, *builder.info.alternative_file_formats}
    if tfds.core.FileFormat.ARRAY_RECORD not in formats:
      raise UserError(
          f'tfds:{catalog_name} is prepared in {builder.data_dir} as '
          f'{builder.info.file_format.value}, which tfds.data_source cannot read: '
          'delete that folder so it is prepared again as array_record.'
      )
    return builder
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise UserError(
        f'preparing tfds:{catalog_name} needs TensorFlow (only once, to '
        "prepare): pip install 'sslj[prepare]', or use a dataset sslj builds "
        f'itself ({", ".join(BUILDERS)}).'
    ) from e
  return _prepare(lambda: tfds.builder(catalog_name, data_dir=data_dir), f'tfds:{catalog_name}',
                  file_format='array_record',
                  download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def _split_names(builder) -> dict[str, str | None]:
  """Which stored split is the test split and which the unlabelled one."""
  stored = set(builder.info.splits.keys())
  test = next((s for s in TEST_SPLITS if s in stored), None)
  if 'train' not in stored or test is None:
    raise UserError(
        f'{builder.name} has splits {sorted(stored)}; sslj needs "train" and '
        '"test" (or "validation").'
    )
  unlabeled = next((s for s in UNLABELED_SPLITS if s in stored), None)
  return {'test': test, 'unlabeled': unlabeled}


def _folds(builder) -> tuple[np.ndarray, ...] | None:
  metadata = builder.info.metadata
  if not metadata or 'folds' not in metadata:
    return None
  return tuple(np.sort(np.asarray(f, dtype=np.int64)) for f in metadata['folds'])


def _resize(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
  if size is None or image.shape[:2] == size:
    return image
  mode = 'L' if image.shape[-1] == 1 else 'RGB'
  pil = Image.fromarray(image[..., 0] if mode == 'L' else image, mode)
  out = np.asarray(pil.resize((size[1], size[0]), Image.Resampling.BILINEAR))
  return out[..., None] if mode == 'L' else out


def _read_split(source, name: str, split: str, size) -> tuple[np.ndarray, np.ndarray]:
  """All examples of one split as (uint8 [N, H, W, C], int32 [N]) arrays.

  Reads `READ_CHUNK` records per `__getitems__` call (one batched read of the
  ArrayRecord file rather than one per record) into preallocated arrays.
  """
  n = len(source)
  images = labels = None
  next_report = n // 10
  for start in range(0, n, READ_CHUNK):
    stop = min(n, start + READ_CHUNK)
    examples = source.__getitems__(list(range(start, stop)))
    chunk = [_resize(e['image'], size) for e in examples]
    if images is None:
      # The first image fixes the shape; the arrays are filled in place.
      images = np.empty((n, *chunk[0].shape), np.uint8)
      labels = np.empty((n,), np.int32)
    shapes = {im.shape for im in chunk} - {images.shape[1:]}
    if shapes:
      raise UserError(
          f'{name}: {split} images have different sizes ({images.shape[1:]} '
          f'and {shapes.pop()}): pass an image size to resize them.'
      )
    images[start:stop] = np.stack(chunk)
    labels[start:stop] = [e['label'] for e in examples]
    if n >= PROGRESS_MIN and stop >= next_report:
      logging.info('Read %d/%d %s images of %s.', stop, n, split, name)
      next_report += n // 10
  if images is None:  # An empty split; the caller gives it the right shape.
    return np.zeros((0, 0, 0, 0), np.uint8), np.zeros((0,), np.int32)
  return images, labels
