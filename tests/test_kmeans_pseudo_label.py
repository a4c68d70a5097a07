"""K-means pseudo-labels: majority naming, targets from clusters, a resumable run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, train_until_first_checkpoint
from sslj import train
from sslj.errors import UserError
from sslj.methods import kmeans_pseudo_label
from sslj.ops import pseudo_labels


def test_clusters_are_named_by_their_labeled_majority():
  # Cluster 0: classes 2, 2, 1 -> 2. Cluster 1: 0, 1 (a tie) -> 0, the lower.
  # Cluster 2: no labeled member -> unnamed. Cluster 3: 3 -> 3.
  clusters = np.array([0, 0, 0, 1, 1, 3])
  labels = np.array([2, 2, 1, 0, 1, 3])
  names, named = pseudo_labels.name_clusters(clusters, labels, num_clusters=4, num_classes=4)
  np.testing.assert_array_equal(names[named], [2, 0, 3])
  np.testing.assert_array_equal(named, [True, True, False, True])


def test_cluster_targets_on_separated_blobs():
  # Four tight blobs, far apart; two labeled points per blob except blob 3,
  # whose points all lack labels: its pool points get no target.
  rng = np.random.default_rng(0)
  centres = 20.0 * np.eye(4, 8)
  blob = np.repeat(np.arange(4), 30)
  points = (centres[blob] + rng.normal(0, 0.1, (120, 8))).astype(np.float32)
  labeled = np.concatenate([np.flatnonzero(blob == b)[:2] for b in range(3)])
  pool = np.setdiff1d(np.arange(120), labeled)
  features = np.concatenate([points[labeled], points[pool]])
  classes = np.array([5, 7, 1, 2])  # blob -> class
  targets, mask, metrics = kmeans_pseudo_label.cluster_targets(
      features, len(labeled), classes[blob[labeled]], points, classes[blob],
      num_classes=8, num_clusters=4, pca_dim=8, num_iters=10, key=jax.random.key(0))
  named = blob[pool] != 3
  np.testing.assert_array_equal(mask, named.astype(np.float32))
  np.testing.assert_array_equal(targets[named], classes[blob[pool]][named])
  np.testing.assert_allclose(metrics['named_fraction'], named.mean())
  np.testing.assert_allclose(metrics['cluster_test_top1'], 75.0)  # blob 3's 30 of 120 unnamed


def _built(data_dir, **overrides):
  config = tiny_config('kmeans_pseudo_label', **{
      'data.data_dir': data_dir, 'batch_size': 4, 'kmeans_pseudo_label.mu': 2,
      'kmeans_pseudo_label.num_clusters': 20, 'kmeans_pseudo_label.num_patches': 2000,
      'kmeans_pseudo_label.num_centroids': 16, 'kmeans_pseudo_label.kmeans_iters': 3,
      **overrides})
  data = train.load_data(config)
  return config, data, kmeans_pseudo_label.METHOD.make(config, data)


@pytest.mark.parametrize('source', ['pixels', 'kmeans_features', 'network'])
def test_targets_follow_the_schedule(source, data_dir):
  _, data, method = _built(data_dir, **{'kmeans_pseudo_label.source': source,
                                        'kmeans_pseudo_label.warmup_epochs': 1,
                                        'kmeans_pseudo_label.refresh_epochs': 2})
  state = jax.jit(method.init)(jax.random.key(0))
  first = method.on_epoch_start(state, 0)
  if source == 'network':  # labels alone during the warm-up epoch
    assert first is state
    first = method.on_epoch_start(state, 1)
    assert method.on_epoch_start(first, 2) is first  # refreshed at 1, 3, 5, ...
  else:  # fixed features: clustered once, before the first step
    assert method.on_epoch_start(first, 1) is first
  mask = np.asarray(first.target_mask)
  assert mask.shape == (len(data.unlabeled_images),) and 0.3 < mask.mean() <= 1
  assert set(np.unique(np.asarray(first.targets)[mask > 0])) <= set(range(data.num_classes))
  assert float(first.cluster_metrics['cluster_test_top1']) > 20  # well above chance (10%)


def test_step_trains_on_the_cluster_names_of_its_indices(data_dir):
  _, data, method = _built(data_dir, **{'kmeans_pseudo_label.source': 'pixels'})
  state = method.on_epoch_start(jax.jit(method.init)(jax.random.key(0)), 0)
  idx = jnp.array([0, 1, 2, 3, 4, 5, 6, 7])
  batch = {'labeled_images': jnp.asarray(data.labeled_images[:4]),
           'labels': jnp.asarray(data.labeled_labels[:4]),
           'unlabeled_images': jnp.asarray(data.unlabeled_images[:8]),
           'unlabeled_indices': idx}
  step = jax.jit(method.train_step)
  _, metrics = step(state, batch, jax.random.key(1))
  np.testing.assert_allclose(float(metrics['mask_rate']), float(state.target_mask[idx].mean()))
  # Without targets the step is the labeled loss alone.
  bare = state.replace(target_mask=jnp.zeros_like(state.target_mask))
  _, bare_metrics = step(bare, batch, jax.random.key(1))
  np.testing.assert_allclose(float(bare_metrics['loss']), float(bare_metrics['labeled_loss']),
                             rtol=1e-6)


def test_bad_options_fail_before_compiling(data_dir):
  for overrides, match in (({'kmeans_pseudo_label.source': 'sift'}, 'source'),
                           ({'kmeans_pseudo_label.num_clusters': 1}, 'num_clusters'),
                           ({'kmeans_pseudo_label.refresh_epochs': 0}, 'refresh_epochs'),
                           ({'kmeans_pseudo_label.kmeans_n_init': 0}, 'kmeans_n_init')):
    with pytest.raises(UserError, match=match):
      _built(data_dir, **overrides)


def test_interrupted_run_resumes_to_the_same_end(tmp_path, data_dir, monkeypatch):
  # 1,297 unlabeled images in steps of 224: an epoch is 6 steps, so the
  # network is re-clustered at steps 0 and 6, after the checkpoint at 4.
  config = tiny_config('kmeans_pseudo_label', **{
      'data.data_dir': data_dir, 'kmeans_pseudo_label.source': 'network',
      'kmeans_pseudo_label.warmup_epochs': 0, 'kmeans_pseudo_label.refresh_epochs': 1,
      'kmeans_pseudo_label.num_clusters': 20, 'num_steps': 8, 'eval_every': 0,
      'checkpoint_every': 4, 'batch_size': 32, 'kmeans_pseudo_label.mu': 7})
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  train_until_first_checkpoint(config, tmp_path / 'resumed', monkeypatch)
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert resumed['models'] == straight['models']
  lines = [json.loads(l) for l in open(tmp_path / 'resumed' / 'metrics.jsonl')]
  assert any('train/cluster_test_top1' in l for l in lines)
