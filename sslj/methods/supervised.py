"""Supervised baseline: the network trained on the labeled subset only.

The reports' baseline is a ResNet-152 trained with SGD for 90 epochs at batch
size 32 on the labeled images alone (30.45% top-1 / 55.20% top-5 on a
1,000-class 96x96 set with 64 labels per class). Every semi-supervised method
is compared with this model on the same labels.

References: He et al. 2016, "Deep residual learning for image recognition".
"""

from __future__ import annotations

import functools

import jax

from sslj.data import augment
from sslj.methods import base, network
from sslj.ops import optim


def train_step(state: base.TrainState, batch: base.Batch, key: jax.Array, *,
               preprocess: network.Preprocess):
  """One SGD step of cross-entropy on a batch of augmented labeled images."""
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
  accuracy = base.top_k_correct(logits, batch['labels'], 1).mean()
  return state, {'loss': loss, 'train_top1': 100 * accuracy}


def predict(state: base.TrainState, images, *, preprocess: network.Preprocess):
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          preprocess.eval(images), train=False)
  return {'model': logits}


def steps_per_epoch(config, data) -> int:
  """An epoch is one pass over the labeled images."""
  return max(1, -(-len(data.labeled_images) // config.batch_size))


def build(config, data, steps: base.Steps) -> base.Method:
  """The supervised baseline as a `Method` for the training loop."""
  tx = optim.make_optimizer(config.optimizer, steps.total)
  model = network.build_model(config, data.num_classes)
  spec = augment.AugmentSpec.from_config(config.augment)
  preprocess = network.Preprocess(spec, data.mean, data.std)

  def init(key):
    variables = network.init_variables(model, key, data.labeled_images.shape[1:], spec)
    return base.TrainState.create(apply_fn=model.apply, variables=variables, tx=tx)

  return base.Method(
      init=init,
      train_step=functools.partial(train_step, preprocess=preprocess),
      predict=functools.partial(predict, preprocess=preprocess),
      reported_model='model',
      labeled_batch=config.batch_size, unlabeled_batch=0)


METHOD = base.register(base.Definition(
    name='supervised', summary='cross-entropy on the labeled images only (the baseline)',
    steps_per_epoch=steps_per_epoch, build=build))
