r"""K-means pseudo-labels: clusters named by their labeled members as targets.

Run:
  python launch.py --config=configs/kmeans_pseudo_label.py --workdir=runs/kmeans_pseudo_label

The default trains the small CNN on `digits` with 5 labels per class for
3,000 steps of 16 labeled + 7 x 16 unlabeled images. Before the first step
all 1,347 training images are described by single-layer k-means triangle
features (5x5 patches, 200 centroids), PCA-whitened to 64 dimensions,
clustered into 50 clusters, and each cluster named by the majority of the 50
labeled images in it; unnamed clusters give no target. It should end above
the supervised baseline on the same labels (configs/supervised.py:labels_per_class=5).

`kmeans_pseudo_label.source` picks the features: 'kmeans_features' (the
default), 'pixels', or 'network' (the network being trained, re-clustered
every `refresh_epochs` epochs after `warmup_epochs` on the labels alone).

Presets (config string):
  configs/kmeans_pseudo_label.py:dataset=fashion_mnist,labels_per_class=10
    7x7 patches, 400 centroids; 200 clusters of the 60,000 images, to be
    compared with the supervised baseline on the same labels.

Results: docs/results.md; recipe and departures: docs/methods/kmeans_pseudo_label.md.
"""

from sslj import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg, labels_per_class='5')
  config = configlib.base_config('kmeans_pseudo_label', args)
  config.num_steps = 3000
  config.batch_size = 16        # labeled images per step
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500

  config.kmeans_pseudo_label = dict(
      source='kmeans_features',  # 'kmeans_features', 'pixels' or 'network'
      mu=7,                      # unlabeled images per labeled image
      weight=1.0,                # of the unlabeled images' cross-entropy
      num_clusters=50,
      pca_dim=64,                # whitened to min(pca_dim, feature size)
      kmeans_iters=30,           # Lloyd iterations of each clustering
      kmeans_n_init=1,           # k-means runs per clustering, the least inertia kept
      refresh_epochs=5,          # 'network': re-cluster every this many epochs ...
      warmup_epochs=5,           # ... after this many on the labels alone
      patch_size=5,              # 'kmeans_features': the single-layer encoder
      num_centroids=200,
      num_patches=50_000,
  )

  if args.dataset == 'fashion_mnist':
    config.num_steps = 4000
    config.eval_batch_size = 1000
    config.checkpoint_every = 1000
    config.kmeans_pseudo_label.update(num_clusters=200, patch_size=7, num_centroids=400,
                                      num_patches=100_000)
  config.lock()
  return config
