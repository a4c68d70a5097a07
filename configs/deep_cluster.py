r"""DeepCluster: k-means pseudo-labels of the network's own features (Caron et al. 2018).

Run:
  python launch.py --config=configs/deep_cluster.py --workdir=runs/deep_cluster

On `digits` (small CNN, k=10 clusters of the 1,247 unlabeled images, PCA
whitening to 32 dimensions, an epoch = one pass over the pool = 20 steps of
64, 40 epochs = 800 steps; the linear probe fit on 10 labels per class) the
linear probe on the trained network's features should end above the same
probe on a random network's features, the floor.

results.json's models are 'linear_probe' (reported) and 'random_net_probe';
they are scored after training by the method's `finalize` (the network's
head predicts clusters, not the test classes, so there is no evaluation
during training). metrics.jsonl carries `train/nmi_previous`,
`train/nmi_test_labels` and `train/nonempty_clusters` of the current epoch.

Presets (config string):
  configs/deep_cluster.py:dataset=fashion_mnist,labels_per_class=10
    CPU-sized: k=30, an epoch is 400 steps of 64 (`deep_cluster.steps_per_epoch`)
    rather than a pass over the 59,900-image pool, 8 epochs; the whole pool
    is still clustered before every epoch.
  configs/deep_cluster.py:dataset=stl10,model=alexnet
    the report's setting: AlexNet with BatchNorm and the Sobel front end on
    STL-10's 96x96 images (train + unlabeled pool), k=1,000, one epoch = one
    pass over the pool, batch 256, SGD at 0.05 with momentum 0.9 and weight
    decay 1e-5 as in the paper, random resized crops and flips. The paper
    trains on ImageNet for 500 epochs with k=10,000, ~128 images per
    cluster; k=1,000 of STL-10's 105,000 pool images is ~105 per cluster.
    100 epochs here are a budget, not the paper's; not run on these machines.

Choices for small networks (docs/methods/deep_cluster.md says why):
  k: the paper's ratio is ~128 images per cluster (1.28M / 10,000); on the
    1,247 digits k=10 gives that. A larger k leaves the re-initialised head
    unable to fit the clusters in a 20-step epoch.
  pca_dim: the paper keeps 256 of AlexNet's 4,096 fc7 dimensions. small_cnn
    has only 128 features, and whitening all of them raises the noisiest
    directions to unit variance, so 32 are kept. The STL-10 AlexNet preset
    keeps the paper's 256.

Results: docs/results.md; recipe and departures: docs/methods/deep_cluster.md.
"""

from sslj import configlib

# The models that record their features before the last ReLU
# (`heads.record_features_before_relu`), where DeepCluster clusters by default.
PRE_RELU_MODELS = ('small_cnn', 'alexnet')


def get_config(arg=None):
  args = configlib.parse_arg(arg, labels_per_class='10')
  config = configlib.base_config('deep_cluster', args)
  config.num_epochs = 40.0     # epochs of clustering + training; num_steps follows in code
  config.batch_size = 64
  config.eval_every = 0        # no test-class logits: finalize scores the probes
  config.log_every = 20
  config.checkpoint_every = 200
  config.optimizer.update(learning_rate=0.05, momentum=0.9, nesterov=False,
                          weight_decay=1e-5, schedule='constant')

  config.deep_cluster = dict(
      num_clusters=10,         # k (see the note on k below)
      steps_per_epoch=0,       # 0: one pass over the unlabeled pool
      pca_dim=32,              # whitened to min(pca_dim, feature size); see the note
      kmeans_iters=20,         # Lloyd iterations per clustering
      kmeans_init='k-means++',  # greedy k-means++; 'random' is faiss's (the reference's)
      kmeans_n_init=1,         # best of this many k-means runs (faiss's nredo = 1)
      sobel=False,             # grayscale + Sobel filters in front of the network
      probe_c=1.0,             # inverse L2 strength of the linear probe
      standardize='train',     # probe features scaled by every training image's statistics
                               # ('labeled': the labeled images' own)
      # As the reference code (sslj/methods/deep_cluster.py's docstring: measured):
      head_init='normal_0.01',   # re-drawn head's weights N(0, 0.01^2); 'lecun_normal': Flax's
      head_optimizer='plain_sgd',  # its own momentum-free SGD; 'shared': the run's optimiser
      # k-means on the features before the last ReLU, as the reference, where the
      # model records them (PRE_RELU_MODELS); 'post_relu': the model's own features.
      cluster_features='pre_relu' if args.model in PRE_RELU_MODELS else 'post_relu',
  )

  if args.dataset == 'fashion_mnist':
    config.num_epochs = 8.0
    config.deep_cluster.update(num_clusters=30, steps_per_epoch=400)
    config.eval_batch_size = 1000
    config.log_every = 50
    config.checkpoint_every = 800
  elif args.dataset == 'stl10' or args.dataset.startswith('image_folder'):
    config.num_epochs = 100.0
    config.batch_size = 256
    config.checkpoint_every = 2000
    config.log_every = 100
    config.deep_cluster.update(num_clusters=1000, sobel=True, pca_dim=256)
    config.augment.update(pad_crop=0, crop_scale=(0.08, 1.0))
  config.lock()
  return config
