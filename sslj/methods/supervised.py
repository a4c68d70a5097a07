"""Supervised baseline: the network trained on the labeled subset only.

The reports' baseline is a ResNet-152 trained with SGD for 90 epochs at batch
size 32 on the labeled images alone (30.45% top-1 / 55.20% top-5 on a
1,000-class 96x96 set with 64 labels per class). Every semi-supervised method
is compared with this model on the same labels.

`supervised.ema_decay` > 0 also keeps an exponential moving average of the
parameters and of the BatchNorm statistics, with FixMatch's warm-up
(`ema.parameter_ema`), and reports it (`ema`; `model` is the trained
network). This is the baseline USB runs (`semilearn/algorithms/
fullysupervised`, `config/classic_cv/fullysupervised/*.yaml`: the same
labeled batch, iterations and SGD as its semi-supervised recipes, `ema_m`
0.999, the EMA model evaluated), so a method that reports an average is
compared with a baseline that has one. The default, 0, trains and reports
the network alone: on Fashion-MNIST with 10 labels per class the average
ended level with it or lower (72.37 against 72.99 over seeds 0-2 at 3,000
steps of 8, 72.16 against 72.32 at 4,000 of 16; 74.54 against 74.36 at
30,000 of 8, seed 0, where it rides out the network's drops; docs/results.md).

References: He et al. 2016, "Deep residual learning for image recognition".
USB: Wang et al. 2022, "USB: a unified semi-supervised learning benchmark
for classification" (github.com/microsoft/Semi-supervised-learning).
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from sslj.data import augment
from sslj.methods import base, network
from sslj.ops import ema, optim


class AveragedTrainState(base.TrainState):
  """The network and a moving average of its variables (`supervised.ema_decay` > 0)."""
  ema: ema.EmaState  # ema.average = {'params', 'batch_stats'}


def train_step(state: base.TrainState, batch: base.Batch, key: jax.Array, *,
               preprocess: network.Preprocess, average: ema.ParameterEma | None = None):
  """One SGD step of cross-entropy on a batch of augmented labeled images.

  With `average` (an AveragedTrainState) the new variables are then folded
  into the moving average.
  """
  aug_key, dropout_key = jax.random.split(key)
  x = preprocess.train(batch['labeled_images'], aug_key)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_key})
    loss = network.cross_entropy(logits, batch['labels'])
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads, batch_stats)
  if average is not None:
    _, averaged = average.update({'params': state.params, 'batch_stats': state.batch_stats},
                                 state.ema)
    state = state.replace(ema=averaged)
  accuracy = base.top_k_correct(logits, batch['labels'], 1).mean()
  return state, {'loss': loss, 'train_top1': 100 * accuracy}


def predict(state: base.TrainState, images, *, preprocess: network.Preprocess):
  x = preprocess.eval(images)
  logits = {'model': state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                                    x, train=False)}
  if isinstance(state, AveragedTrainState):
    logits['ema'] = state.apply_fn(state.ema.average, x, train=False)
  return logits


def steps_per_epoch(config, data) -> int:
  """An epoch is one pass over the labeled images."""
  return max(1, -(-len(data.labeled_images) // config.batch_size))


def build(config, data, steps: base.Steps) -> base.Method:
  """The supervised baseline as a `Method` for the training loop."""
  tx = optim.make_optimizer(config.optimizer, steps.total)
  model = network.build_model(config, data.num_classes)
  spec = augment.AugmentSpec.from_config(config.augment)
  preprocess = network.Preprocess(spec, data.mean, data.std)
  decay = config.supervised.ema_decay
  average = ema.parameter_ema(decay) if decay > 0 else None

  def init(key):
    variables = network.init_variables(model, key, data.labeled_images.shape[1:], spec)
    state = base.TrainState.create(apply_fn=model.apply, variables=variables, tx=tx)
    if average is None:
      return state
    return AveragedTrainState(
        **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
        ema=average.init({'params': state.params, 'batch_stats': state.batch_stats}))

  return base.Method(
      init=init,
      train_step=functools.partial(train_step, preprocess=preprocess, average=average),
      predict=functools.partial(predict, preprocess=preprocess),
      reported_model='model' if average is None else 'ema',
      labeled_batch=config.batch_size, unlabeled_batch=0)


def reported(state, config, data) -> base.Reported:
  """The moving average when the run keeps one, else the trained network."""
  if isinstance(state, AveragedTrainState):
    return base.Reported(dict(state.ema.average))
  return base.trained_network(state, config, data)


METHOD = base.register(base.Definition(
    name='supervised', summary='cross-entropy on the labeled images only (the baseline)',
    steps_per_epoch=steps_per_epoch, build=build, reported=reported,
    fields_added={'supervised.ema_decay': 0.0}))
