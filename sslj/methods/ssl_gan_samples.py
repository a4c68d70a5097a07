"""The SSL-GAN's pictures: grids of its generator's images for fixed latents.

`SampleWriter` writes one grid per evaluation of a run
(`workdir/samples/step_XXXXXX.png`); `pictures` draws the same grid from a
checkpoint for `python -m sslj.viz`. Both use the generator's running
BatchNorm statistics and the run's own latent vectors (`fixed_latents`), so
the grids of one run are comparable across its evaluations.
"""

from __future__ import annotations

import functools
import os

from absl import logging
import jax
import numpy as np

from sslj import models
from sslj.methods import base, network
from sslj.ops import image_grid as grids

SAMPLE_ZOOM_PX = 56  # a sample tile's side in the saved grid is about this many pixels


def image_shape(config, data) -> tuple[int, int, int]:
  """(H, W, C) the discriminator sees, which the generator must produce."""
  h, w, c = data.labeled_images.shape[1:]
  size = config.augment.get('out_size')
  return (size, size, c) if size else (h, w, c)


def build_generator(config, data):
  cfg = config.ssl_gan
  return models.build_generator(cfg.generator, image_shape=image_shape(config, data),
                                dtype=network.compute_dtype(config.model.dtype),
                                base_width=cfg.generator_width, upsample=cfg.upsample)


def fixed_latents(config) -> np.ndarray:
  """The latent vectors of every sample grid of a run (the same at each eval)."""
  rng = np.random.RandomState(config.seed)
  return rng.randn(config.ssl_gan.num_samples, config.ssl_gan.latent_dim).astype(np.float32)


def _local(tree):
  """A replicated global array's copy on this process, as numpy (no collective)."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if hasattr(
      a, 'addressable_data') else np.asarray(a), tree)


def _apply(generator):
  """The generator's jitted forward pass with running BatchNorm statistics."""
  return jax.jit(functools.partial(generator.apply, train=False))


def _grid(images) -> np.ndarray:
  images = np.asarray(images)
  return grids.tile(images, cols=grids.square_cols(len(images)),
                    zoom=grids.zoom_for(images.shape[1:3], SAMPLE_ZOOM_PX))


def sample_grid(generator, variables, z: np.ndarray) -> np.ndarray:
  """uint8 RGB grid of the generator's images for latents z (running BN statistics)."""
  return _grid(_apply(generator)(variables, z))


def generator_variables(state):
  """The generator's variables of a `ssl_gan.GanState`, as numpy on this process."""
  return _local({'params': state.generator.params, 'batch_stats': state.generator.batch_stats})


def pictures(state, config, data, seed: int) -> dict:
  """The page's picture: the generator's samples for the run's fixed latents."""
  del seed  # the run's own latents, the same at every evaluation
  if state is None:
    raise base.NotApplicable('no checkpoint yet, so no trained generator')
  grid = sample_grid(build_generator(config, data), generator_variables(state),
                     fixed_latents(config))
  return {'samples': (grid, f'{config.ssl_gan.num_samples} generated images for fixed latent '
                            'vectors (the same at every evaluation of the run; BatchNorm with '
                            'running statistics).')}


class SampleWriter:
  """The run's `on_eval`: the generator's grid for the run's latents, one PNG per eval."""

  def __init__(self, generator, latents: np.ndarray):
    self.apply = _apply(generator)  # compiled once, at the first evaluation
    self.latents = latents

  def __call__(self, state, step: int, workdir: str) -> None:
    path = os.path.join(workdir, 'samples', f'step_{step:06d}.png')
    grids.save_png(path, _grid(self.apply(generator_variables(state), self.latents)))
    logging.info('generated samples: %s', path)
