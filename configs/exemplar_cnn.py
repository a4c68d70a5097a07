r"""Exemplar-CNN surrogate classes + linear SVM (Dosovitskiy et al. 2014).

Run:
  python launch.py --config=configs/exemplar_cnn.py --workdir=runs/exemplar_cnn

On `digits` with 10 labels per class (1,000 seed images, the whole 8x8 image
as the patch, 64c5-64c5-128f, 1,000 steps of 128, SGD at 0.1 and no dropout,
chosen for this short run; the STL-10 preset keeps the paper's dropout of
0.5) the SVM on the trained network's features should end above the same
SVM on a random network's features and the SVM on raw pixels with the same
labels (configs/kmeans_svm.py's 'raw_pixels').

results.json's models are 'exemplar_svm' (reported) and 'random_net_svm';
they are scored after training by the method's `finalize` (the network has
no logits for the test classes, so there is no evaluation during training).

Presets (config string):
  configs/exemplar_cnn.py:dataset=fashion_mnist
    sized for a CPU as digits: 1,000 seeds, 28x28 (whole image) patches,
    no dropout, 3,000 steps of 128.
  configs/exemplar_cnn.py:dataset=stl10,labels_per_class=100,model=exemplar_large
    the paper's setting: 4,000 seed patches of 32x32 from the 96x96
    unlabeled images, features of the whole 96x96 images.

Results: docs/results.md; recipe and departures: docs/methods/exemplar_cnn.md.
"""

from ml_collections import config_dict

from sslj import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg, labels_per_class='10', model='exemplar_small')
  config = configlib.base_config('exemplar_cnn', args)
  config.num_steps = 1000
  config.batch_size = 128
  config.eval_every = 0        # no test-class logits: finalize scores the SVMs
  config.log_every = 100
  config.checkpoint_every = 1000
  config.optimizer.update(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          schedule='cosine')

  config.exemplar = dict(
      num_seeds=1000,          # surrogate classes: one seed patch from each of N images
      patch_size=config_dict.placeholder(int),  # None: the whole image
      dropout_rate=0.0,        # on the fully connected layer (the paper's 0.5 below)
      svm_c=0.01,              # LinearSVC C on standardised features
      standardize='train',     # SVM features scaled by every training image's statistics
                               # ('labeled': the labeled images' own)
  )
  # The surrogate transformations (fields of sslj.data.augment.AugmentSpec).
  config.augment.update(flip=False, pad_crop=0, rotate_deg=20.0, translate=0.1,
                        scale=(0.7, 1.4), brightness=0.1, contrast=0.5, saturation=0.5,
                        hue=0.1)

  if args.dataset == 'fashion_mnist':
    # Sized for a CPU, as digits: 1,000 surrogate classes without dropout.
    # With the paper's 4,000 classes and dropout 0.5 at lr 0.1 the loss sat
    # at log(4,000) for 1,400+ steps (one seed in three never left it).
    config.num_steps = 3000
    config.exemplar.update(num_seeds=1000, dropout_rate=0.0)
  elif args.dataset == 'stl10' or args.dataset.startswith('image_folder'):
    # The paper's setting; the seed table (4,000 x 96 x 96 x 3 bytes) is part
    # of every checkpoint, so checkpoints are rare.
    config.num_steps = 150000
    config.exemplar.update(num_seeds=4000, patch_size=32, dropout_rate=0.5)
    config.optimizer.learning_rate = 0.01
    config.checkpoint_every = 10000
  config.lock()
  return config
