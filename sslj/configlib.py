"""Pieces every `configs/<method>.py` shares: the config string and the base config.

A config file's `get_config(arg)` takes the config string
(`configs/x.py:dataset=fashion_mnist,labels_per_class=10`), builds a locked
`ml_collections.ConfigDict`, and returns it. Values that follow from others
(steps from epochs, schedules, the labeled/unlabeled split of a batch) are
computed in code, so command-line overrides never leave them stale.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from sslj import models
from sslj.errors import UserError

# Config-string keys every config accepts, with their defaults.
COMMON_ARGS = {'dataset': 'digits', 'labels_per_class': 'all', 'model': 'small_cnn',
               'seed': '0'}

# The networks of the FixMatch/MixMatch benchmark tables, per dataset: the
# `dataset_models` of the configs whose presets follow that code.
WRN_BENCHMARK_MODELS = {'cifar10': 'wrn28_2', 'stl10': 'wrn37_2'}

# USB's SGD recipe for its classic CV algorithms on WRN-28-2 (config/classic_cv/
# <algorithm>/*_cifar10_*.yaml): Nesterov momentum 0.9 at lr 0.03, weight decay
# 5e-4 that skips BatchNorm parameters and biases, cos(7 pi k / 16 K).
USB_SGD = dict(learning_rate=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4,
               schedule='truncated_cosine', decay='kernels')


def gan_optimizer(dataset: str) -> dict:
  """The SSL-GAN's Adam, for both its networks, which the supervised baseline
  with its discriminator (configs/supervised.py, `model=dcgan_discriminator`)
  shares.

  improved-gan's MNIST script's constant 0.003 (beta1 0.5, no decay), ahead
  of 3e-4 with a cosine decay on digits and Fashion-MNIST
  (docs/methods/ssl_gan.md); on CIFAR-10 its CIFAR-10 script's 3e-4, decayed
  here by a cosine.
  """
  adam = dict(name='adam', learning_rate=0.003, b1=0.5, b2=0.999, weight_decay=0.0,
              schedule='constant')
  if dataset == 'cifar10':
    adam.update(learning_rate=3e-4, schedule='cosine')
  return adam


def fixmatch_budget(config: ml_collections.ConfigDict, args: ml_collections.ConfigDict, *,
                    large: bool) -> None:
  """Sets FixMatch's steps, batches, logging and SGD, which its successors share.

  `batch_size` is the labeled images per step (the paper's B; each step also
  draws mu * B unlabeled ones): 3,000 steps of 16 on digits, 3,000 of 8 on
  `fashion_mnist`, and with `large` (the benchmark datasets) the paper's 2^20
  of 64. The SGD is USB_SGD: the paper's cos(7 pi k / 16 K) is
  `truncated_cosine` (runs recorded before it had one name say
  `fixmatch_cosine`, which reads as it: `run_files.as_current`).
  """
  config.num_steps = 3000
  config.batch_size = 16
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  # The reference code's weight decay: kernels only, not BatchNorm or biases.
  config.optimizer.update(USB_SGD)
  if args.dataset == 'fashion_mnist':
    config.batch_size = 8
    config.eval_batch_size = 1000
    config.checkpoint_every = 1000
  if large:
    config.batch_size = 64
    config.num_steps = 1 << 20
    config.eval_batch_size = 1000
    config.log_every = 1000
    config.eval_every = 10000
    config.checkpoint_every = 10000


def parse_arg(arg: str | None, dataset_models: dict | None = None,
              **extra_defaults) -> ml_collections.ConfigDict:
  """Parses `key=value,key=value` into a ConfigDict of strings and ints.

  `labels_per_class=all` becomes None (every label). Unknown keys are an error
  that lists the known ones. `dataset_models` maps a dataset to the model its
  preset trains when the string names no `model` (e.g. {'cifar10': 'wrn28_2'}).
  """
  defaults = dict(COMMON_ARGS, **extra_defaults)
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep or key not in defaults:
      raise UserError(f"config string item '{item}' is not key=value with a key in "
                      f"{sorted(defaults)}; e.g. configs/x.py:dataset=fashion_mnist,labels_per_class=10.")
    values[key] = value.strip()
  named = {item.partition('=')[0].strip() for item in filter(None, (arg or '').split(','))}
  if 'model' not in named and values['dataset'] in (dataset_models or {}):
    values['model'] = dataset_models[values['dataset']]
  args = ml_collections.ConfigDict()
  for key, value in values.items():
    if key == 'labels_per_class':
      args[key] = None if value == 'all' else _to_int(key, value)
    elif key == 'seed':
      args[key] = _to_int(key, value)
    else:
      args[key] = value
  return args


def _to_int(key, value):
  try:
    return int(value)
  except ValueError:
    raise UserError(f"config string {key}='{value}' is not an integer.") from None


def augment_for(dataset: str) -> ml_collections.ConfigDict:
  """Default training augmentation for a dataset (fields of `AugmentSpec`).

  Digits are never flipped (a flipped 2 is not a 2); small images get a few
  pixels of pad-and-crop translation; natural images get flips and crops.
  """
  aug = ml_collections.ConfigDict(dict(
      flip=False, rotate_deg=0.0, translate=0.0, scale=(1.0, 1.0),
      crop_scale=config_dict.placeholder(tuple), crop_ratio=(3 / 4, 4 / 3),
      brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
      out_size=config_dict.placeholder(int), pad_crop=0, noise_std=0.0))
  if dataset == 'digits':
    aug.pad_crop = 1
  elif dataset == 'fashion_mnist':
    aug.flip = True
    aug.pad_crop = 2
  elif dataset in ('cifar10', 'stl10') or dataset.startswith(('image_folder', 'tfds:')):
    aug.flip = True
    aug.pad_crop = 4 if dataset == 'cifar10' else 12
  return aug


def base_config(method: str, args: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fields every method has; method configs add theirs and then lock."""
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = args.seed
  c.num_steps = 1000           # optimizer steps of the main phase
  c.num_epochs = 0.0           # if > 0, num_steps is derived from it in code
  c.batch_size = 64            # global batch, over all devices
  c.eval_batch_size = 500

  c.data = ml_collections.ConfigDict()
  c.data.name = args.dataset
  c.data.labels_per_class = config_dict.placeholder(int)
  c.data.labels_per_class = args.labels_per_class
  c.data.fold = config_dict.placeholder(int)      # STL-10's official folds 0-9
  c.data.data_dir = config_dict.placeholder(str)  # tfds data dir (default ~/tensorflow_datasets)
  c.data.manual_dir = config_dict.placeholder(str)
  c.data.image_size = config_dict.placeholder(int)  # image_folder only
  c.data.unlabeled_from_train = True

  c.model = ml_collections.ConfigDict()
  c.model.name = args.model
  c.model.dtype = 'float32'  # compute dtype; parameters stay float32
  # > 0 sets the dropout before the head of small_cnn / convlarge; 0 keeps the
  # model's own default (none for small_cnn, the paper's 0.5 for convlarge).
  c.model.dropout_rate = 0.0
  # > 0 sets the first convolution's kernel side of small_cnn (its default: 3).
  c.model.first_kernel_size = 0
  add_model_fields(c.model, args.model)

  c.augment = augment_for(args.dataset)

  # decay: the parameters weight decay reaches, 'all' or 'kernels' (sslj.ops.optim).
  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.05, momentum=0.9, nesterov=True,
      weight_decay=5e-4, decay='all', schedule='cosine', warmup_steps=0, b1=0.9, b2=0.999))

  c.log_every = 100
  c.eval_every = 500
  c.eval_at = ''  # more evaluation steps, e.g. '10,20,50,100': the early part of a curve
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  return c


# Placeholder types for the model fields a command line can set.
_FIELD_TYPES = (bool, int, float, str, tuple)


def add_model_fields(model_config: ml_collections.ConfigDict, name: str) -> None:
  """Declares model `name`'s fields (`models.fields`) in `model_config` as None.

  None keeps the model's own default; `--config.model.<field>=value` sets it
  and reaches the model's constructor. Fields of other types (none today)
  are left to the model's default.
  """
  for field, default in models.fields(name).items():
    if field in model_config:
      continue
    kind = tuple if isinstance(default, list) else type(default)
    if kind in _FIELD_TYPES:
      model_config[field] = config_dict.placeholder(kind)


def set_fields(config: ml_collections.ConfigDict, values: dict) -> None:
  """Sets dotted fields (`{'optimizer.learning_rate': 0.1}`) of an unlocked config."""
  for key, value in values.items():
    target = config
    *parents, leaf = key.split('.')
    for part in parents:
      target = target[part]
    target[leaf] = value
