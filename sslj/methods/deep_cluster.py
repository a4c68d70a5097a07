"""DeepCluster: k-means of the network's own features as its training labels.

Before every epoch (`on_epoch_start`, a host hook of the training loop):

1. the features of the whole unlabeled pool are computed without
   augmentation (BatchNorm in inference mode, jitted, in fixed-size batches);
2. they are PCA-whitened to min(pca_dim, D) dimensions and L2-normalised;
3. k-means (`sslj.ops.kmeans`: `kmeans_init` seeding, default greedy
   k-means++, `kmeans_iters` Lloyd iterations, the best of `kmeans_n_init`
   runs) groups them into k clusters; the assignments are the epoch's
   pseudo-labels;
4. sampling tables are built (`sslj.ops.cluster_sampling`) so that every
   step draws images uniformly over the non-empty clusters (a cluster with
   equal probability, then an image of it uniformly), which keeps large
   clusters from dominating and the network from collapsing into a few of
   them;
5. the classifier head is re-initialised (`deep_cluster.head_init`) and its
   optimiser state zeroed (by default it has none: its own momentum-free
   SGD, `deep_cluster.head_optimizer`): the cluster indices of one epoch
   have nothing to do with the last one's.

The network is then trained with cross-entropy on the pseudo-labels of
augmented images. An optional Sobel front end (`deep_cluster.sobel`) turns
the normalised images into grayscale and applies the two 3x3 Sobel filters,
so that colour cannot be the clustering's trivial cue.

An epoch is one pass over the unlabeled pool (ceil(U / batch_size) steps),
or `deep_cluster.steps_per_epoch` steps when that is set, which keeps CPU
runs on large pools short (clustering happens that often instead).

The pseudo-labels and the sampling tables are part of the checkpointed state,
so a run resumed in the middle of an epoch trains on the same labels. The
clustering is deterministic: k-means draws from `fold_in(seed key, epoch)`.

Logged with every training log line (metrics.jsonl, `train/...`): the
current epoch's `nmi_previous` (NMI between this and the previous epoch's
assignments of the pool; NaN at epoch 0), `nmi_test_labels` (the test
images' features, whitened with the pool's whitening and assigned to the
nearest of the epoch's centroids, against their true labels: the pool's own
labels are not part of the run's data) and `nonempty_clusters`.

Evaluation (`finalize`): a linear probe (`sslj.ops.probes.linear_probe`,
logistic regression on standardised features) on the frozen features of
the labeled images, scored on the test split: 'linear_probe' (reported) for
the trained network and 'random_net_probe' for a randomly initialised one of
the same architecture, the floor. The features are the model's own
(`return_features=True`: pooled features for small_cnn, fc7 for alexnet).

Departures from the paper: the optimiser and schedule come from the config
(the paper: SGD, lr 0.05, momentum 0.9, weight decay 1e-5, constant); the
probe is on the features the model returns rather than on each conv layer;
test NMI is measured on the test split rather than on the training labels.

The head and the clustered features follow the reference code
(facebookresearch/deepcluster, `main.py`), as measured on Fashion-MNIST with
10 labels per class (docs/results.md, the A/B table; linear-probe top-1,
`configs/deep_cluster.py:dataset=fashion_mnist,labels_per_class=10`):
  * Head initialisation (`deep_cluster.head_init`, default 'normal_0.01'):
    the reference re-creates the top layer each epoch with
    `weight.data.normal_(0, 0.01)`, `bias.data.zero_()`; 'lecun_normal' is
    Flax's Dense default (LeCun normal, zero bias).
  * Head optimiser (`deep_cluster.head_optimizer`, default 'plain_sgd'): the
    reference's `train()` makes the top layer its own `torch.optim.SGD(
    model.top_layer.parameters(), lr=args.lr, weight_decay=10**args.wd)`
    every epoch, without momentum (the rest keeps one SGD with momentum
    0.9); here the head gets SGD with the run's learning rate, schedule and
    weight decay and no momentum (needs `optimizer.name=sgd`). 'shared'
    trains the head with the run's optimiser, its state zeroed each epoch.
    The two head settings were measured together: Flax's initialisation and
    the shared optimiser reached 69.76 / 66.07 / 68.76 (seeds 0-2), the
    reference's 66.13 / 64.41 / 68.95. Ours is ahead on the mean (68.20
    against 66.50) but not on every seed, so by the rule the A/B table
    follows (the reference's unless ours is ahead on all three seeds) the
    reference's is the default.
  * Clustered features (`deep_cluster.cluster_features`, default 'pre_relu'
    where the model records them: small_cnn and alexnet,
    configs/deep_cluster.py `PRE_RELU_MODELS`): before `compute_features`
    the reference drops the last module of `model.classifier`, the ReLU after
    fc7 (put back to train), so k-means sees fc7 before its ReLU. Here that
    is alexnet's fc7 before its ReLU (relu of it is the default features);
    for small_cnn the network with its last ReLU removed, the last stage's
    BatchNorm output averaged over positions (averaging and ReLU do not
    commute: relu of it is not the default features). The probes keep the
    model's own features. 'post_relu' clusters the model's own features (the
    only choice for the other models). Measured with Flax's head: 70.00
    before the ReLU against 69.76 after it (seed 0), so the reference's.

k-means against the reference code (facebookresearch/deepcluster,
`clustering.py` `run_kmeans`: faiss `Clustering`, niter 20, nredo 1, no
subsampling): one run, as faiss's nredo = 1 (`kmeans_n_init` = 1), but
seeded by greedy k-means++ (scikit-learn's) where faiss takes k random
points (`kmeans_init='random'` is that): on 30,000 points of 40
well-separated Gaussian blobs in 24 dimensions (50 iterations, five keys)
random seeding ended at 3.4-6.2x scikit-learn's default inertia, greedy
k-means++ at 0.76-1.02x. Not measured on DeepCluster's own features.

References:
  Caron, Bojanowski, Joulin & Douze, "Deep clustering for unsupervised
    learning of visual features", ECCV 2018; code:
    github.com/facebookresearch/deepcluster.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sslj import parallel
from sslj.data import augment
from sslj.errors import UserError
from sslj.methods import base, frozen_features, network
from sslj.models import heads
from sslj.ops import front_ends, kmeans, nmi, optim, probes, whitening
from sslj.ops.cluster_sampling import ClusterTables, cluster_tables, sample_uniform_over_clusters

# Key streams under the run's seed (1 is the random network of the probe).
_KMEANS_STREAM, _HEAD_STREAM = 2, 3

# `deep_cluster.head_init` -> the head's kernel initialiser (the bias starts at 0):
# Flax's Dense default, or the reference's `weight.data.normal_(0, 0.01)`.
HEAD_INITS = {'lecun_normal': nn.linear.default_kernel_init,
              'normal_0.01': nn.initializers.normal(0.01)}
# `deep_cluster.head_optimizer`: the run's optimiser, or SGD without momentum.
HEAD_OPTIMIZERS = ('shared', 'plain_sgd')
# `deep_cluster.cluster_features`: the model's own, or before the last ReLU.
CLUSTER_FEATURES = ('post_relu', 'pre_relu')


class DeepClusterState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  tables: ClusterTables
  cluster_metrics: dict  # float32 scalars of the current epoch's clustering
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


sobel = front_ends.sobel


def embed(params: whitening.PCAWhitening, features) -> jax.Array:
  """Whitened, L2-normalised features: what k-means clusters."""
  return whitening.l2_normalize(whitening.pca_whiten_apply(params, features))


def cluster_features(features: np.ndarray, *, num_clusters: int, pca_dim: int,
                     num_iters: int, key, init: str = 'k-means++', n_init: int = 1,
                     mesh=None):
  """PCA-whitens to min(pca_dim, D), L2-normalises and runs k-means
  (`init` seeding, the best of `n_init` runs).

  Returns:
    (KMeansResult, the fitted PCAWhitening).
  """
  fitted = whitening.pca_whiten_fit(features, min(pca_dim, features.shape[1]))
  result = kmeans.kmeans(embed(fitted, features), num_clusters, num_iters=num_iters, key=key,
                         init=init, n_init=n_init, mesh=mesh)
  return result, fitted


def kmeans_key(seed: int, epoch: int):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _KMEANS_STREAM), epoch)


def reset_head(state: DeepClusterState, key, head_init: str = 'lecun_normal') -> DeepClusterState:
  """A fresh head (`HEAD_INITS[head_init]` weights, zero bias) with zero optimiser state."""
  kernel = state.params['head']['kernel']
  head = nn.Dense(kernel.shape[1], kernel_init=HEAD_INITS[head_init]).init(
      key, jnp.zeros((1, kernel.shape[0])))['params']
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[0], 'key', None) == 'head', state.params)
  # With head_optimizer='plain_sgd' the network's part of the state holds a
  # MaskedNode where the head was (optax.multi_transform): nothing to zero there.
  masked = lambda v: isinstance(v, optax.MaskedNode)
  opt_state = optax.tree_map_params(
      state.tx, lambda v, m: v if masked(v) else jnp.where(m, jnp.zeros_like(v), v),
      state.opt_state, mask, is_leaf=masked)
  return state.replace(params={**state.params, 'head': head}, opt_state=opt_state)


def on_epoch_start(state: DeepClusterState, epoch: int, *, features_fn, data, num_clusters: int,
                   pca_dim: int, num_iters: int, seed: int, batch_size: int,
                   mesh, init: str = 'k-means++', n_init: int = 1,
                   head_init: str = 'lecun_normal') -> DeepClusterState:
  """Re-clusters the pool, rebuilds the sampling tables and resets the head.

  `features_fn(variables, images)` gives the features that are clustered.
  """
  started = time.perf_counter()
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  extract = functools.partial(frozen_features.network_features, features_fn, variables,
                              batch_size=batch_size, mesh=mesh)
  result, fitted = cluster_features(extract(data.unlabeled_images), num_clusters=num_clusters,
                                    pca_dim=pca_dim, num_iters=num_iters,
                                    key=kmeans_key(seed, epoch), init=init, n_init=n_init,
                                    mesh=mesh)
  labels = np.asarray(jax.device_get(result.assignments))
  test_clusters, _ = kmeans.assign(embed(fitted, extract(data.test_images)), result.centroids,
                                   mesh=mesh)
  tables = cluster_tables(labels, num_clusters)
  metrics = {
      'nmi_previous': nmi.normalized_mutual_info(jax.device_get(state.tables.labels), labels)
                      if epoch > 0 else float('nan'),
      'nmi_test_labels': nmi.normalized_mutual_info(data.test_labels,
                                                    jax.device_get(test_clusters)),
      'nonempty_clusters': float(tables.num_nonempty),
      'kmeans_inertia': float(result.inertia),
  }
  previous = (f"{metrics['nmi_previous']:.4f}" if epoch > 0
              else 'n/a (first clustering)')
  logging.info('epoch %d: %d of %d clusters used, NMI to previous %s, NMI to test labels '
               '%.4f (%.1f s)', epoch, metrics['nonempty_clusters'], num_clusters,
               previous, metrics['nmi_test_labels'], time.perf_counter() - started)
  replicated = parallel.replicated(mesh)
  state = state.replace(
      tables=jax.device_put(tables, replicated),
      cluster_metrics=jax.device_put({k: np.float32(v) for k, v in metrics.items()},
                                     replicated))
  head_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _HEAD_STREAM), epoch)
  return jax.device_put(reset_head(state, head_key, head_init=head_init), replicated)


def train_step(state: DeepClusterState, batch: base.Batch, key, *,
               preprocess: network.Preprocess, use_sobel: bool):
  """One SGD step of cross-entropy on the pseudo-labels of augmented pool images."""
  aug_key, dropout_key = jax.random.split(key)
  x = preprocess.train(batch['unlabeled_images'], aug_key)
  if use_sobel:
    x = sobel(x)
  labels = state.tables.labels[batch['unlabeled_indices']]

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_key})
    return network.cross_entropy(logits, labels), (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)
  return state, {'loss': loss, 'train_top1': 100 * base.top_k_correct(logits, labels, 1).mean(),
                 **state.cluster_metrics}


def predict(state, images):
  """No logits for the test classes: the scores come from `finalize`."""
  del state, images
  return {}


def finalize(state: DeepClusterState, data, *, features_fn, init, seed: int, probe_c: float,
             batch_size: int, mesh, standardize: str = 'train') -> dict:
  """Linear probes on the trained and on a random network's features."""
  random_state = frozen_features.random_network(init, seed, mesh)
  networks = {name: {'params': s.params, 'batch_stats': s.batch_stats}
              for name, s in (('linear_probe', state), ('random_net_probe', random_state))}
  return frozen_features.score_networks(
      features_fn, networks, data, functools.partial(probes.linear_probe, c=probe_c),
      batch_size=batch_size, mesh=mesh, standardize=standardize)


def steps_per_epoch(config, data) -> int:
  """One pass over the unlabeled pool, or `deep_cluster.steps_per_epoch` if set."""
  if config.deep_cluster.steps_per_epoch > 0:
    return config.deep_cluster.steps_per_epoch
  return max(1, -(-len(data.unlabeled_images) // config.batch_size))


def check_head_and_features(dc, optimizer_name: str) -> None:
  """Refuses an unknown head or feature option in one line."""
  base.check_choice('deep_cluster.head_init', dc.head_init, tuple(HEAD_INITS))
  base.check_choice('deep_cluster.head_optimizer', dc.head_optimizer, HEAD_OPTIMIZERS)
  base.check_choice('deep_cluster.cluster_features', dc.cluster_features, CLUSTER_FEATURES)
  if dc.head_optimizer == 'plain_sgd' and optimizer_name != 'sgd':
    raise UserError(f"deep_cluster.head_optimizer='plain_sgd' needs optimizer.name='sgd' "
                    f"(got '{optimizer_name}'); or keep head_optimizer='shared'.")


def build(config, data, steps: base.Steps) -> base.Method:
  """DeepCluster as a `Method` for the training loop."""
  dc = config.deep_cluster
  pool = len(data.unlabeled_images)
  if not 2 <= dc.num_clusters <= pool:
    raise UserError(f'deep_cluster.num_clusters={dc.num_clusters} must be between 2 and the '
                    f'{pool} unlabeled images.')
  if dc.pca_dim < 1:
    raise UserError(f'deep_cluster.pca_dim={dc.pca_dim} must be at least 1.')
  kmeans.check_options(dc.kmeans_init, dc.kmeans_n_init,
                       fields=('deep_cluster.kmeans_init', 'deep_cluster.kmeans_n_init'))
  frozen_features.check_standardize(dc.standardize, 'deep_cluster.standardize')
  check_head_and_features(dc, config.optimizer.name)
  mesh = parallel.make_mesh()
  spec = augment.AugmentSpec.from_config(config.augment)
  preprocess = network.Preprocess(spec, data.mean, data.std)
  model = network.build_model(config, dc.num_clusters)
  h, w, c = data.unlabeled_images.shape[1:]
  if spec.out_size:
    h = w = spec.out_size
  dummy = jnp.zeros((1, h, w, 2 if dc.sobel else c), jnp.float32)
  if dc.head_optimizer == 'shared':
    tx = optim.make_optimizer(config.optimizer, steps.total)
  else:  # the reference's: plain SGD for the head, the run's optimiser for the rest
    names = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), dummy)
    tx = optim.make_optimizer_with_plain_sgd(config.optimizer, steps.total,
                                             tuple(names['params']), plain=('head',))
  start_tables = cluster_tables(np.zeros(pool, np.int32), dc.num_clusters)
  if dc.cluster_features == 'pre_relu' and not heads.records_features_before_relu(model, dummy):
    raise UserError(f"deep_cluster.cluster_features='pre_relu' needs a model that records its "
                    f"features before the last ReLU (small_cnn, alexnet); '{config.model.name}' "
                    "does not. Use cluster_features='post_relu'.")

  def init(key):
    params_key, dropout_key = jax.random.split(key)
    variables = model.init({'params': params_key, 'dropout': dropout_key}, dummy, train=False)
    params = variables['params']
    if 'head' not in params:
      raise UserError(f"deep_cluster needs a model with one linear head named 'head'; "
                      f"'{config.model.name}' has none.")
    nan = jnp.float32(jnp.nan)
    return DeepClusterState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
        tables=jax.tree.map(jnp.asarray, start_tables),
        cluster_metrics={'nmi_previous': nan, 'nmi_test_labels': nan,
                         'nonempty_clusters': nan, 'kmeans_inertia': nan},
        apply_fn=model.apply, tx=tx)

  def network_input(images):
    x = preprocess.eval(images)
    return sobel(x) if dc.sobel else x

  @jax.jit
  def features_fn(variables, images):  # the model's own: what the probes see
    return model.apply(variables, network_input(images), train=False, return_features=True)

  @jax.jit
  def features_before_relu_fn(variables, images):
    return heads.features_before_relu(model.apply, variables, network_input(images),
                                      train=False)

  batch_size = -(-config.eval_batch_size // mesh.devices.size) * mesh.devices.size
  return base.Method(
      init=init,
      train_step=functools.partial(train_step, preprocess=preprocess, use_sobel=dc.sobel),
      predict=predict, reported_model='linear_probe',
      labeled_batch=0, unlabeled_batch=config.batch_size,
      on_epoch_start=functools.partial(
          on_epoch_start,
          features_fn=features_fn if dc.cluster_features == 'post_relu'
          else features_before_relu_fn,
          data=data, num_clusters=dc.num_clusters, pca_dim=dc.pca_dim,
          num_iters=dc.kmeans_iters, seed=config.seed, batch_size=batch_size, mesh=mesh,
          init=dc.kmeans_init, n_init=dc.kmeans_n_init, head_init=dc.head_init),
      finalize=functools.partial(finalize, features_fn=features_fn, init=init, seed=config.seed,
                                 probe_c=dc.probe_c, batch_size=config.eval_batch_size,
                                 mesh=mesh, standardize=dc.standardize),
      sample_unlabeled=lambda state, key, n: sample_uniform_over_clusters(state.tables, key, n))


def reported(state: DeepClusterState, config, data) -> base.Reported:
  """The trained network; its head classifies clusters, so only its features are used."""
  del data
  return base.Reported({'params': state.params, 'batch_stats': state.batch_stats},
                       classifies=False,
                       front_end='sobel' if config.deep_cluster.sobel else None)


METHOD = base.register(base.Definition(
    name='deep_cluster', summary="k-means of the network's own features as targets, re-clustered "
    'every epoch', steps_per_epoch=steps_per_epoch, build=build, reported=reported,
    fields_added={'deep_cluster.standardize': 'labeled', 'deep_cluster.head_init': 'lecun_normal',
                  'deep_cluster.head_optimizer': 'shared',
                  'deep_cluster.cluster_features': 'post_relu'}))
