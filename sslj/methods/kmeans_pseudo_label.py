"""K-means pseudo-labels: clusters of all images, named by their labeled members.

Every `refresh_epochs` epochs (`on_epoch_start`, a host hook of the loop):

1. features of every training image, labeled and unlabeled, are computed from
   `source`: 'pixels' (the normalised images, flattened), 'kmeans_features'
   (single-layer k-means triangle features, `sslj.methods.kmeans_features`,
   fitted once on patches of the unlabeled images) or 'network' (the network
   being trained, without augmentation, as DeepCluster does);
2. they are PCA-whitened to min(pca_dim, D) dimensions, L2-normalised and
   clustered by `sslj.ops.kmeans` into `num_clusters` clusters (greedy
   k-means++ seeding and one run, scikit-learn's `KMeans` default, there
   being no reference code; `kmeans_n_init` > 1 keeps the least inertia of
   that many runs);
3. each cluster is named by the majority class of the labeled images inside
   it (`sslj.ops.pseudo_labels.name_clusters`); an unlabeled image takes its
   cluster's name as its target, and images of clusters without a labeled
   member get none.

The network then trains on labeled images plus the named unlabeled ones:

  loss = CE(labeled) + weight * mean_b mask(b) * CE(unlabeled(b), name(cluster(b)))

(the masked mean of `pseudo_labels.masked_cross_entropy`). Labeled and
unlabeled images go through the network in one training-mode pass, so
BatchNorm normalises them together and its running statistics follow the
whole batch (Pseudo-Label's default `bn_passes='joint'`; this method has no
`bn_passes` field). With 'network' the clustered features are computed in
inference mode, with the running statistics. With the fixed
sources the clustering happens once, before the first step. With 'network'
the first `warmup_epochs` train on the labels alone (the random network's
clusters mean little), then the clusters are refreshed on schedule.

Logged with every training log line: `named_fraction` (the share of the
unlabeled pool with a target), `cluster_test_top1` (the test images assigned
to their nearest centroid and given its name, scored against their classes:
how good the targets are, since the pool's own labels are not part of the
run's data) and `nonempty_clusters`.

This is the combination the second report set out to try (k-means clusters
as the labels of unlabeled images); it has no paper of its own. Its parts
are from: Coates, Lee & Ng 2011, "An analysis of single-layer networks in
unsupervised feature learning" (the features); Lee 2013, "Pseudo-Label"
(training on assigned targets of unlabeled images); Caron et al. 2018,
"Deep clustering for unsupervised learning of visual features" (clustering
whitened network features on a schedule).
"""

from __future__ import annotations

import functools
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sslj import parallel
from sslj.data import augment
from sslj.errors import UserError
from sslj.methods import base, deep_cluster, frozen_features, kmeans_features, network
from sslj.methods import pseudo_label
from sslj.ops import kmeans, optim, pseudo_labels

SOURCES = ('pixels', 'kmeans_features', 'network')
_KMEANS_STREAM, _ENCODER_STREAM = 4, 5


class KMeansPseudoLabelState(base.TrainState):
  """The network's state plus the current targets of the unlabeled pool."""
  targets: jax.Array       # int32 [U]: each unlabeled image's cluster name
  target_mask: jax.Array   # float32 [U]: 1 where its cluster has a name
  cluster_metrics: dict    # float32 scalars of the latest clustering


def cluster_targets(features: np.ndarray, num_labeled: int, labeled_labels: np.ndarray,
                    test_features: np.ndarray, test_labels: np.ndarray, *, num_classes: int,
                    num_clusters: int, pca_dim: int, num_iters: int, key, n_init: int = 1,
                    mesh=None):
  """Clusters [labeled; unlabeled] features and names the clusters.

  Returns:
    (targets int32 [U], mask float32 [U], metrics dict) for the unlabeled rows.
  """
  result, fitted = deep_cluster.cluster_features(features, num_clusters=num_clusters,
                                                 pca_dim=pca_dim, num_iters=num_iters, key=key,
                                                 n_init=n_init, mesh=mesh)
  clusters = np.asarray(jax.device_get(result.assignments))
  names, named = pseudo_labels.name_clusters(clusters[:num_labeled], labeled_labels,
                                             num_clusters=num_clusters, num_classes=num_classes)
  pool = clusters[num_labeled:]
  test_clusters, _ = kmeans.assign(deep_cluster.embed(fitted, test_features), result.centroids,
                                   mesh=mesh)
  test_clusters = np.asarray(jax.device_get(test_clusters))
  correct = named[test_clusters] & (names[test_clusters] == np.asarray(test_labels))
  metrics = {'named_fraction': float(named[pool].mean()),
             'cluster_test_top1': 100.0 * float(correct.mean()),
             'nonempty_clusters': float(len(np.unique(clusters)))}
  return names[pool], named[pool].astype(np.float32), metrics


class FeatureSource:
  """Features of host image sets from the configured source."""

  def __init__(self, config, data, preprocess: network.Preprocess, model, mesh):
    self.source = config.kmeans_pseudo_label.source
    self.data, self.mesh, self.config = data, mesh, config
    self.batch_size = -(-config.eval_batch_size // mesh.devices.size) * mesh.devices.size
    self._encoder = None

    @jax.jit
    def network_fn(variables, images):
      return model.apply(variables, preprocess.eval(images), train=False, return_features=True)
    self._network_fn = network_fn
    self._pixels_fn = jax.jit(lambda images: preprocess.eval(images).reshape(len(images), -1))

  def __call__(self, state, images: np.ndarray) -> np.ndarray:
    if self.source == 'network':
      variables = {'params': state.params, 'batch_stats': state.batch_stats}
      return frozen_features.network_features(self._network_fn, variables, images,
                                              batch_size=self.batch_size, mesh=self.mesh)
    if self.source == 'pixels':
      return np.concatenate([np.asarray(self._pixels_fn(images[i:i + self.batch_size]))
                             for i in range(0, len(images), self.batch_size)])
    kf = self.config.kmeans_pseudo_label
    if self._encoder is None:
      rng = np.random.default_rng(self.config.seed)
      patches = kmeans_features.sample_patches(self.data.unlabeled_images, kf.num_patches,
                                               kf.patch_size, rng)
      key = jax.random.fold_in(jax.random.key(self.config.seed), _ENCODER_STREAM)
      self._encoder = kmeans_features.fit(
          patches, num_centroids=kf.num_centroids, num_iters=kf.kmeans_iters, key=key,
          normalize_eps=10.0, zca_eps=0.1, mesh=self.mesh)
    return kmeans_features.extract_features(
        images, self._encoder, patch=kf.patch_size, stride=1, normalize_eps=10.0,
        budget_mb=256, mesh=self.mesh, kinds=('triangle',))['triangle']


def on_epoch_start(state: KMeansPseudoLabelState, epoch: int, *, features: FeatureSource, data,
                   kp, seed: int, mesh) -> KMeansPseudoLabelState:
  """Re-clusters on schedule and stores the unlabeled pool's targets in the state."""
  fixed = kp.source != 'network'
  first = 0 if fixed else kp.warmup_epochs
  if epoch < first or (fixed and epoch > 0) or (epoch - first) % kp.refresh_epochs:
    return state
  started = time.perf_counter()
  images = np.concatenate([data.labeled_images, data.unlabeled_images])
  targets, mask, metrics = cluster_targets(
      features(state, images), len(data.labeled_images), data.labeled_labels,
      features(state, data.test_images), data.test_labels, num_classes=data.num_classes,
      num_clusters=kp.num_clusters, pca_dim=kp.pca_dim, num_iters=kp.kmeans_iters,
      key=jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _KMEANS_STREAM), epoch),
      n_init=kp.kmeans_n_init, mesh=mesh)
  logging.info('epoch %d: %s clusters of %s features; %.1f%% of the pool named; the named '
               'clusters score %.2f%% on the test images (%.1f s)', epoch, kp.num_clusters,
               kp.source, 100 * metrics['named_fraction'], metrics['cluster_test_top1'],
               time.perf_counter() - started)
  replicated = parallel.replicated(mesh)
  return state.replace(
      targets=jax.device_put(targets.astype(np.int32), replicated),
      target_mask=jax.device_put(mask, replicated),
      cluster_metrics=jax.device_put({k: np.float32(v) for k, v in metrics.items()},
                                     replicated))


def train_step(state: KMeansPseudoLabelState, batch, key, *, preprocess: network.Preprocess,
               weight: float):
  """One SGD step on the labels and the unlabeled images' cluster names."""
  aug_key, dropout_key = jax.random.split(key)
  images = jnp.concatenate([batch['labeled_images'], batch['unlabeled_images']])
  inputs = preprocess.train(images, aug_key)
  idx = batch['unlabeled_indices']
  targets = (state.targets[idx], state.target_mask[idx])
  grad_fn = jax.value_and_grad(functools.partial(
      pseudo_label.loss_fn, weight=weight, threshold=0.0, targets=targets), has_aux=True)
  (loss, aux), grads = grad_fn(state.params, state.batch_stats, state.apply_fn, inputs,
                               batch['labels'], dropout_key)
  labeled_loss, unlabeled_loss, mask, _, labeled_logits, batch_stats, _ = aux
  state = state.apply_gradients(grads, batch_stats)
  top1 = base.top_k_correct(labeled_logits, batch['labels'], 1).mean()
  return state, {'loss': loss, 'labeled_loss': labeled_loss, 'unlabeled_loss': unlabeled_loss,
                 'mask_rate': mask.mean(), 'train_top1': 100 * top1, **state.cluster_metrics,
                 base.PSEUDO_LABELS: targets[0], base.PSEUDO_LABEL_WEIGHTS: targets[1]}


def batch_split(config) -> tuple[int, int]:
  """(labeled, unlabeled) images per step: batch_size and mu * batch_size."""
  return base.labeled_times_mu(config, config.kmeans_pseudo_label.mu, 'kmeans_pseudo_label')


def steps_per_epoch(config, data) -> int:
  """An epoch is one pass over the unlabeled pool."""
  return base.unlabeled_epoch_steps(config, data, batch_split(config)[1])


def build(config, data, steps: base.Steps) -> base.Method:
  kp = config.kmeans_pseudo_label
  pool = len(data.unlabeled_images)
  if kp.source not in SOURCES:
    raise UserError(f"kmeans_pseudo_label.source='{kp.source}' is unknown; use one of "
                    f"{', '.join(SOURCES)}.")
  if not 2 <= kp.num_clusters <= pool + len(data.labeled_images):
    raise UserError(f'kmeans_pseudo_label.num_clusters={kp.num_clusters} must be between 2 '
                    f'and the number of training images.')
  if kp.refresh_epochs < 1 or kp.warmup_epochs < 0 or kp.pca_dim < 1:
    raise UserError('kmeans_pseudo_label.refresh_epochs and pca_dim must be >= 1 and '
                    f'warmup_epochs >= 0 (got {dict(kp)}).')
  kmeans.check_options(n_init=kp.kmeans_n_init,
                       fields=('', 'kmeans_pseudo_label.kmeans_n_init'))
  labeled, unlabeled = batch_split(config)
  mesh = parallel.make_mesh()
  model = network.build_model(config, data.num_classes)
  spec = augment.AugmentSpec.from_config(config.augment)
  preprocess = network.Preprocess(spec, data.mean, data.std)
  tx = optim.make_optimizer(config.optimizer, steps.total)
  nan = np.float32(np.nan)

  def init(key):
    variables = network.init_variables(model, key, data.labeled_images.shape[1:], spec)
    params = variables['params']
    return KMeansPseudoLabelState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
        targets=jnp.zeros(pool, jnp.int32), target_mask=jnp.zeros(pool, jnp.float32),
        cluster_metrics={'named_fraction': nan, 'cluster_test_top1': nan,
                         'nonempty_clusters': nan},
        apply_fn=model.apply, tx=tx)

  features = FeatureSource(config, data, preprocess, model, mesh)
  return base.Method(
      init=init,
      train_step=functools.partial(train_step, preprocess=preprocess, weight=kp.weight),
      predict=functools.partial(pseudo_label.predict, preprocess=preprocess),
      reported_model='model', labeled_batch=labeled, unlabeled_batch=unlabeled,
      on_epoch_start=functools.partial(on_epoch_start, features=features, data=data, kp=kp,
                                       seed=config.seed, mesh=mesh))


METHOD = base.register(base.Definition(
    name='kmeans_pseudo_label', summary="k-means clusters named by their labeled members' "
    'majority class as targets', steps_per_epoch=steps_per_epoch, build=build))
