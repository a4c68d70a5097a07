"""The network a method reports, taken out of its training state.

A training state holds whatever a method needs to train (a student and its
weight-averaged teacher, optimiser moments, ...); using a run needs only the
one network its `results.json` reports. Each gradient method declares it in
its registration (`sslj.methods.base.Definition.reported`, by default the
state's own `params` and `batch_stats`): the variables to apply the run's
model to, how many heads that model has (class logits are always head 0),
whether its head classifies the dataset's classes, and any front end.
Features, logits, probes and exports all go through `ReportedNetwork`, so
they agree by construction; the contract test checks every method's logits
against its own `predict`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from sslj import methods, parallel
from sslj.data import augment
from sslj.errors import UserError
from sslj.methods import network
from sslj.ops import front_ends


def check_supported(method: str) -> None:
  """UserError unless runs of `method` have a reported network (pipelines have none)."""
  if methods.get(method).is_pipeline:
    supported = ', '.join(name for name, d in methods.registry().items() if not d.is_pipeline)
    raise UserError(f"method '{method}' is not trained by gradient steps and keeps no network, "
                    f'so its runs cannot be evaluated, probed or exported; methods that can: '
                    f'{supported}.')


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
      (further keywords of `sslj.models.build`) and 'front_end' (a name in
      `sslj.ops.front_ends.FRONT_ENDS`): with num_classes, what rebuilds
      `model` and its input.
    num_classes: logits per head.
    classifies: whether the head's logits are the dataset's classes (False:
      clusters or surrogate classes; only the features mean something).
  """
  model: nn.Module
  variables: dict
  preprocess: network.Preprocess
  model_config: dict
  num_classes: int
  classifies: bool = True

  def logits(self, variables, images):
    """Class logits [B, num_classes] of uint8 images [B, H, W, C]; pure, jit it."""
    outputs = self.model.apply(variables, self.inputs(images), train=False)
    return class_logits(outputs)

  def features(self, variables, images):
    """Pooled float32 features [B, D] of uint8 images [B, H, W, C]; pure, jit it."""
    return self.model.apply(variables, self.inputs(images), train=False, return_features=True)

  def inputs(self, images):
    """What the network reads: normalised images, through the front end if any."""
    x = self.preprocess.eval(images)
    front_end = self.model_config.get('front_end')
    return front_ends.FRONT_ENDS[front_end](x) if front_end else x


def build_network(model_config: dict, num_classes: int, variables, preprocess,
                  classifies: bool = True) -> ReportedNetwork:
  """A ReportedNetwork from a model config, as the run's config or an export gives it."""
  from sslj import models  # pylint: disable=g-import-not-at-top
  front_end = model_config.get('front_end')
  if front_end and front_end not in front_ends.FRONT_ENDS:
    raise UserError(f"front end '{front_end}' is unknown; known: "
                    f"{', '.join(front_ends.FRONT_ENDS)}.")
  model = models.build(model_config['name'], num_classes=num_classes,
                       dtype=network.compute_dtype(model_config['dtype']),
                       num_heads=model_config['num_heads'],
                       **model_config.get('options', {}))
  return ReportedNetwork(model=model, variables=variables, preprocess=preprocess,
                         model_config=dict(model_config), num_classes=num_classes,
                         classifies=classifies)


def reported_network(config, data, state) -> ReportedNetwork:
  """The reported network of a restored run's state (`Definition.reported`)."""
  check_supported(config.method)
  declared = methods.get(config.method).reported(state, config, data)
  preprocess = network.Preprocess(augment.AugmentSpec.from_config(config.augment), data.mean,
                                  data.std)
  model_config = {'name': config.model.name, 'dtype': config.model.dtype,
                  'num_heads': declared.num_heads}
  options = {**network.model_options(config), **declared.model_options}
  if options:
    model_config['options'] = options
  if declared.front_end:
    model_config['front_end'] = declared.front_end
  return build_network(model_config, data.num_classes, declared.variables, preprocess,
                       classifies=declared.classifies)


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
