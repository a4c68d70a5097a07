"""Exemplar-CNN: every seed patch of the unlabeled images is its own class.

N seed patches are picked once from N different unlabeled images (positions
drawn with probability proportional to the patch's mean squared gradient
magnitude, so that patches show objects or parts rather than flat sky). Each
step draws a batch of seed indices and, for each, a fresh random
transformation of that seed (rotation, scale, translation relative to the
patch, colour), rendered on the devices straight from the seed image into a
p x p patch: one affine resampling with `sslj.data.augment`, whose crop box
is set to the seed's window. No dataset of patches is ever materialised.
The network learns to tell the N surrogate classes apart (cross-entropy).

Evaluation is a linear probe (`finalize`, run by the training loop after
training): the network is applied convolutionally to whole images, every
layer's maps but the softmax's are max-pooled over the four quadrants, and
a linear SVM on the standardised features of the labeled images is scored
on the test split; the same features of a randomly initialised network are
the floor. `predict` has no logits for the test classes and returns none.

Where the seeds live: in the training state (`ExemplarState.seeds`, uint8,
replicated). The loop samples its batches uniformly from the whole labeled
or unlabeled pool and cannot be pointed at a fixed set of N images, while a
seed table bound into the jitted step as a constant would be compiled into
the program (about 5 s of compile time for 110 MB on a CPU). In the state it
is an ordinary argument of the compiled step. The prices: `init`, which the
loop compiles once, holds the table as a constant; every checkpoint carries
it (N x H x W x C bytes: 0.06 MB for 1,000 digits, 110 MB for 4,000 STL-10
images, which is why the STL-10 preset checkpoints rarely); and every device
holds a copy. A loop that let a method name its own sampling pool would
remove all three.

Departures from the paper: seeds keep their image's scale (the paper also
samples seeds at varying scales); the colour transformations are the
library's brightness, contrast, saturation and hue jitter rather than the
paper's PCA-based contrast and HSV power laws; translation is up to 0.1 of
the patch (0.2 in the paper); no validation-based learning-rate drops
(cosine schedule); the SVM's C is fixed by the config.

References:
  Dosovitskiy, Springenberg, Riedmiller & Brox, "Discriminative unsupervised
    feature learning with convolutional neural networks", NIPS 2014.
  Dosovitskiy, Fischer, Springenberg, Riedmiller & Brox, "Discriminative
    unsupervised feature learning with exemplar convolutional neural
    networks", TPAMI 2016.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sslj import models, parallel
from sslj.data import augment
from sslj.errors import UserError
from sslj.methods import base, frozen_features, kmeans_features, network
from sslj.ops import image_grid, optim

# Images per chunk of the host-side gradient-magnitude pass over the seeds.
_GRADIENT_CHUNK = 1024


class ExemplarState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  seeds: jax.Array         # uint8 [N, H, W, C], the seed images (see module docstring)
  seed_centers: jax.Array  # float32 [N, 2], seed patch centre - image centre (pixels)
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def select_seeds(images: np.ndarray, num_seeds: int, patch: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Picks N distinct images and one p x p window in each.

  Windows are drawn with probability proportional to their mean squared
  gradient magnitude (of the channel mean, forward differences); a patch
  the size of the image is the whole image.

  Returns:
    (image indices int64 [N], window top-left corners int64 [N, 2]).
  """
  n, h, w, _ = images.shape
  if not 1 <= num_seeds <= n:
    raise UserError(f'exemplar.num_seeds={num_seeds} must be between 1 and the '
                    f'{n} unlabeled images.')
  if not 1 <= patch <= min(h, w):
    raise UserError(f'exemplar.patch_size={patch} must be between 1 and the image size '
                    f'{min(h, w)}.')
  index = rng.choice(n, num_seeds, replace=False)
  corners = np.zeros((num_seeds, 2), np.int64)
  if (h, w) == (patch, patch):
    return index, corners
  uniforms = rng.random(num_seeds)
  for start in range(0, num_seeds, _GRADIENT_CHUNK):
    part = slice(start, start + _GRADIENT_CHUNK)
    g = images[index[part]].astype(np.float32).mean(axis=-1)
    energy = np.zeros_like(g)
    energy[:, :-1, :] += np.diff(g, axis=1) ** 2
    energy[:, :, :-1] += np.diff(g, axis=2) ** 2
    # Window sums of every p x p window from an integral image.
    s = np.pad(energy, ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
    sums = (s[:, patch:, patch:] - s[:, :-patch, patch:] - s[:, patch:, :-patch]
            + s[:, :-patch, :-patch])
    weights = np.maximum(sums.reshape(len(g), -1), 0) + 1e-6  # flat images: uniform
    cdf = np.cumsum(weights, axis=1)
    pick = (cdf < uniforms[part, None] * cdf[:, -1:]).sum(axis=1)
    corners[part] = np.stack(np.divmod(pick, w - patch + 1), axis=1)
  return index, corners


def seed_centers(corners: np.ndarray, patch: int, image_hw) -> np.ndarray:
  """Window centres as offsets from the image centre: `AugmentParams.crop_center`."""
  return (corners + (patch - 1) / 2 - (np.asarray(image_hw) - 1) / 2).astype(np.float32)


def surrogate_batch(seeds, centers, key, *, batch: int, spec: augment.AugmentSpec,
                    mesh=None):
  """Draws `batch` seeds and one random transformation of each.

  The spec's random draws (`augment.sample_batch_params`) are kept, and the
  crop box is replaced by the seed's p x p window (p = spec.out_size), so
  translation, rotation and scale act about the seed patch's centre and
  translation is relative to the patch.

  Returns:
    (float32 patches [B, p, p, C] in [0, 1], int32 surrogate labels [B],
    the AugmentParams used).
  """
  label_key, aug_key = jax.random.split(key)
  labels = jax.random.randint(label_key, (batch,), 0, seeds.shape[0])
  if mesh is not None:  # each device renders its own slice of the batch
    labels = jax.lax.with_sharding_constraint(labels, parallel.batch_sharded(mesh))
  images = seeds[labels]
  patch = spec.out_size
  params = augment.sample_batch_params(aug_key, spec, images.shape[1:3], batch)
  params = params._replace(crop_hw=jnp.full((batch, 2), patch, jnp.float32),
                           crop_center=centers[labels])
  # A spec that draws nothing: exactly images / 255.
  x = augment.augment_batch(images, aug_key, augment.AugmentSpec())
  # augment.py applies drawn parameters only inside `augment_batch`; its
  # per-example `_augment_one` is reused rather than copied (a public name
  # for it is proposed to the augment module's owner).
  one = augment._augment_one  # pylint: disable=protected-access
  render = functools.partial(one, spec=spec, out_hw=(patch, patch))
  return jax.vmap(render)(x, params), labels, params


def train_step(state: ExemplarState, batch: base.Batch, key, *, spec: augment.AugmentSpec,
               batch_size: int, mean, std, mesh):
  """One SGD step of cross-entropy over the N surrogate classes."""
  del batch  # the loop samples nothing for this method: the seeds are in the state
  sample_key, dropout_key = jax.random.split(key)
  x, labels, _ = surrogate_batch(state.seeds, state.seed_centers, sample_key,
                                 batch=batch_size, spec=spec, mesh=mesh)
  x = augment.normalize(x, mean, std)

  def loss_fn(params):
    logits = state.apply_fn({'params': params}, x, train=True, rngs={'dropout': dropout_key})
    return network.cross_entropy(logits, labels), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state)
  return state, {'loss': loss, 'train_top1': 100 * base.top_k_correct(logits, labels, 1).mean()}


def predict(state, images):
  """No logits for the test classes: the scores come from `finalize`."""
  del state, images
  return {}


def finalize(state: ExemplarState, data, *, init, seed: int, svm_c: float, batch_size: int,
             mesh, standardize: str = 'train') -> dict:
  """Linear SVMs on the trained and on a random network's features."""
  random_state = frozen_features.random_network(init, seed, mesh)

  @jax.jit
  def features_fn(variables, images):
    # Whole images, normalised as in training (a spec that draws nothing: / 255).
    x = augment.augment_batch(images, jax.random.key(0), augment.AugmentSpec())
    return state.apply_fn(variables, augment.normalize(x, data.mean, data.std), train=False,
                          return_features=True)

  svm = functools.partial(kmeans_features.linear_svm_scores, c=svm_c)
  return frozen_features.score_networks(
      features_fn, {'exemplar_svm': {'params': state.params},
                    'random_net_svm': {'params': random_state.params}},
      data, svm, batch_size=batch_size, mesh=mesh, standardize=standardize)


def patch_size(config, data) -> int:
  size = config.exemplar.patch_size
  return min(data.unlabeled_images.shape[1:3]) if size is None else size


def steps_per_epoch(config, data) -> int:
  """An epoch is one sample of every surrogate class on average."""
  return max(1, -(-config.exemplar.num_seeds // config.batch_size))


def build(config, data, steps: base.Steps) -> base.Method:
  """Exemplar-CNN as a `Method` for the training loop."""
  ex = config.exemplar
  if not config.model.name.startswith('exemplar_'):
    raise UserError(f"exemplar_cnn trains an Exemplar network: model must be 'exemplar_small' "
                    f"or 'exemplar_large', got '{config.model.name}'.")
  parallel.check_divisible(config.batch_size, 'batch_size')
  frozen_features.check_standardize(ex.standardize, 'exemplar.standardize')
  patch = patch_size(config, data)
  index, corners = select_seeds(data.unlabeled_images, ex.num_seeds, patch,
                                np.random.default_rng(config.seed))
  seeds = data.unlabeled_images[index]
  centers = seed_centers(corners, patch, seeds.shape[1:3])
  spec = dataclasses.replace(augment.AugmentSpec.from_config(config.augment), out_size=patch)
  model = models.build(config.model.name, num_classes=ex.num_seeds,
                       dtype=network.compute_dtype(config.model.dtype), input_size=patch,
                       dropout_rate=ex.dropout_rate)
  tx = optim.make_optimizer(config.optimizer, steps.total)
  mesh = parallel.make_mesh()
  dummy = jnp.zeros((1, patch, patch, seeds.shape[-1]), jnp.float32)

  def init(key):
    params_key, dropout_key = jax.random.split(key)
    params = model.init({'params': params_key, 'dropout': dropout_key}, dummy,
                        train=False)['params']
    return ExemplarState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                         seeds=jnp.asarray(seeds), seed_centers=jnp.asarray(centers),
                         apply_fn=model.apply, tx=tx)

  step = functools.partial(train_step, spec=spec, batch_size=config.batch_size,
                           mean=jnp.asarray(data.mean), std=jnp.asarray(data.std), mesh=mesh)
  return base.Method(
      init=init, train_step=step, predict=predict, reported_model='exemplar_svm',
      labeled_batch=0, unlabeled_batch=0,
      finalize=functools.partial(finalize, init=init, seed=config.seed, svm_c=ex.svm_c,
                                 batch_size=config.eval_batch_size, mesh=mesh,
                                 standardize=ex.standardize))


def reported(state: ExemplarState, config, data) -> base.Reported:
  """The trained network; its head classifies surrogate classes, so only its features
  are used, and its fully connected layer spans the training patch."""
  return base.Reported({'params': state.params, 'batch_stats': {}}, classifies=False,
                       model_options={'input_size': patch_size(config, data)})


PICTURE_SEEDS, PICTURE_TRANSFORMS, PICTURE_PX = 8, 11, 96


def pictures(state: ExemplarState | None, config, data, seed: int) -> dict:
  """The page's picture: seed patches and random transformations of each (its classes)."""
  patch = patch_size(config, data)
  if state is not None:
    seeds, centers = np.asarray(jax.device_get(state.seeds)), np.asarray(
        jax.device_get(state.seed_centers))
    source = 'the seeds stored in the checkpoint'
  else:  # drawn again exactly as `build` draws them
    index, corners = select_seeds(data.unlabeled_images, config.exemplar.num_seeds, patch,
                                  np.random.default_rng(config.seed))
    seeds = data.unlabeled_images[index]
    centers = seed_centers(corners, patch, seeds.shape[1:3])
    source = 'seeds drawn again as training draws them (no checkpoint yet)'
  spec = dataclasses.replace(augment.AugmentSpec.from_config(config.augment), out_size=patch)
  draw = jax.jit(functools.partial(surrogate_batch, batch=PICTURE_TRANSFORMS, spec=spec))
  rng = np.random.default_rng(seed)
  chosen = rng.choice(len(seeds), min(PICTURE_SEEDS, len(seeds)), replace=False)
  key = jax.random.key(seed)
  h, w = seeds.shape[1:3]
  rows = []
  for r, i in enumerate(chosen):
    top, left = np.round(centers[i] + (np.array([h, w]) - 1) / 2 - (patch - 1) / 2).astype(int)
    original = seeds[i, top:top + patch, left:left + patch].astype(np.float32) / 255
    patches = np.asarray(draw(seeds[i:i + 1], centers[i:i + 1], jax.random.fold_in(key, r))[0])
    rows.append(np.concatenate([original[None], patches]))
  cols = PICTURE_TRANSFORMS + 1
  grid = image_grid.tile(np.concatenate(rows), cols=cols,
                         zoom=image_grid.zoom_for((patch, patch), PICTURE_PX),
                         framed=tuple(range(0, len(rows) * cols, cols)))
  return {'surrogate classes': (
      grid, f'{len(chosen)} of the {len(seeds)} surrogate classes, one per row: the '
            f'{patch}x{patch} seed patch (framed in red) and {PICTURE_TRANSFORMS} of its random '
            f'transformations ({spec.describe()}), drawn with surrogate_batch as in training, '
            f'from {source}.')}


METHOD = base.register(base.Definition(
    name='exemplar_cnn', summary='randomly transformed seed patches as surrogate classes',
    steps_per_epoch=steps_per_epoch, build=build, reported=reported, pictures=pictures,
    fields_added={'exemplar.standardize': 'labeled'}))
