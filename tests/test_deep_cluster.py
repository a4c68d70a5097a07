"""DeepCluster: NMI, the cluster-uniform sampler, re-clustering, the head, AlexNet, runs."""

import functools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage, stats
from sklearn import metrics

from conftest import (ROOT, assert_trees_equal, config_of, latest_checkpoint, tiny_config,
                      train_until_first_checkpoint)
from sslj import models, parallel, train
from sslj.data import augment
from sslj.errors import UserError
from sslj.methods import deep_cluster as dc
from sslj.models import heads
from sslj.ops import front_ends, kmeans, nmi
from sslj.use import evaluate, export


def _config(data_dir, **overrides):
  return tiny_config('deep_cluster', **{
      'data.data_dir': data_dir, 'num_epochs': 0.0, 'eval_every': 0,
      'deep_cluster.steps_per_epoch': 4, 'deep_cluster.num_clusters': 10, **overrides})


@pytest.mark.parametrize('n,ka,kb,seed', [(50, 3, 4, 0), (200, 10, 10, 1), (500, 40, 7, 2),
                                          (30, 30, 2, 3), (100, 1, 5, 4)])
def test_nmi_matches_sklearn(n, ka, kb, seed):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, ka, n)
  # Partly dependent on a, with arbitrary (sparse, negative) label values.
  b = np.where(rng.random(n) < 0.6, a % kb, rng.integers(0, kb, n)) * 7 - 3
  want = metrics.normalized_mutual_info_score(a, b)
  assert nmi.normalized_mutual_info(a, b) == pytest.approx(want, rel=1e-9, abs=1e-12)
  assert nmi.normalized_mutual_info(b, a) == pytest.approx(want, rel=1e-9, abs=1e-12)
  # Renaming clusters changes nothing; a labeling against itself scores 1.
  assert nmi.normalized_mutual_info(a, rng.permutation(ka)[a]) == pytest.approx(1.0)


def test_nmi_edge_cases_match_sklearn():
  cases = [([0, 0, 0], [1, 1, 1]), ([0, 0, 0], [0, 1, 2]), ([0, 1, 0, 1], [0, 0, 1, 1]),
           ([5, 5, 2, 2], [1, 1, 0, 0])]
  for a, b in cases:
    assert nmi.normalized_mutual_info(a, b) == pytest.approx(
        metrics.normalized_mutual_info_score(a, b), abs=1e-12)


def test_sampler_draws_uniformly_over_nonempty_clusters_then_images():
  sizes = np.array([0, 1, 5, 0, 20, 3, 50, 0])
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(8), sizes))
  tables = dc.cluster_tables(labels, 8)
  np.testing.assert_array_equal(tables.size, sizes)
  assert tables.num_nonempty == 5
  n = 40000
  draw = jax.jit(functools.partial(dc.sample_uniform_over_clusters, n=n))
  idx = np.asarray(draw(jax.tree.map(jnp.asarray, tables), jax.random.key(1)))
  assert idx.min() >= 0 and idx.max() < len(labels)
  drawn = labels[idx]
  freq = np.bincount(drawn, minlength=8) / n
  # Empty clusters never; each of the 5 others 1/5 (std 0.002 at n=40,000,
  # while drawing images uniformly would give 1/79 .. 50/79).
  np.testing.assert_array_equal(freq[sizes == 0], 0)
  np.testing.assert_allclose(freq[sizes > 0], 0.2, atol=0.01)
  # Within its cluster every image equally likely: a chi-square test of
  # the image counts against n / (5 * size of the image's cluster).
  counts = np.bincount(idx, minlength=len(labels))
  expected = n / (5 * sizes[labels])
  assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_sampler_hook_replaces_only_the_unlabeled_draw():
  mesh = parallel.make_mesh()
  images = np.random.default_rng(0).integers(0, 256, (37, 4, 4, 1)).astype(np.uint8)
  data = train.TrainData(labeled=parallel.put_resident(images[:5], mesh),
                         labels=jnp.arange(5, dtype=jnp.int32),
                         unlabeled=parallel.put_resident(images, mesh))
  sample = functools.partial(train.sample_batch, mesh=mesh, labeled_batch=4, unlabeled_batch=8)
  key = jax.random.key(3)
  default = jax.jit(sample)(data, key)
  assert set(default) == {'labeled_images', 'labels', 'unlabeled_images', 'unlabeled_indices'}
  np.testing.assert_array_equal(images[np.asarray(default['unlabeled_indices'])],
                                default['unlabeled_images'])
  # A hook that draws as the loop does gives the very same batch.
  uniform = lambda state, k, n: jax.random.randint(k, (n,), 0, 37)
  hooked = jax.jit(functools.partial(sample, sample_unlabeled=uniform))(data, key)
  for name in default:
    np.testing.assert_array_equal(default[name], hooked[name])
  np.testing.assert_array_equal(images[np.asarray(hooked['unlabeled_indices'])],
                                hooked['unlabeled_images'])
  # A hook reading the state draws what it says.
  fixed = lambda state, k, n: jnp.full((n,), state, jnp.int32)
  got = jax.jit(functools.partial(sample, sample_unlabeled=fixed))(data, key, 11)
  np.testing.assert_array_equal(got['unlabeled_images'], np.repeat(images[11:12], 8, 0))


def test_sobel_matches_scipy():
  x = np.random.default_rng(0).normal(size=(2, 6, 7, 3)).astype(np.float32)
  got = np.asarray(jax.jit(dc.sobel)(x))
  gray = x.mean(-1)
  for c, k in enumerate((front_ends.SOBEL_X, front_ends.SOBEL_X.T)):
    want = np.stack([ndimage.correlate(g, k, mode='constant') for g in gray])
    np.testing.assert_allclose(got[..., c], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size,channels,kernel,stride,final', [
    (224, 3, 11, 4, 7), (96, 3, 11, 2, 6), (28, 1, 5, 1, 7), (8, 1, 5, 1, 4)])
def test_alexnet_adapts_conv1_and_keeps_the_paper_layers(size, channels, kernel, stride, final):
  model = models.build('alexnet', num_classes=7, widths=(4, 5, 6, 6, 5), fc_width=16)
  x = jnp.zeros((2, size, size, channels))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  p = variables['params']
  convs = [p[f'Conv_{i}']['kernel'].shape for i in range(5)]
  assert [c[:2] for c in convs] == [(kernel, kernel), (5, 5), (3, 3), (3, 3), (3, 3)]
  assert [c[3] for c in convs] == [4, 5, 6, 6, 5]
  assert len(variables['batch_stats']) == 5
  assert p['fc6']['kernel'].shape == (final * final * 5, 16)
  assert p['fc7']['kernel'].shape == (16, 16) and p['head']['kernel'].shape == (16, 7)
  apply = lambda **kw: jax.eval_shape(functools.partial(model.apply, **kw), variables, x).shape
  assert apply() == (2, 7) and apply(return_features=True) == (2, 16)
  assert models.build('alexnet', num_classes=3).widths == (96, 256, 384, 384, 256)


def _method(data_dir, **overrides):
  config = _config(data_dir, **overrides)
  data = train.load_data(config)
  method = dc.METHOD.make(config, data)
  state = jax.jit(method.init)(jax.random.key(0))
  return config, data, method, state


@pytest.mark.parametrize('features', ['post_relu', 'pre_relu'])
def test_pseudo_labels_are_kmeans_assignments_of_whitened_features(data_dir, features):
  config, data, method, state = _method(data_dir, **{'deep_cluster.cluster_features': features})
  state = method.on_epoch_start(state, 0)
  # The reference: features in one call, numpy PCA whitening and L2 norm.
  x = augment.normalize(jnp.asarray(data.unlabeled_images, jnp.float32) / 255, data.mean,
                        data.std)
  own = (functools.partial(state.apply_fn, train=False, return_features=True)
         if features == 'post_relu' else
         functools.partial(heads.features_before_relu, state.apply_fn, train=False))
  f = np.asarray(jax.jit(own)({'params': state.params, 'batch_stats': state.batch_stats}, x),
                 np.float64)
  assert (f.min() < 0) == (features == 'pre_relu')  # before the ReLU, some are negative
  evals, evecs = np.linalg.eigh(np.cov(f, rowvar=False))
  top = np.argsort(evals)[::-1][:min(config.deep_cluster.pca_dim, f.shape[1])]
  assert len(top) < f.shape[1]  # the default reduces small_cnn's 128 features
  white = (f - f.mean(0)) @ evecs[:, top] / np.sqrt(np.maximum(evals[top], 0) + 1e-5)
  white /= np.linalg.norm(white, axis=1, keepdims=True)
  # k-means is sign-blind per axis (the PCA signs are a convention).
  ref = kmeans.kmeans(white.astype(np.float32), 10, num_iters=config.deep_cluster.kmeans_iters,
                      key=dc.kmeans_key(config.seed, 0), init=config.deep_cluster.kmeans_init,
                      n_init=config.deep_cluster.kmeans_n_init)
  labels = np.asarray(state.tables.labels)
  np.testing.assert_array_equal(labels, np.asarray(ref.assignments))
  # The sampling tables describe the same partition.
  t = jax.device_get(state.tables)
  np.testing.assert_array_equal(t.size, np.bincount(labels, minlength=10))
  np.testing.assert_array_equal(labels[t.order], np.sort(labels))
  np.testing.assert_array_equal(t.start, np.cumsum(t.size) - t.size)
  assert t.num_nonempty == np.count_nonzero(t.size)
  assert float(state.cluster_metrics['nonempty_clusters']) == t.num_nonempty
  assert np.isnan(state.cluster_metrics['nmi_previous'])
  # The next epoch compares with these labels.
  again = method.on_epoch_start(state, 1)
  assert float(again.cluster_metrics['nmi_previous']) == pytest.approx(
      metrics.normalized_mutual_info_score(labels, np.asarray(again.tables.labels)), rel=1e-6)


def test_bad_kmeans_head_and_feature_options_fail_at_build(data_dir):
  for overrides, match in (({'deep_cluster.kmeans_init': 'kmeans'}, 'deep_cluster.kmeans_init'),
                           ({'deep_cluster.kmeans_n_init': 0}, 'deep_cluster.kmeans_n_init'),
                           ({'deep_cluster.head_init': 'normal'},
                            "deep_cluster.head_init='normal' is unknown; use one of "
                            "'lecun_normal', 'normal_0.01'"),
                           ({'deep_cluster.head_optimizer': 'sgd'},
                            "deep_cluster.head_optimizer='sgd' is unknown"),
                           ({'deep_cluster.head_optimizer': 'plain_sgd', 'optimizer.name': 'adam'},
                            "head_optimizer='plain_sgd' needs optimizer.name='sgd'"),
                           ({'deep_cluster.cluster_features': 'fc7'},
                            "deep_cluster.cluster_features='fc7' is unknown"),
                           ({'deep_cluster.cluster_features': 'pre_relu',
                             'model.name': 'convlarge'},
                            "'convlarge' does not")):
    config = _config(data_dir, **overrides)
    with pytest.raises(UserError, match=re.escape(match)):
      dc.METHOD.make(config, train.load_data(config))


# The head options before the reference's became the default: Flax's initial
# weights, trained by the run's own optimiser.
_FLAX_SHARED_HEAD = {'deep_cluster.head_init': 'lecun_normal',
                     'deep_cluster.head_optimizer': 'shared'}


def test_epoch_start_resets_the_head_and_its_momentum_only(data_dir):
  _, _, method, state = _method(data_dir, **_FLAX_SHARED_HEAD)
  state = method.on_epoch_start(state, 0)
  batch = {'unlabeled_images': jnp.asarray(np.zeros((16, 8, 8, 1), np.uint8) + 40),
           'unlabeled_indices': jnp.arange(16)}
  state, _ = jax.jit(method.train_step)(state, batch, jax.random.key(0))
  trace = lambda s: s.opt_state[1][0].trace  # chain(decay, sgd): sgd's momentum
  assert np.any(np.asarray(trace(state)['head']['kernel']) != 0)
  new = method.on_epoch_start(state, 1)
  assert not np.allclose(new.params['head']['kernel'], state.params['head']['kernel'])
  np.testing.assert_array_equal(new.params['head']['bias'], 0)
  np.testing.assert_array_equal(trace(new)['head']['kernel'], 0)
  for name in state.params:
    if name != 'head':
      jax.tree.map(np.testing.assert_array_equal, new.params[name], state.params[name])
      jax.tree.map(np.testing.assert_array_equal, trace(new)[name], trace(state)[name])
  # Another epoch, another head; the same epoch again, the same head.
  other = method.on_epoch_start(state, 2)
  assert not np.allclose(other.params['head']['kernel'], new.params['head']['kernel'])
  np.testing.assert_array_equal(method.on_epoch_start(state, 1).params['head']['kernel'],
                                new.params['head']['kernel'])


def _todays_reset_head(state, key, **unused):
  """The head reset as it was before `head_init` and `head_optimizer` existed."""
  kernel = state.params['head']['kernel']
  head = nn.Dense(kernel.shape[1]).init(key, jnp.zeros((1, kernel.shape[0])))['params']
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[0], 'key', None) == 'head', state.params)
  opt_state = optax.tree_map_params(state.tx, lambda v, m: jnp.where(m, jnp.zeros_like(v), v),
                                    state.opt_state, mask)
  return state.replace(params={**state.params, 'head': head}, opt_state=opt_state)


def _trained_one_step(method, state):
  state = method.on_epoch_start(state, 0)
  batch = {'unlabeled_images': jnp.asarray(np.zeros((16, 8, 8, 1), np.uint8) + 40),
           'unlabeled_indices': jnp.arange(16)}
  return jax.jit(method.train_step)(state, batch, jax.random.key(0))[0]


def test_the_flax_shared_head_epoch_start_is_exactly_the_old_default(data_dir, monkeypatch):
  _, _, method, state = _method(data_dir, **_FLAX_SHARED_HEAD)
  state = _trained_one_step(method, state)
  new = method.on_epoch_start(state, 1)
  monkeypatch.setattr(dc, 'reset_head', _todays_reset_head)
  assert_trees_equal(new, method.on_epoch_start(state, 1))


def test_reference_head_init_draws_normal_0_01_weights_and_zero_bias(data_dir):
  _, _, method, state = _method(data_dir, **{'deep_cluster.head_init': 'normal_0.01'})
  key = jax.random.key(5)
  heads_drawn = {name: dc.reset_head(state, key, head_init=name).params['head']
                 for name in ('normal_0.01', 'lecun_normal')}
  kernel = np.asarray(heads_drawn['normal_0.01']['kernel'], np.float64)
  assert kernel.shape == (128, 10)  # small_cnn's features -> 10 clusters
  np.testing.assert_array_equal(heads_drawn['normal_0.01']['bias'], 0)
  # 1,280 draws: the sample std is 0.01 within ~2%, the mean 0 within ~3e-4.
  assert abs(kernel.std() - 0.01) < 1e-3 and abs(kernel.mean()) < 1e-3
  assert stats.kstest(kernel.ravel(), stats.norm(0, 0.01).cdf).pvalue > 1e-3
  # LeCun normal at fan-in 128 has std ~1/sqrt(128) ~ 0.088 (truncated): not this.
  assert np.asarray(heads_drawn['lecun_normal']['kernel']).std() > 0.05
  # The option reaches the epoch start: its head is of the same law.
  drawn = np.asarray(method.on_epoch_start(state, 0).params['head']['kernel'])
  assert abs(drawn.std() - 0.01) < 1e-3


def test_plain_sgd_head_has_no_momentum_and_the_network_keeps_its_own(data_dir):
  config, _, _, state = _method(data_dir, **{'deep_cluster.head_optimizer': 'plain_sgd'})
  shared = _method(data_dir)[3]
  lr, wd = config.optimizer.learning_rate, config.optimizer.weight_decay
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), state.params)
           for _ in range(3)]
  update = jax.jit(lambda tx_state, g, s: tx_state.tx.update(g, s, tx_state.params))
  plain_state, shared_state = state.opt_state, shared.opt_state
  for g in grads:
    plain, plain_state = update(state, g, plain_state)
    momentum, shared_state = update(shared, g, shared_state)
    # The head: SGD without memory, -lr (g + wd p) at every step ...
    for name in ('kernel', 'bias'):
      p = state.params['head'][name]
      np.testing.assert_allclose(plain['head'][name], -lr * (g['head'][name] + wd * p),
                                 rtol=1e-6, atol=1e-9)
    # ... the rest: the run's SGD with momentum, as with the shared optimiser.
    for name in state.params:
      if name != 'head':
        assert_trees_equal(plain[name], momentum[name])
  # The epoch start zeroes nothing of the network's momentum and keeps running.
  trained = _trained_one_step(dc.METHOD.make(config, train.load_data(config)), state)
  reset = dc.reset_head(trained, jax.random.key(1))
  assert_trees_equal(reset.opt_state, trained.opt_state)


@pytest.mark.parametrize('name,widths', [('alexnet', (4, 5, 6, 6, 5)), ('small_cnn', (4, 5, 6))])
def test_features_before_relu_are_the_features_without_the_last_relu(name, widths):
  options = {'fc_width': 16} if name == 'alexnet' else {}
  model = models.build(name, num_classes=7, widths=widths, **options)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  assert set(variables) == {'params', 'batch_stats'}  # init records nothing more
  assert heads.records_features_before_relu(model, x)

  @jax.jit
  def one_pass(variables, x):
    post, recorded = model.apply(variables, x, train=False, return_features=True,
                                 mutable=['intermediates'])
    return post, recorded['intermediates'][heads.FEATURES_BEFORE_RELU][0]

  post, pre = one_pass(variables, x)
  np.testing.assert_array_equal(
      pre, jax.jit(functools.partial(heads.features_before_relu, model.apply, train=False))(
          variables, x))
  assert pre.shape == post.shape == (3, widths[-1] if name == 'small_cnn' else 16)
  assert np.asarray(pre).min() < 0 < np.asarray(pre).max()
  if name == 'alexnet':  # fc7 before its ReLU, as DeepCluster's code clusters
    np.testing.assert_array_equal(jax.nn.relu(pre), post)
  else:  # the last stage's BatchNorm output, averaged: relu(mean) <= mean(relu)
    _, captured = jax.jit(functools.partial(model.apply, train=False, return_features=True,
                                            capture_intermediates=True,
                                            mutable=['intermediates']))(variables, x)
    bn = np.asarray(captured['intermediates'][f'BatchNorm_{len(widths) - 1}']['__call__'][0])
    np.testing.assert_allclose(pre, bn.mean(axis=(1, 2)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(post, np.maximum(bn, 0).mean(axis=(1, 2)), rtol=1e-6, atol=1e-7)
    assert np.all(np.maximum(pre, 0) <= post + 1e-7) and not np.allclose(np.maximum(pre, 0), post)


def test_tiny_run_reclusters_every_epoch_and_scores_both_probes(tmp_path, data_dir, monkeypatch):
  resets = []
  real = dc.reset_head
  monkeypatch.setattr(dc, 'reset_head', lambda state, key, **kw: (
      resets.append(int(state.step)), real(state, key, **kw))[1])
  results = train.train_and_evaluate(_config(data_dir), str(tmp_path))
  assert resets == [0, 4, 8]  # 12 steps, 4 per epoch
  written = json.loads((tmp_path / 'results.json').read_text())
  assert written == json.loads(json.dumps(results))
  assert set(written['models']) == {'linear_probe', 'random_net_probe'}
  assert written['top1'] == written['models']['linear_probe']['top1']
  for scores in written['models'].values():
    assert 10 < scores['top1'] <= scores['top5'] <= 100
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  train_lines = [l for l in lines if 'train/loss' in l]
  assert [l['step'] for l in train_lines] == [4, 8, 12]
  assert train_lines[0]['train/nmi_previous'] == 'nan'
  for l in train_lines:
    assert 0 < l['train/nmi_test_labels'] <= 1 and 1 <= l['train/nonempty_clusters'] <= 10
  assert all(0 < l['train/nmi_previous'] <= 1 for l in train_lines[1:])
  # --mode=probe scores the same features with the same probe; no export.
  record = evaluate.evaluate(str(tmp_path), with_probes=True)
  assert record['models'] == written['models']
  assert record['probes']['linear']['top1'] == written['models']['linear_probe']['top1']
  with pytest.raises(UserError, match='--mode=probe'):
    export.export(str(tmp_path), out=str(tmp_path / 'export'))


def test_the_default_clusters_before_the_last_relu_wherever_the_model_records_it():
  """configs/deep_cluster.py's PRE_RELU_MODELS are exactly the models that record it."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('dc_config', f'{ROOT}/configs/deep_cluster.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  x = jnp.zeros((1, 32, 32, 3))
  recording = tuple(name for name in models.NAMES
                    if heads.records_features_before_relu(models.build(name, num_classes=3), x))
  assert recording == module.PRE_RELU_MODELS
  for name in models.NAMES:
    expected = 'pre_relu' if name in recording else 'post_relu'
    assert config_of('deep_cluster', f'model={name}').deep_cluster.cluster_features == expected


_checkpointed = latest_checkpoint


@pytest.mark.parametrize('options', [{}, {'deep_cluster.head_init': 'normal_0.01',
                                           'deep_cluster.head_optimizer': 'plain_sgd',
                                           'deep_cluster.cluster_features': 'pre_relu'}])
def test_resume_across_an_epoch_boundary_equals_a_straight_run(tmp_path, data_dir, monkeypatch,
                                                               options):
  # Epochs start at steps 0, 4, 8; the run dies after its checkpoint at 6.
  config = _config(data_dir, **options)
  expected = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  train_until_first_checkpoint(config, tmp_path / 'resumed', monkeypatch)
  assert _checkpointed(str(tmp_path / 'resumed'))[0] == 6
  got = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert got['models'] == expected['models']
  (step_a, a), (step_b, b) = (_checkpointed(str(tmp_path / d)) for d in ('straight', 'resumed'))
  assert step_a == step_b == 12
  for field in ('params', 'batch_stats', 'opt_state', 'tables', 'cluster_metrics'):
    jax.tree.map(np.testing.assert_array_equal, a[field], b[field])
  shape = lambda d: [json.loads(l) for l in open(tmp_path / d / 'metrics.jsonl')]
  strip = lambda rows: [{k: v for k, v in r.items() if k != 'train/steps_per_s'} for r in rows]
  assert strip(shape('resumed')) == strip(shape('straight'))
