"""The image-folder reader on random and damaged files: it decodes or skips, never crashes."""

import io
import logging
import os
import tempfile

from hypothesis import HealthCheck, event, given, settings, strategies as st
import numpy as np
from PIL import Image
import pytest

from sslj.data import sources
from sslj.data.builders import image_folder
from sslj.errors import UserError

# Bounded for CI: the fuzz tests together take under 10 s on a 2-core CPU.
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _encodings() -> list[bytes]:
  """Small valid files in the formats and modes people's folders hold."""
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 256, (6, 5, 3), np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 6  # Stored sideways: exif_transpose rotates it.
  cases = [('PNG', rgb, {}), ('PNG', rgb.convert('L'), {}), ('PNG', rgb.convert('P'), {}),
           ('PNG', rgb.convert('RGBA'), {}),
           ('PNG', Image.fromarray(rng.integers(0, 65535, (6, 5), np.uint16)), {}),
           ('JPEG', rgb, {'exif': exif.tobytes()}), ('JPEG', rgb, {'progressive': True}),
           ('JPEG', rgb.convert('L'), {}), ('GIF', rgb.convert('P'), {}), ('BMP', rgb, {}),
           ('TIFF', rgb, {}), ('WEBP', rgb, {})]
  encoded = []
  for fmt, image, kwargs in cases:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    encoded.append(buffer.getvalue())
  return encoded


ENCODINGS = _encodings()


def _truncated(draw):
  data = draw(st.sampled_from(ENCODINGS))
  return data[:draw(st.integers(0, len(data) - 1))]


def _mutated(draw):
  data = bytearray(draw(st.sampled_from(ENCODINGS)))
  for _ in range(draw(st.integers(1, 8))):
    data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
  return bytes(data)


@st.composite
def damaged_files(draw):
  """Random bytes, a valid image cut short, or one with a few bytes changed."""
  kind = draw(st.sampled_from(['random', 'truncated', 'mutated']))
  if kind == 'random':
    return draw(st.binary(max_size=2048))
  return _truncated(draw) if kind == 'truncated' else _mutated(draw)


def test_every_encoding_decodes_when_whole():
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'image')
    for data in ENCODINGS:
      with open(path, 'wb') as f:
        f.write(data)
      image = image_folder.decode_or_none(path, None)
      assert image is not None and image.dtype == np.uint8 and image.shape[2] == 3


@FUZZ
@given(data=damaged_files())
def test_decode_gives_an_image_or_none(data):
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'image')
    with open(path, 'wb') as f:
      f.write(data)
    resized = image_folder.decode_or_none(path, (7, 9))
    assert resized is None or (resized.dtype == np.uint8 and resized.shape == (7, 9, 3))
    native = image_folder.decode_or_none(path, None)
    assert native is None or (native.dtype == np.uint8 and native.ndim == 3
                              and native.shape[2] == 3
                              and native.shape[0] * native.shape[1] <= image_folder.MAX_PIXELS)


@settings(FUZZ, max_examples=20)
@given(files=st.lists(st.one_of(damaged_files(), st.sampled_from(ENCODINGS)), min_size=1,
                      max_size=3))
def test_a_folder_of_damaged_files_trains_on_what_reads_or_says_none_can(files):
  """The reader skips what it cannot read and counts it; if nothing is left, one UserError."""
  readable = 0
  with tempfile.TemporaryDirectory() as root:
    for i, data in enumerate(files):
      path = os.path.join(root, 'train', 'cat', f'{i}.png')
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'wb') as f:
        f.write(data)
      readable += image_folder.decode_or_none(path, (4, 4)) is not None
    event(f'{readable} of {len(files)} readable')
    os.makedirs(os.path.join(root, 'val', 'cat'))
    Image.new('RGB', (4, 4)).save(os.path.join(root, 'val', 'cat', 'ok.png'))

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger('absl')
    logger.addHandler(handler)
    try:
      if readable:
        arrays = sources.load_arrays(f'image_folder:{root}', data_dir=os.path.join(root, 'tfds'),
                                     image_size=4)
        assert arrays.train_images.shape == (readable, 4, 4, 3)
      else:
        with pytest.raises(UserError, match='no readable images'):
          sources.load_arrays(f'image_folder:{root}', data_dir=os.path.join(root, 'tfds'),
                              image_size=4)
    finally:
      logger.removeHandler(handler)
  skipped = [r.getMessage() for r in records if 'skipped' in r.getMessage()]
  if readable < len(files):
    assert len(skipped) == 1 and f'skipped {len(files) - readable} ' in skipped[0]
  else:
    assert skipped == []
