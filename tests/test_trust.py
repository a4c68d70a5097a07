"""Files from elsewhere: checkpoints never unpickle, images cannot blow up memory."""

import _pickle
import logging
import os
import pickle
import struct
import sys
import zlib

import jax
import numpy as np
from PIL import Image
import pytest

from conftest import tiny_config
from sslj import train
from sslj.data import sources
from sslj.data.builders import image_folder
from sslj.use import predict
from sslj.use import restore

# Every global a pickle loads, while the list is not empty. Audit hooks
# cannot be removed: the test installs this one once, then leaves it idle.
_UNPICKLED = []


def _audit(event, args):
  if _UNPICKLED and event == 'pickle.find_class':
    _UNPICKLED.append(args)


def _watch_unpickling():
  if not getattr(_audit, 'installed', False):
    sys.addaudithook(_audit)
    _audit.installed = True
  _UNPICKLED.append('watching')


def test_restoring_a_checkpoint_never_unpickles(data_dir, tmp_path, monkeypatch):
  config = tiny_config(**{'data.data_dir': data_dir, 'num_steps': 2, 'log_every': 2,
                          'eval_every': 0, 'checkpoint_every': 2})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)

  # The watch works: any pickle that names a class or function is seen.
  unpickle = _pickle.loads
  _watch_unpickling()
  unpickle(pickle.dumps(os.path.join))
  assert _UNPICKLED[1:] == [('posixpath', 'join')] or _UNPICKLED[1:] == [('ntpath', 'join')]
  del _UNPICKLED[1:]

  def refuse(*args, **kwargs):
    raise AssertionError('a checkpoint restore tried to unpickle')

  for module in (pickle, _pickle):
    for name in ('load', 'loads', 'Unpickler'):
      monkeypatch.setattr(module, name, refuse)
  try:
    run = restore.restore(workdir)  # What eval, probe, predict and export read.
  finally:
    unpickled = _UNPICKLED[1:]
    _UNPICKLED.clear()
  assert unpickled == []
  assert int(jax.device_get(run.state.step)) == 2
  leaves = jax.tree.leaves(run.state.params)
  assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


def png_bomb(width: int, height: int) -> bytes:
  """A valid 1-bit grey PNG of zeros: a few KiB that decode to width x height pixels."""
  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

  row = b'\0' * (1 + (width + 7) // 8)  # Filter byte, then the packed pixels.
  packer = zlib.compressobj(9)
  body = b''.join(packer.compress(row) for _ in range(height)) + packer.flush()
  header = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', body)
          + chunk(b'IEND', b''))


def _save_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def test_a_decompression_bomb_is_skipped_unread(tmp_path, caplog):
  # 8,200 x 8,200 = 67.2 million pixels: over sslj's limit (64 Mi), under
  # PIL's own (89.5 million), so only sslj's check stands in the way.
  side = 8200
  assert image_folder.MAX_PIXELS < side * side < Image.MAX_IMAGE_PIXELS
  root = tmp_path / 'pets'
  bomb = root / 'train' / 'cat' / 'bomb.png'
  rng = np.random.default_rng(0)
  for rel in ('train/cat/0.png', 'train/dog/0.png', 'val/cat/0.png', 'val/dog/0.png'):
    _save_png(str(root / rel), rng.integers(0, 256, (8, 8, 3), np.uint8))
  bomb.write_bytes(png_bomb(side, side))
  assert bomb.stat().st_size < 64 * 1024
  with Image.open(bomb) as image:
    assert image.size == (side, side)  # A real PNG of that size.

  with pytest.raises(image_folder.ImageTooLarge):
    image_folder.decode_image(str(bomb), (8, 8))
  with caplog.at_level(logging.WARNING):
    arrays = sources.load_arrays(f'image_folder:{root}', data_dir=str(tmp_path / 'tfds'))
  assert arrays.train_images.shape == (2, 8, 8, 3)
  skipped = [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]
  assert len(skipped) == 1 and 'skipped 1 ' in skipped[0] and 'bomb.png' in skipped[0]
  # Predicting on it skips it the same way.
  ok = str(root / 'val' / 'cat' / '0.png')
  names, images, unread = predict.read_images([('bomb.png', str(bomb)), ('ok.png', ok)],
                                              (8, 8, 3))
  assert (names, unread, images.shape) == (['ok.png'], ['bomb.png'], (1, 8, 8, 3))
