"""The network a method reports, taken out of its training state.

A training state holds whatever a method needs to train (a student and its
weight-averaged teacher, optimiser moments, ...); using a run needs only the
one network its `results.json` reports. Each gradient method names that
network with one small hook, `(state, config) -> (variables, num_heads)`,
registered in `HOOKS`: the variables (`params` and `batch_stats`) to apply
the run's model to, and how many heads that model has (Mean Teacher's dual
output has two; class logits are always head 0). Features, logits, probes
and exports all go through `ReportedNetwork`, so they agree by construction,
and the tests check each hook against the method's own `predict`.

A new gradient method adds its hook here (a few lines reading its state
fields).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from sslj import parallel
from sslj.data import augment
from sslj.errors import UserError
from sslj.methods import network


def _supervised(state, config):
  del config
  return {'params': state.params, 'batch_stats': state.batch_stats}, 1


def _mean_teacher(state, config):
  # The teacher is what Mean Teacher reports: the weight average with the
  # BatchNorm statistics of its own forward passes.
  heads = 2 if config.mean_teacher.logit_distance_cost > 0 else 1
  return {'params': state.teacher.average, 'batch_stats': state.teacher_batch_stats}, heads


def _fixmatch(state, config):
  # The EMA of the parameters and BatchNorm statistics.
  del config
  return dict(state.ema.average), 1


def _ssl_gan(state, config):
  # The Polyak average of the discriminator is the reported classifier.
  del config
  return {'params': state.discriminator_ema.average,
          'batch_stats': state.discriminator.batch_stats}, 1


def _feature_network(state, config):
  # Exemplar-CNN and DeepCluster: the trained network, whose head classifies
  # surrogate classes or clusters; only its features are used.
  del config
  return {'params': state.params, 'batch_stats': getattr(state, 'batch_stats', {})}, 1


# Methods whose network classifies something other than the dataset's classes
# (surrogate classes, clusters): their features can be probed, their logits
# mean nothing for the test classes, so they are not exported.
FEATURES_ONLY = ('deep_cluster', 'exemplar_cnn')

# method name -> hook(state, config) -> (variables of the reported network, num_heads)
HOOKS: dict[str, Callable[[Any, Any], tuple[dict, int]]] = {
    'supervised': _supervised,
    'fixmatch': _fixmatch,
    'pseudo_label': _supervised,
    'kmeans_pseudo_label': _supervised,
    'mean_teacher': _mean_teacher,
    'ssl_gan': _ssl_gan,
    'deep_cluster': _feature_network,
    'exemplar_cnn': _feature_network,
}


def supported() -> tuple[str, ...]:
  return tuple(sorted(HOOKS))


def check_supported(method: str) -> None:
  if method not in HOOKS:
    raise UserError(f"method '{method}' has no reported-network hook yet, so its runs cannot be "
                    f"evaluated, probed or exported; supported: {', '.join(supported())}.")


def class_logits(outputs):
  """Head 0 of a multi-head model (the classification head), else the logits."""
  return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


@dataclasses.dataclass(frozen=True)
class ReportedNetwork:
  """One network: module, variables and the preprocessing it was trained with.

  Attributes:
    model: the Flax module, rebuilt from the model config.
    variables: {'params', 'batch_stats'}.
    preprocess: uint8 images -> normalised inputs, as in evaluation.
    model_config: {'name', 'dtype', 'num_heads'} and optionally 'options'
      (further keywords of `sslj.models.build`) and 'front_end' ('sobel'):
      with num_classes, what rebuilds `model` and its input.
    num_classes: logits per head.
  """
  model: nn.Module
  variables: Any
  preprocess: network.Preprocess
  model_config: dict
  num_classes: int

  def logits(self, variables, images):
    """Class logits [B, num_classes] of uint8 images [B, H, W, C]; pure, jit it."""
    outputs = self.model.apply(variables, self.preprocess.eval(images), train=False)
    return class_logits(outputs)

  def features(self, variables, images):
    """Pooled float32 features [B, D] of uint8 images [B, H, W, C]; pure, jit it."""
    x = self.preprocess.eval(images)
    if self.model_config.get('front_end') == 'sobel':  # DeepCluster's optional front end
      from sslj.methods import deep_cluster  # pylint: disable=g-import-not-at-top
      x = deep_cluster.sobel(x)
    return self.model.apply(variables, x, train=False, return_features=True)


def build_network(model_config: dict, num_classes: int, variables, preprocess) -> ReportedNetwork:
  """A ReportedNetwork from a model config, as the run's config or an export gives it."""
  from sslj import models  # pylint: disable=g-import-not-at-top
  model = models.build(model_config['name'], num_classes=num_classes,
                       dtype=network.compute_dtype(model_config['dtype']),
                       num_heads=model_config['num_heads'],
                       **model_config.get('options', {}))
  return ReportedNetwork(model=model, variables=variables, preprocess=preprocess,
                         model_config=dict(model_config), num_classes=num_classes)


def reported_network(config, data, state) -> ReportedNetwork:
  """The reported network of a restored run's state."""
  check_supported(config.method)
  variables, num_heads = HOOKS[config.method](state, config)
  preprocess = network.Preprocess(augment.AugmentSpec.from_config(config.augment), data.mean,
                                  data.std)
  model_config = {'name': config.model.name, 'dtype': config.model.dtype, 'num_heads': num_heads}
  options = network.model_options(config)
  if options:
    model_config['options'] = options
  if config.method == 'deep_cluster' and config.deep_cluster.sobel:
    model_config['front_end'] = 'sobel'
  if config.method == 'exemplar_cnn':  # its fc layer spans the training patch
    from sslj.methods import exemplar_cnn  # pylint: disable=g-import-not-at-top
    model_config['options'] = {**options, 'input_size': exemplar_cnn.patch_size(config, data)}
  return build_network(model_config, data.num_classes, variables, preprocess)


def apply_in_batches(fn, args, images: np.ndarray, mesh, batch_size: int) -> np.ndarray:
  """`fn(*args, batch)` over `images` in padded, data-sharded batches, on the host.

  `fn` must be jitted with replicated outputs (see `replicated_outputs`) so
  every process can read the whole result.
  """
  sharding = parallel.batch_sharded(mesh)
  outs = []
  for start in range(0, len(images), batch_size):
    x = images[start:start + batch_size]
    n = len(x)
    if n < batch_size:  # One compiled shape: pad the last batch, drop the padding after.
      x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
    out = fn(*args, parallel.to_global(x, sharding))
    outs.append(np.asarray(jax.device_get(out))[:n])
  return np.concatenate(outs)


def replicated_outputs(fn, mesh):
  """`fn` jitted so that its output is replicated over `mesh`."""
  return jax.jit(fn, out_shardings=parallel.replicated(mesh))
