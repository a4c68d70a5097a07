r"""Pi-model (Laine & Aila 2017, Sec. 2.1).

Run:
  python launch.py --config=configs/pi_model.py --workdir=runs/pi

It should end above the supervised baseline on the same 50 labels
(configs/supervised.py:labels_per_class=5), trained with this config's
dropout (--config.model.dropout_rate=0.5) or without: the gain is meant to be
the consistency cost's, not dropout's.

The default trains the small CNN on `digits` with 5 labels per class (50
labeled images, the other 1,297 training images unlabeled): 1,500 steps of
16 labeled + 48 unlabeled images, each image through the network twice.
Dropout 0.5 before the head is on (small_cnn has none by default) so that
the two passes differ by dropout as well as by the 1-pixel pad-and-crop.

The consistency weight is the paper's w_max = 100 *before* the code's
factor M/N (the labeled fraction): the class loss here is a mean over the
labeled images, not over the whole batch, so the code's loss is this one
times M/N (sslj/methods/pi_model.py). The ramp-up spans 15 of the run's ~54
epochs (an epoch: one pass over the unlabeled pool), about the paper's 80
of 300.

Presets (config string):
  configs/pi_model.py:dataset=fashion_mnist,labels_per_class=10
    FixMatch's Fashion-MNIST budget: 3,000 steps of 8 labeled + 56
    unlabeled images (64 a step, each through the network twice),
    ramp-up over 1 epoch (one pass over the ~59,900 unlabeled images is
    1,070 steps).
  configs/pi_model.py:dataset=cifar10,labels_per_class=400
    4,000 labels on WRN-28-2 (`wrn28_2`) with USB's Pi-model recipe for
    that network (config/classic_cv/pimodel/pimodel_cifar10_4000_0.yaml):
    64 labeled + 64 unlabeled images a step, consistency weight 10 on the
    unlabeled images only with the second pass a constant target, SGD
    (Nesterov 0.9, lr 0.03, weight decay 5e-4 on the kernels) with the cosine
    cos(7 pi k / 16 K), no input noise and no dropout (the two passes
    differ by flips and 4-pixel translations). The ramp-up and the length
    are the paper's: the Gaussian ramp-up over 80 of 300 epochs (passes
    over the unlabeled pool, 719 steps each, so 216k steps), where USB
    ramps linearly over 40% of 2^20 steps. The paper's own setting
    (ConvLarge with dropout 0.5, weight 100 on every image, gradient
    through both passes, Gaussian input noise 0.15, batch 100, Adam):
    model=convlarge with --config.batch_size=100
    --config.pi_model.labeled_batch_size=50
    --config.pi_model.consistency_weight=100
    --config.pi_model.consistency_on=all --config.pi_model.stop_gradient=False
    --config.augment.noise_std=0.15. USB's weight is 10, not the paper's
    100, because it trains with SGD, whose steps grow with the loss, where
    the paper's Adam normalises them.

Results: docs/results.md; recipe and departures: docs/methods/pi_model.md.
"""

from sslj import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg, configlib.WRN_BENCHMARK_MODELS, labels_per_class='5')
  config = configlib.base_config('pi_model', args)
  # USB's weight decay, which skips BatchNorm parameters and biases (the authors'
  # Adam has none): level with decay on every parameter on Fashion-MNIST.
  config.optimizer.decay = 'kernels'
  config.num_steps = 1500
  config.batch_size = 64
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  config.model.dropout_rate = 0.5

  config.pi_model = dict(
      labeled_batch_size=16,        # the rest of batch_size is unlabeled
      consistency_weight=100.0,     # w_max, MSE averaged over classes (see docstring)
      rampup_epochs=15.0,           # Gaussian ramp-up exp(-5 (1 - t)^2)
      consistency_on='all',         # 'all' images (the paper) or 'unlabeled' (USB)
      stop_gradient=False,          # True: no gradient through the second pass (USB)
  )

  if args.dataset == 'fashion_mnist':
    config.num_steps = 3000
    config.pi_model.labeled_batch_size = 8
    config.eval_batch_size = 1000
    config.eval_every = 500
    config.checkpoint_every = 1000
    config.pi_model.rampup_epochs = 1.0

  if args.dataset == 'cifar10':
    config.num_epochs = 300.0            # the paper's run, in passes over the unlabeled pool
    config.batch_size = 128
    config.pi_model.update(labeled_batch_size=64, consistency_weight=10.0,  # USB
                           consistency_on='unlabeled', stop_gradient=True,
                           rampup_epochs=80.0)                              # the paper
    config.model.dropout_rate = 0.0      # the model's own: none in WRN-28-2
    config.optimizer.update(**configlib.USB_SGD)
    config.eval_batch_size = 1000
    config.log_every = 1000
    config.eval_every = 10000
    config.checkpoint_every = 10000
  config.lock()
  return config
