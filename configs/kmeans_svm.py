r"""Single-layer k-means centroid features + linear SVM (Coates, Lee & Ng 2011).

Run:
  python launch.py --config=configs/kmeans_svm.py --workdir=runs/kmeans_svm

On `digits` with 10 labels per class (5x5 patches, stride 1, 400 centroids,
50 k-means iterations on 100,000 patches) the SVM on the triangle features
is compared with hard assignment and with the same SVM on raw pixels with
the same labels.

`num_steps` is the number of k-means iterations. There is no network
(`model` stays 'none'). The run writes `centroids.npz` (centroids [K, d] in
whitened space, the ZCA mean and matrix, patch_shape (p, p, C); a centroid
reshapes to p x p x C) next to results.json, whose models are 'triangle'
(reported), 'hard' and 'raw_pixels'.

Presets (config string):
  configs/kmeans_svm.py:dataset=fashion_mnist
    7x7 patches of the 28x28 images, 1,600 centroids.
  configs/kmeans_svm.py:dataset=stl10,labels_per_class=100
    the report's recipe: 22x22 patches of the 96x96 images, 1,600
    centroids, stride 1 (heavy: 75x75 positions x 1,600 distances per image).

Results: docs/results.md; recipe and departures: docs/methods/kmeans_svm.md.
"""

from sslj import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg, labels_per_class='10', model='none')
  config = configlib.base_config('kmeans_svm', args)
  config.num_steps = 50  # k-means iterations

  config.kmeans_features = dict(
      patch_size=5,
      stride=1,              # between dense patches when encoding images
      num_centroids=400,
      num_patches=100_000,   # random patches of unlabeled images for ZCA + k-means
      normalize_eps=10.0,    # per-patch contrast normalisation, pixels in 0..255
      zca_eps=0.1,
      kmeans_init='k-means++',  # greedy (scikit-learn's); 'k-means++-plain', 'random'
      kmeans_n_init=1,          # k-means runs, the least inertia kept (Coates: one)
      svm_c=0.01,            # LinearSVC C on standardised features
      standardize='train',   # SVM features scaled by every training image's statistics, as
                             # Coates et al. ('labeled': the labeled images' own)
      chunk_mb=256.0,        # memory budget of one feature-extraction call
  )

  if args.dataset == 'fashion_mnist':
    config.kmeans_features.update(patch_size=7, num_centroids=1600)
  elif args.dataset in ('stl10', 'cifar10') or args.dataset.startswith(('image_folder', 'tfds:')):
    big = args.dataset != 'cifar10'
    config.kmeans_features.update(patch_size=22 if big else 6, num_centroids=1600,
                                  num_patches=400_000, chunk_mb=1024.0)
  config.lock()
  return config
