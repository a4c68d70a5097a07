"""The method contract: everything generic code may ask of a method.

A method is one module under `sslj/methods/` that calls `register` once with
a `Definition`. Generic code (the training loop, `sslj.use`, `sslj.viz`, the
sweep, the benchmarks) finds it with `sslj.methods.get(config.method)` or
iterates `sslj.methods.registry()`, and asks only what `Definition` and the
`Method` it builds declare; it never tests a method's name and never looks
for functions on a module. Every optional part has a default that does the
right thing, so the smallest gradient method declares `name`, `summary`,
`steps_per_epoch` and `build` (see docs/adding_a_method.md).

Two kinds of method:
  * gradient methods declare `build`, which returns a `Method` (state, pure
    train step, predictions, hooks) that `sslj.train`'s loop runs;
  * pipelines that are not gradient training (k-means features + SVM)
    declare `run_pipeline(config, data, workdir) -> (scores, reported_model)`
    and skip the loop; they keep no checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from sslj.errors import UserError

State = Any
# 'labeled_images' uint8, 'labels' int32 (with a labeled batch);
# 'unlabeled_images' uint8 and 'unlabeled_indices' int32, their rows in the
# unlabeled pool (with an unlabeled batch).
Batch = dict


class Steps(NamedTuple):
  """How long a run is, computed once by the loop from the config.

  Attributes:
    total: optimizer steps of the run (`num_steps`, or `num_epochs` epochs).
    per_epoch: steps in one epoch, the method's own `steps_per_epoch`.
  """
  total: int
  per_epoch: int


@dataclasses.dataclass(frozen=True)
class Method:
  """A gradient-trained method, built for one run, as the training loop sees it.

  Attributes:
    init: `key -> state`; the state is a pytree with an integer `step`.
    train_step: pure `(state, batch, key) -> (state, metrics)`; metrics is a
      dict of scalars and must contain 'loss'. A method that gives unlabeled
      images targets may add PSEUDO_LABELS (int [n], the class of each of
      the batch's first n unlabeled rows) and PSEUDO_LABEL_WEIGHTS (float
      [n], each target's weight in the loss, 0 where it is not used): the
      loop removes both and scores them against the pool's hidden labels,
      which the method never sees (`train.score_pseudo_labels`).
    predict: pure `(state, images uint8 [B,H,W,C]) -> {model name: logits}`.
    reported_model: the entry of `predict` (or of `finalize`) that
      `results.json` reports.
    labeled_batch / unlabeled_batch: images of each kind the loop samples per step.
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
      its uniform draw (DeepCluster draws uniformly over its clusters).
      Either way the batch holds the drawn rows as 'unlabeled_indices'.
  """
  init: Callable[[jax.Array], State]
  train_step: Callable[[State, Batch, jax.Array], tuple[State, dict]]
  predict: Callable[[State, jax.Array], dict]
  reported_model: str
  labeled_batch: int
  unlabeled_batch: int
  on_epoch_start: Callable[[State, int], State] | None = None
  finalize: Callable[[State, Any], dict] | None = None
  on_eval: Callable[[State, int, str], None] | None = None
  on_log: Callable[[int, dict], dict] | None = None
  sample_unlabeled: Callable[[State, jax.Array, int], jax.Array] | None = None


# Optional per-image entries of a step's metrics (see `Method.train_step`).
PSEUDO_LABELS = 'pseudo_labels'
PSEUDO_LABEL_WEIGHTS = 'pseudo_label_weights'


@dataclasses.dataclass(frozen=True)
class Reported:
  """The network a run reports, out of its training state (`Definition.reported`).

  Probes, kNN, t-SNE, the confusion matrix, predict and export all apply
  `config.model` with these variables, so they agree by construction (the
  contract test checks the logits against `Method.predict`).

  Attributes:
    variables: {'params', 'batch_stats'} of the reported network.
    num_heads: heads of the model (class logits are head 0).
    classifies: False when the network's head classifies something other
      than the dataset's classes (clusters, surrogate classes): its features
      are probed, its logits are neither drawn nor exported.
    model_options: constructor keywords beyond `config.model`'s fields
      (Exemplar-CNN's fully connected layer spans its training patch).
    front_end: a name in `sslj.ops.front_ends.FRONT_ENDS` applied to the
      normalised images before the network (DeepCluster's Sobel filter).
  """
  variables: dict
  num_heads: int = 1
  classifies: bool = True
  model_options: dict = dataclasses.field(default_factory=dict)
  front_end: str | None = None


class NotApplicable(Exception):
  """Raised by a `Definition.pictures` or `features` hook that cannot draw for this run.

  The message says why (e.g. no checkpoint yet); the pictures page shows it.
  """


@dataclasses.dataclass(frozen=True)
class Definition:
  """A registered method: what every generic layer may ask of it.

  Attributes:
    name: the config's `method` field.
    summary: one line for listings and error messages.
    steps_per_epoch: `(config, data) -> int`, one epoch in steps (the
      pass over the pool the method defines an epoch by); required of
      gradient methods, computed once per run (`Steps.per_epoch`).
    build: `(config, data, steps: Steps) -> Method`; raises UserError for
      impossible settings before anything compiles.
    run_pipeline: for methods that are not gradient training:
      `(config, data, workdir) -> (scores {model: {'top1', 'top5'}},
      reported_model)`. Exactly one of `build` and `run_pipeline`.
    reported: `(state, config, data) -> Reported`; by default the state's
      own `params` and `batch_stats` (`trained_network`). Pipelines have
      none: their runs cannot be evaluated, probed, exported or predicted with.
    pictures: `(state or None, config, data, seed) -> {title: image}` where
      an image is uint8 [H, W] / [H, W, C], or (image, caption); the
      method's own pictures on the run's page (state is None before the
      first checkpoint; raise NotApplicable when it is needed).
    features: for a pipeline, `(config, workdir, images uint8) ->
      (description, features [n, D], source)`: its learned representation
      for the t-SNE map. Gradient methods get theirs from `reported`.
    compare_models: (trained, averaged) names of `predict` whose curves the
      page compares (Mean Teacher's student and teacher); None: no pair.
    fields_added: config fields (dotted names) this method gained after
      runs were recorded without them, each with the value that reproduces
      what those runs did (`run_files.as_current` fills them in).
  """
  name: str
  summary: str
  steps_per_epoch: Callable[[Any, Any], int] | None = None
  build: Callable[[Any, Any, Steps], Method] | None = None
  run_pipeline: Callable[[Any, Any, str], tuple[dict, str]] | None = None
  reported: Callable[[State, Any, Any], Reported] | None = None  # default: see below
  pictures: Callable[[State | None, Any, Any, int], dict] | None = None
  features: Callable[[Any, str, Any], tuple[str, Any, str]] | None = None
  compare_models: tuple[str, str] | None = None
  fields_added: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if (self.build is None) == (self.run_pipeline is None):
      raise TypeError(f'method {self.name!r} must declare exactly one of build and run_pipeline')
    if self.build is not None:
      if self.steps_per_epoch is None:
        raise TypeError(f'gradient method {self.name!r} must declare steps_per_epoch')
      if self.reported is None:  # the default: the one trained network of a TrainState
        object.__setattr__(self, 'reported', trained_network)

  @property
  def is_pipeline(self) -> bool:
    """Not trained by gradient steps: no loop, no checkpoint, no network."""
    return self.run_pipeline is not None

  def steps(self, config, data, num_steps: int | None = None) -> Steps:
    """The run's `Steps`: `num_steps` if given, else the config's `num_steps`
    or `num_epochs` epochs when that is set."""
    per_epoch = int(self.steps_per_epoch(config, data))
    if num_steps is None:
      if config.num_epochs > 0:
        num_steps = int(math.ceil(config.num_epochs * per_epoch))
      elif config.num_steps < 1:
        raise UserError(f'num_steps={config.num_steps} must be at least 1 '
                        '(or set num_epochs > 0).')
      else:
        num_steps = config.num_steps
    return Steps(total=int(num_steps), per_epoch=per_epoch)

  def make(self, config, data, num_steps: int | None = None) -> Method:
    """`build` with the run's `Steps` (see `steps`)."""
    return self.build(config, data, self.steps(config, data, num_steps))


def trained_network(state, config, data) -> Reported:
  """The default `Definition.reported`: the state's `params` and `batch_stats`."""
  del config, data
  return Reported({'params': state.params, 'batch_stats': state.batch_stats})


_REGISTRY: dict[str, Definition] = {}


def register(definition: Definition) -> Definition:
  """Adds a method to the registry (once, at its module's import); returns it."""
  known = _REGISTRY.get(definition.name)
  if known is not None and known is not definition:
    raise ValueError(f'two methods are registered as {definition.name!r}')
  _REGISTRY[definition.name] = definition
  return definition


def registered() -> dict[str, Definition]:
  """The methods registered so far (`sslj.methods.registry()` imports them all first)."""
  return dict(_REGISTRY)


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


def check_choice(field: str, value, allowed) -> None:
  """Refuses config field `field`'s `value` unless it is one of `allowed`, in one line."""
  if value not in allowed:
    raise UserError(f"{field}={value!r} is unknown; use one of "
                    f"{', '.join(repr(a) for a in allowed)}.")


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per-example 1.0 where the label is among the `k` largest logits.

  With fewer than k classes every label is among them.
  """
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
