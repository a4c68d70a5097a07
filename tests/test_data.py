"""Tests of sslj.data: our tfds builders, load_arrays and the label splits.

The archives and IDX files are written here, in the official binary formats,
from arrays the tests keep, so decoding is checked exactly against them.
"""

import gzip
import io
import logging
import os
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
from PIL import Image
import pytest
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

from sslj.data import sources
from sslj.data import splits
from sslj.data.builders import digits as digits_lib
from sslj.data.builders import image_folder as image_folder_lib
from sslj.data.builders import stl10 as stl10_lib
from sslj.errors import UserError

STL_CLASSES = stl10_lib.CLASS_NAMES
CIFAR_CLASSES = (
    'airplane', 'automobile', 'bird', 'cat', 'deer',
    'dog', 'frog', 'horse', 'ship', 'truck',
)


# ---------------------------------------------------------------- writers


def _add_member(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_stl10(path, n_train=20, n_test=10, n_unlabeled=7, seed=0):
  """A tiny stl10_binary.tar.gz in the official format; returns its arrays."""
  rng = np.random.default_rng(seed)
  arrays = {
      'train': rng.integers(0, 256, (n_train, 96, 96, 3), dtype=np.uint8),
      'test': rng.integers(0, 256, (n_test, 96, 96, 3), dtype=np.uint8),
      'unlabeled': rng.integers(0, 256, (n_unlabeled, 96, 96, 3), dtype=np.uint8),
      'train_labels': rng.permutation(np.arange(n_train) % 10),
      'test_labels': rng.permutation(np.arange(n_test) % 10),
  }
  # Ten folds of 0-based train indices: fold k holds one image of each class.
  by_class = [np.flatnonzero(arrays['train_labels'] == c) for c in range(10)]
  arrays['folds'] = [
      sorted(int(members[k % len(members)]) for members in by_class) for k in range(10)
  ]

  def records(images):
    # Per image: the red, green and blue 96x96 planes, each in column-major
    # (Fortran) order, as the STL-10 README describes.
    return b''.join(
        image[:, :, c].ravel(order='F').tobytes() for image in images for c in range(3)
    )

  members = {
      # Image files before label files: the reader must not rely on order.
      'unlabeled_X.bin': records(arrays['unlabeled']),
      'train_X.bin': records(arrays['train']),
      'test_X.bin': records(arrays['test']),
      'train_y.bin': (arrays['train_labels'] + 1).astype(np.uint8).tobytes(),
      'test_y.bin': (arrays['test_labels'] + 1).astype(np.uint8).tobytes(),
      'class_names.txt': ('\n'.join(STL_CLASSES) + '\n').encode(),
      'fold_indices.txt': ''.join(
          ' '.join(map(str, f)) + ' \n' for f in arrays['folds']
      ).encode(),
  }
  with tarfile.open(path, 'w:gz', compresslevel=1) as tar:
    for name, data in members.items():
      _add_member(tar, 'stl10_binary/' + name, data)
  return arrays


def write_cifar10(path, per_batch=4, n_test=5, seed=1):
  """A tiny cifar-10-binary.tar.gz in the official format; returns its arrays."""
  rng = np.random.default_rng(seed)
  n_train = 5 * per_batch
  arrays = {
      'train': rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
      'train_labels': rng.integers(0, 10, n_train),
      'test': rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
      'test_labels': rng.integers(0, 10, n_test),
  }

  def records(images, labels):
    # Per image: one label byte, then the red, green and blue 32x32 planes,
    # each row by row.
    return b''.join(
        bytes([label]) + b''.join(image[:, :, c].ravel(order='C').tobytes() for c in range(3))
        for image, label in zip(images, labels)
    )

  with tarfile.open(path, 'w:gz', compresslevel=1) as tar:
    _add_member(tar, 'cifar-10-batches-bin/batches.meta.txt',
                ('\n'.join(CIFAR_CLASSES) + '\n\n').encode())
    # Batches out of order in the archive: the reader must sort them.
    for b in (3, 1, 5, 2, 4):
      part = slice((b - 1) * per_batch, b * per_batch)
      _add_member(tar, f'cifar-10-batches-bin/data_batch_{b}.bin',
                  records(arrays['train'][part], arrays['train_labels'][part]))
    _add_member(tar, 'cifar-10-batches-bin/test_batch.bin',
                records(arrays['test'], arrays['test_labels']))
  return arrays


def write_idx_gz(path, array, magic_type=0x08):
  """An IDX file: magic (0, 0, type, ndim), big-endian dims, then the bytes."""
  header = bytes([0, 0, magic_type, array.ndim])
  header += b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder, n_train=12, n_test=6, seed=2):
  rng = np.random.default_rng(seed)
  arrays = {}
  for prefix, n in (('train', n_train), ('t10k', n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    write_idx_gz(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'), images)
    write_idx_gz(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'), labels)
    arrays[prefix] = (images, labels)
  return arrays


# ---------------------------------------------------------------- digits


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  return sources.load_arrays('digits', data_dir=str(tmp_path_factory.mktemp('tfds')))


def test_digits_prepares_and_reads_the_real_images(digits):
  raw = sk_datasets.load_digits()
  expected = np.round(raw.images * 255 / 16).astype(np.uint8)[..., None]
  assert digits.class_names == tuple('0123456789')
  assert digits.train_images.shape == (1347, 8, 8, 1)
  assert digits.test_images.shape == (450, 8, 8, 1)
  assert digits.train_images.dtype == np.uint8 and digits.train_labels.dtype == np.int32
  assert digits.unlabeled_images.shape == (0, 8, 8, 1) and digits.folds is None
  # The fixed split, in original order, computed here independently.
  rng = np.random.default_rng(digits_lib.SPLIT_SEED)
  is_test = np.zeros(len(raw.target), bool)
  for c in range(10):
    members = np.flatnonzero(raw.target == c)
    is_test[rng.permutation(members)[: round(0.25 * len(members))]] = True
  np.testing.assert_array_equal(digits.test_images, expected[is_test])
  np.testing.assert_array_equal(digits.test_labels, raw.target[is_test])
  np.testing.assert_array_equal(digits.train_images, expected[~is_test])
  np.testing.assert_array_equal(digits.train_labels, raw.target[~is_test])
  # Stratified: every class has a quarter of its images in test.
  for c in range(10):
    n = np.count_nonzero(raw.target == c)
    assert np.count_nonzero(digits.test_labels == c) == round(0.25 * n)


def test_digits_split_is_fixed():
  labels = sk_datasets.load_digits().target
  a = digits_lib.test_split_mask(labels, 0.25, digits_lib.SPLIT_SEED)
  b = digits_lib.test_split_mask(labels, 0.25, digits_lib.SPLIT_SEED)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, digits_lib.test_split_mask(labels, 0.25, 1))


def test_digits_second_load_reuses_prepared_data(tmp_path):
  sources.load_arrays('digits', data_dir=str(tmp_path))
  info = tmp_path / 'sslj_digits' / '1.0.0' / 'dataset_info.json'
  stamp = info.stat().st_mtime_ns
  again = sources.load_arrays('digits', data_dir=str(tmp_path))
  assert info.stat().st_mtime_ns == stamp and len(again.train_images) == 1347


# ---------------------------------------------------------------- fashion_mnist


def test_a_run_waits_while_another_prepares_the_same_data(tmp_path):
  """Two runs started at once on a fresh data_dir: the second waits for the
  first's preparation and reads it, instead of preparing into the same folder
  (tfds's final rename fails for the second)."""
  child = subprocess.Popen(
      [sys.executable, '-c', 'import sys; from sslj.data import sources; print("imported", '
       'flush=True); a = sources.load_arrays("digits", data_dir=sys.argv[1]); '
       'print(len(a.train_images))', str(tmp_path)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  builder = sources.BUILDERS['digits'](data_dir=str(tmp_path))
  with sources._preparation_lock(builder):
    assert child.stdout.readline().strip() == 'imported'
    time.sleep(1.0)  # the child finds nothing prepared and waits on the lock
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  out, err = child.communicate(timeout=120)
  assert child.returncode == 0, err[-2000:]
  assert out.strip() == '1347' and 'Preparing' not in err


def test_fashion_mnist_decodes_idx_files(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  written = write_fashion_mnist(str(manual))
  arrays = sources.load_arrays(
      'fashion_mnist', data_dir=str(tmp_path / 'tfds'), manual_dir=str(manual)
  )
  assert arrays.class_names[0] == 'T-shirt/top' and arrays.class_names[9] == 'Ankle boot'
  np.testing.assert_array_equal(arrays.train_images, written['train'][0][..., None])
  np.testing.assert_array_equal(arrays.train_labels, written['train'][1])
  np.testing.assert_array_equal(arrays.test_images, written['t10k'][0][..., None])
  np.testing.assert_array_equal(arrays.test_labels, written['t10k'][1])


@pytest.mark.parametrize('damage', ['labels_as_images', 'truncated', 'not_gzip'])
def test_fashion_mnist_corrupt_idx_is_a_user_error(tmp_path, damage):
  manual = tmp_path / 'manual'
  manual.mkdir()
  write_fashion_mnist(str(manual))
  bad = manual / 'train-images-idx3-ubyte.gz'
  if damage == 'labels_as_images':
    write_idx_gz(str(bad), np.zeros(12, np.uint8))
  elif damage == 'truncated':
    write_idx_gz(str(bad), np.zeros((12, 28, 28), np.uint8))
    data = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(data[:-100]))
  else:
    bad.write_bytes(b'plain bytes, not gzip')
  with pytest.raises(UserError, match='train-images-idx3-ubyte.gz'):
    sources.load_arrays('fashion_mnist', data_dir=str(tmp_path / 'tfds'), manual_dir=str(manual))


# ---------------------------------------------------------------- STL-10


@pytest.fixture(scope='module')
def stl10(tmp_path_factory):
  manual = tmp_path_factory.mktemp('stl_manual')
  written = write_stl10(str(manual / 'stl10_binary.tar.gz'))
  # Chunks of 3 records: several chunks per split and a partial last one.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(stl10_lib, 'CHUNK_RECORDS', 3)
    data_dir = str(tmp_path_factory.mktemp('tfds'))
    arrays = sources.load_arrays('stl10', data_dir=data_dir, manual_dir=str(manual))
  return written, arrays, data_dir


def test_stl10_round_trips_images_labels_and_folds(stl10):
  written, arrays, data_dir = stl10
  assert arrays.class_names == STL_CLASSES
  np.testing.assert_array_equal(arrays.train_images, written['train'])
  np.testing.assert_array_equal(arrays.train_labels, written['train_labels'])
  np.testing.assert_array_equal(arrays.test_images, written['test'])
  np.testing.assert_array_equal(arrays.test_labels, written['test_labels'])
  np.testing.assert_array_equal(arrays.unlabeled_images, written['unlabeled'])
  # The folds come back from the prepared data's metadata, not from memory.
  reread = sources.load_arrays('stl10', data_dir=data_dir, fold=9)
  for folds in (arrays.folds, reread.folds):
    assert len(folds) == 10
    for fold, expected in zip(folds, written['folds']):
      np.testing.assert_array_equal(fold, expected)
  with pytest.raises(UserError, match='folds 0..9'):
    sources.load_arrays('stl10', data_dir=data_dir, fold=10)


def test_stl10_fold_selects_the_labeled_set(stl10):
  written, arrays, _ = stl10
  data = splits.semi_supervised(arrays, None, seed=0, fold=4)
  np.testing.assert_array_equal(data.labeled_indices, written['folds'][4])
  np.testing.assert_array_equal(data.labeled_images, written['train'][written['folds'][4]])
  # The rest of train (10 images), then the 7 extra unlabelled ones.
  rest = np.setdiff1d(np.arange(20), written['folds'][4])
  np.testing.assert_array_equal(
      data.unlabeled_images, np.concatenate([written['train'][rest], written['unlabeled']])
  )
  # The extra split's classes are unknown: -1.
  np.testing.assert_array_equal(data.unlabeled_labels,
                                np.concatenate([written['train_labels'][rest], [-1] * 7]))
  # The fold has one image per class: labels_per_class=1 is the whole fold,
  # 2 is more than it has.
  one = splits.semi_supervised(arrays, 1, seed=3, fold=4)
  np.testing.assert_array_equal(one.labeled_indices, written['folds'][4])
  with pytest.raises(UserError, match=r'\(1 labelled'):
    splits.semi_supervised(arrays, 2, seed=0, fold=4)
  with pytest.raises(UserError, match='folds 0..9'):
    splits.semi_supervised(arrays, None, seed=0, fold=10)


def test_stl10_corrupt_archive_is_a_user_error(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  archive = manual / 'stl10_binary.tar.gz'
  write_stl10(str(archive))
  data = archive.read_bytes()
  archive.write_bytes(data[: len(data) // 2])
  with pytest.raises(UserError, match='download it again'):
    sources.load_arrays('stl10', data_dir=str(tmp_path / 'tfds'), manual_dir=str(manual))


# ---------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize('form', ['archive', 'extracted'])
def test_cifar10_round_trips_images_and_labels(tmp_path, form):
  manual = tmp_path / 'manual'
  manual.mkdir()
  written = write_cifar10(str(manual / 'cifar-10-binary.tar.gz'))
  if form == 'extracted':  # A user may have unpacked the archive already.
    with tarfile.open(manual / 'cifar-10-binary.tar.gz') as tar:
      tar.extractall(manual, filter='data')
    (manual / 'cifar-10-binary.tar.gz').unlink()
  arrays = sources.load_arrays('cifar10', data_dir=str(tmp_path / 'tfds'), manual_dir=str(manual))
  assert arrays.class_names == CIFAR_CLASSES
  np.testing.assert_array_equal(arrays.train_images, written['train'])
  np.testing.assert_array_equal(arrays.train_labels, written['train_labels'])
  np.testing.assert_array_equal(arrays.test_images, written['test'])
  np.testing.assert_array_equal(arrays.test_labels, written['test_labels'])
  assert arrays.unlabeled_images.shape == (0, 32, 32, 3) and arrays.folds is None


# ---------------------------------------------------------------- image_folder


def _save_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def write_image_folder(root, size=(10, 12), seed=3):
  """PNGs in train/{cat,dog}, val/{cat,dog} and unlabeled/, plus junk files."""
  rng = np.random.default_rng(seed)
  written = {'train': [], 'test': [], 'unlabelled': []}
  for split, folder, count in (('train', 'train', 3), ('test', 'val', 2)):
    for label, name in enumerate(('cat', 'dog')):
      for i in range(count):
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        _save_png(os.path.join(root, folder, name, f'{i}.png'), image)
        written[split].append((image, label))
  for i, sub in enumerate(('', 'nested/')):
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    _save_png(os.path.join(root, 'unlabeled', f'{sub}{i}.png'), image)
    written['unlabelled'].append((image, -1))
  # A truncated PNG and a text file, both in train/: skipped, not fatal.
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, 'PNG')
  with open(os.path.join(root, 'train', 'cat', 'broken.png'), 'wb') as f:
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
  with open(os.path.join(root, 'train', 'dog', 'notes.txt'), 'w') as f:
    f.write('not an image')
  return written


def test_image_folder_reads_images_and_skips_bad_files(tmp_path, caplog):
  root = tmp_path / 'pets'
  written = write_image_folder(str(root))
  with caplog.at_level(logging.WARNING):
    arrays = sources.load_arrays(f'image_folder:{root}', data_dir=str(tmp_path / 'tfds'))
  assert arrays.class_names == ('cat', 'dog')
  # Files are read in sorted order: cat/0..2 then dog/0..2.
  np.testing.assert_array_equal(arrays.train_images, np.stack([w[0] for w in written['train']]))
  np.testing.assert_array_equal(arrays.train_labels, [w[1] for w in written['train']])
  np.testing.assert_array_equal(arrays.test_images, np.stack([w[0] for w in written['test']]))
  np.testing.assert_array_equal(
      arrays.unlabeled_images, np.stack([w[0] for w in written['unlabelled']]))
  skipped = [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]
  assert len(skipped) == 1
  assert 'skipped 2 ' in skipped[0] and 'broken.png' in skipped[0] and 'notes.txt' in skipped[0]


def test_image_folder_resizes_to_image_size(tmp_path):
  root = tmp_path / 'pets'
  written = write_image_folder(str(root))
  arrays = sources.load_arrays(
      f'image_folder:{root}', data_dir=str(tmp_path / 'tfds'), image_size=6)
  assert arrays.train_images.shape == (6, 6, 6, 3)
  expected = np.asarray(
      Image.fromarray(written['test'][0][0]).resize((6, 6), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(arrays.test_images[0], expected)


def test_image_folder_mixed_sizes_need_image_size(tmp_path):
  root = tmp_path / 'pets'
  write_image_folder(str(root))
  _save_png(str(root / 'val' / 'dog' / 'big.png'), np.zeros((20, 20, 3), np.uint8))
  with pytest.raises(UserError, match='image size'):
    sources.load_arrays(f'image_folder:{root}', data_dir=str(tmp_path / 'tfds'))


def test_image_folder_refuses_oversized_images(tmp_path, monkeypatch):
  root = tmp_path / 'pets'
  write_image_folder(str(root))
  _save_png(str(root / 'train' / 'cat' / 'huge.png'), np.zeros((10, 12, 3), np.uint8))
  monkeypatch.setattr(image_folder_lib, 'MAX_PIXELS', 119)  # 10x12 = 120.
  with pytest.raises(UserError, match='no readable images'):
    sources.load_arrays(f'image_folder:{root}', data_dir=str(tmp_path / 'tfds'))


@pytest.mark.parametrize('layout', ['missing', 'no_classes', 'no_val'])
def test_image_folder_bad_layout_is_a_user_error(tmp_path, layout):
  root = tmp_path / 'pets'
  if layout != 'missing':
    (root / 'train').mkdir(parents=True)
    (root / 'val').mkdir()
  if layout == 'no_val':
    _save_png(str(root / 'train' / 'cat' / 'a.png'), np.zeros((4, 4, 3), np.uint8))
    (root / 'val').rmdir()
  with pytest.raises(UserError):
    sources.load_arrays(f'image_folder:{root}', data_dir=str(tmp_path / 'tfds'))


# ---------------------------------------------------------------- names, tfds:


def test_unknown_dataset_lists_valid_names(tmp_path):
  with pytest.raises(UserError, match='digits, fashion_mnist, stl10, cifar10, image_folder'):
    sources.load_arrays('mnits', data_dir=str(tmp_path))


def test_tfds_catalog_needs_tensorflow_to_prepare(tmp_path):
  with pytest.raises(UserError, match=r"pip install 'sslj\[prepare\]'"):
    sources.load_arrays('tfds:mnist', data_dir=str(tmp_path))
  with pytest.raises(UserError, match='no dataset'):
    sources.load_arrays('tfds:no_such_dataset_here', data_dir=str(tmp_path))


class SsljTestPngImages(tfds.core.GeneratorBasedBuilder):
  """Stands for a tfds catalogue dataset: PNG-encoded `Image` features."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(5, 4, 3)),
            'label': tfds.features.ClassLabel(names=['a', 'b']),
        }),
        disable_shuffling=True,  # To compare in order.
    )

  def _split_generators(self, dl_manager):
    rng = np.random.default_rng(4)
    self.written = {
        s: rng.integers(0, 256, (3, 5, 4, 3), dtype=np.uint8) for s in ('train', 'test')}
    return {s: self._generate_examples(s) for s in self.written}

  def _generate_examples(self, split):
    for i, image in enumerate(self.written[split]):
      buffer = io.BytesIO()
      Image.fromarray(image).save(buffer, 'PNG')  # Bytes: tfds needs no TF.
      yield i, {'image': buffer.getvalue(), 'label': i % 2}


def test_tfds_catalog_image_features_read_without_tensorflow(tmp_path):
  builder = SsljTestPngImages(data_dir=str(tmp_path))
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
  )
  arrays = sources.load_arrays('tfds:sslj_test_png_images', data_dir=str(tmp_path))
  np.testing.assert_array_equal(arrays.train_images, builder.written['train'])
  np.testing.assert_array_equal(arrays.test_images, builder.written['test'])
  np.testing.assert_array_equal(arrays.train_labels, [0, 1, 0])


def test_preparing_and_reading_never_import_tensorflow(tmp_path):
  """Runs with a stand-in `tensorflow` package that records any import."""
  fake = tmp_path / 'fake' / 'tensorflow'
  fake.mkdir(parents=True)
  marker = tmp_path / 'imported'
  (fake / '__init__.py').write_text(
      f'open({str(marker)!r}, "w").write("imported")\n'
      'raise ImportError("tensorflow must not be imported")\n'
  )
  manual = tmp_path / 'manual'
  manual.mkdir()
  write_stl10(str(manual / 'stl10_binary.tar.gz'), n_train=10, n_test=3, n_unlabeled=2)
  script = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(tmp_path / 'fake')!r})
      from sslj.data import sources
      for name in ('digits', 'stl10', 'digits'):
        sources.load_arrays(name, data_dir={str(tmp_path / 'tfds')!r}, manual_dir={str(manual)!r})
      assert 'tensorflow' not in sys.modules
  """)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert not marker.exists()


# ---------------------------------------------------------------- splits


def test_labeled_subset_is_stratified_exact_and_seeded():
  labels = np.repeat(np.arange(4), [5, 7, 9, 6])
  subset = splits.labeled_subset(labels, 3, seed=0)
  assert len(subset) == 12 and np.all(np.diff(subset) > 0)
  np.testing.assert_array_equal(np.bincount(labels[subset]), [3, 3, 3, 3])
  np.testing.assert_array_equal(subset, splits.labeled_subset(labels, 3, seed=0))
  assert not np.array_equal(subset, splits.labeled_subset(labels, 3, seed=1))
  np.testing.assert_array_equal(splits.labeled_subset(labels, None, seed=0), np.arange(27))
  all_of_smallest = splits.labeled_subset(labels, 5, seed=2)
  np.testing.assert_array_equal(np.bincount(labels[all_of_smallest]), [5] * 4)


@pytest.mark.parametrize(
    'count, message', [(0, '>= 1'), (-2, '>= 1'), (1.5, '>= 1'), (6, r'class 0 has \(5')])
def test_labeled_subset_impossible_counts_are_user_errors(count, message):
  labels = np.repeat(np.arange(4), [5, 7, 9, 6])
  with pytest.raises(UserError, match=message):
    splits.labeled_subset(labels, count, seed=0)


def test_labeled_subset_requires_every_class_when_told_how_many():
  with pytest.raises(UserError, match=r'class 2 has \(0'):
    splits.labeled_subset(np.array([0, 0, 1, 1]), 1, seed=0, num_classes=3)


def test_semi_supervised_pool_and_statistics(digits):
  data = splits.semi_supervised(digits, 4, seed=5)
  assert data.num_classes == 10 and data.class_names == digits.class_names
  np.testing.assert_array_equal(np.bincount(data.labeled_labels), [4] * 10)
  rest = np.setdiff1d(np.arange(1347), data.labeled_indices)
  np.testing.assert_array_equal(data.unlabeled_images, digits.train_images[rest])
  # Their hidden classes, for scoring pseudo-labels in the logs only.
  np.testing.assert_array_equal(data.unlabeled_labels, digits.train_labels[rest])
  assert data.unlabeled_labels.dtype == np.int32
  np.testing.assert_array_equal(data.labeled_images, digits.train_images[data.labeled_indices])
  everything = digits.train_images.astype(np.float64) / 255
  np.testing.assert_allclose(data.mean, everything.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(data.std, everything.std(axis=(0, 1, 2)), rtol=1e-5)
  assert data.mean.dtype == np.float32 and data.std.dtype == np.float32
  alone = splits.semi_supervised(digits, 4, seed=5, unlabeled_from_train=False)
  assert alone.unlabeled_images.shape == (0, 8, 8, 1)
  labeled = data.labeled_images.astype(np.float64) / 255
  np.testing.assert_allclose(alone.mean, labeled.mean(axis=(0, 1, 2)), rtol=1e-6)
  with pytest.raises(UserError, match='no official folds'):
    splits.semi_supervised(digits, 4, seed=5, fold=0)
