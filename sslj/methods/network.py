"""The classifier network every method trains: build, initialise, preprocess.

Kept apart from the methods so that they differ only in what they optimise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sslj import models
from sslj.data import augment
from sslj.errors import UserError

# Compute dtypes the models support (parameters stay float32).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise UserError(f"model.dtype='{name}' is unknown; use one of {sorted(DTYPES)}.")
  return DTYPES[name]


# Fields of `config.model` that build_model passes itself; every other one
# is a field of the model (models.fields), passed to its constructor.
_BUILD_FIELDS = ('name', 'dtype')
# The base config declares these two as 0, which has always meant "the
# model's own" (and runs recorded that way must keep their meaning); every
# other field means the model's own when left at None.
_ZERO_KEEPS_DEFAULT = ('dropout_rate', 'first_kernel_size')


def model_options(config) -> dict:
  """The model fields `config.model` sets, as keywords of `models.build`.

  Only the ones set are passed, so models without them keep working and a
  model that cannot take one says so in one line (`check_model_options`).
  """
  options = {}
  for key, value in config.model.items():
    if key in _BUILD_FIELDS or value is None:
      continue
    if key in _ZERO_KEEPS_DEFAULT and value == 0:
      continue
    options[key] = tuple(value) if isinstance(value, list) else value
  return options


def check_model_options(config) -> None:
  """Refuses a field `config.model` sets that its model does not have.

  Raises:
    UserError: one line naming the field, its value and the model's fields.
  """
  name = config.model.name
  if name not in models.NAMES:
    return  # 'none' (methods without a network); unknown names fail in models.build
  options = model_options(config)
  try:
    models.check_options(name, options)
  except UserError as e:
    bad = next(k for k in sorted(options) if k not in models.fields(name))
    raise UserError(f'--config.model.{bad}={options[bad]!r} is not allowed: {e}') from None


def build_model(config, num_classes: int, num_heads: int = 1):
  return models.build(config.model.name, num_classes=num_classes,
                      dtype=compute_dtype(config.model.dtype), num_heads=num_heads,
                      **model_options(config))


def init_variables(model, key, image_shape, spec: augment.AugmentSpec):
  """Initialises on one dummy example of the size the network will see."""
  h, w, c = image_shape
  if spec.out_size:
    h = w = spec.out_size
  x = jnp.zeros((1, h, w, c), jnp.float32)
  params_key, dropout_key = jax.random.split(key)
  return model.init({'params': params_key, 'dropout': dropout_key}, x, train=False)


class Preprocess:
  """uint8 images -> normalised float inputs, augmented in training.

  `train(images, key)` draws the configured augmentation per example and,
  with `spec.noise_std > 0`, adds Gaussian noise to the normalised input;
  `eval` only resizes (when configured) and normalises, as the model was
  trained.
  """

  def __init__(self, spec: augment.AugmentSpec, mean: np.ndarray, std: np.ndarray):
    self.spec = spec
    self.mean = jnp.asarray(mean, jnp.float32)
    self.std = jnp.asarray(std, jnp.float32)
    self._eval_spec = augment.AugmentSpec(out_size=spec.out_size)

  def train(self, images, key):
    x = augment.normalize(augment.augment_batch(images, key, self.spec), self.mean, self.std)
    return self.add_noise(x, key)

  def add_noise(self, x, key):
    """`x` plus Gaussian noise of std `spec.noise_std` (none when it is 0).

    The noise key is derived from, not split off, `key`: the augmentation
    draws made with `key` stay the same whether or not noise is on.
    """
    if self.spec.noise_std > 0:
      noise = jax.random.normal(jax.random.fold_in(key, 1), x.shape, x.dtype)
      x = x + self.spec.noise_std * noise
    return x

  def eval(self, images):
    # The eval spec draws nothing random, so any key gives the same output.
    x = augment.augment_batch(images, jax.random.key(0), self._eval_spec)
    return augment.normalize(x, self.mean, self.std)


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy in float32, whatever the compute dtype."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()
