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

from sslj.errors import UserError

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
    on_eval: optional host-side `(state, step, workdir) -> None` hook run
      after each evaluation, on process 0 only (the GAN saves its sample
      grid here). It must not run collective computations.
    on_log: optional host-side `(step, scalars) -> dict` hook run at each
      log with the logged scalars; what it returns is logged with them (the
      GAN watches for mode collapse here).
    sample_unlabeled: optional `(state, key, n) -> int32 indices [n]` into
      the unlabeled pool, traced inside the loop's compiled step, replacing
      its uniform draw (DeepCluster draws uniformly over its clusters); the
      batch then also holds the indices as 'unlabeled_indices'.
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
  on_eval: Callable[[State, int, str], None] | None = None
  on_log: Callable[[int, dict], dict] | None = None
  sample_unlabeled: Callable[[State, jax.Array, int], jax.Array] | None = None


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


def labeled_share(config, labeled: int, section: str) -> tuple[int, int]:
  """(labeled, unlabeled) images per step: `labeled` of `batch_size`, the rest unlabeled."""
  if not 0 < labeled < config.batch_size:
    raise UserError(f'{section}.labeled_batch_size={labeled} must be between 1 and '
                    f'batch_size-1={config.batch_size - 1}.')
  return labeled, config.batch_size - labeled


def labeled_times_mu(config, mu, section: str) -> tuple[int, int]:
  """(labeled, unlabeled) images per step: `batch_size` and `mu` * `batch_size`."""
  if config.batch_size < 1 or mu < 1 or int(mu) != mu:
    raise UserError(f'batch_size={config.batch_size} (labeled images per step) and '
                    f'{section}.mu={mu} (unlabeled per labeled) must be positive integers.')
  return config.batch_size, int(mu) * config.batch_size


def unlabeled_epoch_steps(config, data, unlabeled: int) -> int:
  """Steps of `unlabeled` images in one pass over the unlabeled pool (an epoch)."""
  if len(data.unlabeled_images) == 0:
    raise UserError(f'{config.method} needs unlabeled images, but every training image is '
                    f'labeled; set labels_per_class (e.g. configs/{config.method}.py:'
                    'labels_per_class=5).')
  return max(1, -(-len(data.unlabeled_images) // unlabeled))


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per-example 1.0 where the label is among the `k` largest logits.

  With fewer than k classes every label is among them.
  """
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
