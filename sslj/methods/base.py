"""What a method gives the training loop.

A gradient method is a `Method`: how to make its state, its pure train step,
and how its models predict. The loop (`sslj.train`) owns everything else:
sampling batches on the devices, keys, logging, checkpoints and evaluation.
Pipelines that are not gradient training (k-means features + SVM) implement
`run_pipeline(config, data, workdir) -> (scores, reported_model)` instead
and skip the loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

State = Any
Batch = dict  # 'labeled_images' uint8, 'labels' int32, 'unlabeled_images' uint8


@dataclasses.dataclass(frozen=True)
class Method:
  """A gradient-trained method, as the training loop sees it.

  Attributes:
    init: `key -> state`; the state is a pytree with an integer `step`.
    train_step: pure `(state, batch, key) -> (state, metrics)`; metrics is a
      dict of scalars and must contain 'loss'.
    predict: pure `(state, images uint8 [B,H,W,C]) -> {model name: logits}`.
    reported_model: the entry of `predict` that `results.json` reports.
    labeled_batch / unlabeled_batch: images of each kind the loop samples per step.
    steps_per_epoch: steps in one epoch (one pass over the pool the method
      defines an epoch by).
    on_epoch_start: optional host-side `(state, epoch) -> state` hook run
      before each epoch's first step (DeepCluster re-clusters here).
    finalize: optional host-side `(state, data) -> {model: {'top1', 'top5'}}`
      run once after training and the final evaluation; its models join
      those of `predict` in results.json (and may be `reported_model`).
      For evaluations that are not logits on the test images, such as a
      linear probe fit on the labeled images' features. `data` is the
      run's `SemiSupervisedData`.
  """
  init: Callable[[jax.Array], State]
  train_step: Callable[[State, Batch, jax.Array], tuple[State, dict]]
  predict: Callable[[State, jax.Array], dict]
  reported_model: str
  labeled_batch: int
  unlabeled_batch: int
  steps_per_epoch: int
  on_epoch_start: Callable[[State, int], State] | None = None
  finalize: Callable[[State, Any], dict] | None = None


class TrainState(flax.struct.PyTreeNode):
  """One network, its BatchNorm statistics and its optimiser."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, apply_fn, variables, tx):
    params = variables['params']
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               batch_stats=variables.get('batch_stats', {}),
               opt_state=tx.init(params), apply_fn=apply_fn, tx=tx)

  def apply_gradients(self, grads, batch_stats):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per-example 1.0 where the label is among the `k` largest logits.

  With fewer than k classes every label is among them.
  """
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
