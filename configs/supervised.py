r"""Supervised baseline: the network trained on the labeled images only.

Run:
  python launch.py --config=configs/supervised.py --workdir=runs/supervised

The default trains the small CNN on `digits` with every label for 1,500
steps of 64; `:labels_per_class=N` keeps N labels per class, the baseline of
the semi-supervised methods on the same labels. On `fashion_mnist` the run
is 6,000 steps of 128.

Presets (config string):
  configs/supervised.py:dataset=fashion_mnist,labels_per_class=10
  configs/supervised.py:labels_per_class=5,model=dcgan_discriminator
    the baseline of configs/ssl_gan.py: its discriminator and its Adam (beta1
    0.5; a constant 0.003, 3e-4 with a cosine decay on CIFAR-10).
  configs/supervised.py:dataset=stl10,labels_per_class=64,model=resnet152
    the reports' baseline: SGD, 90 epochs, batch 32, images resized to 224.

--config.supervised.ema_decay=0.999 also keeps and reports a parameter
average (`ema`), as USB's supervised baseline does.

Results: docs/results.md; recipe and departures: docs/methods/supervised.md.
"""

from sslj import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  config = configlib.base_config('supervised', args)
  config.num_steps = 1500
  config.batch_size = 64
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  config.supervised = dict(
      ema_decay=0.0,   # > 0: also keep and report a parameter average (USB's baseline: 0.999)
  )

  if args.dataset == 'fashion_mnist':
    config.num_steps = 6000
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.log_every = 200
    config.eval_every = 1000
    config.checkpoint_every = 1000

  if args.model == 'dcgan_discriminator':
    # The semi-supervised GAN's classifier trained on the labels alone, with
    # the GAN's optimiser (configs/ssl_gan.py): the baseline it must beat.
    config.optimizer.update(configlib.gan_optimizer(args.dataset))

  if args.model.startswith('resnet') and (args.dataset == 'stl10' or args.dataset.startswith('image_folder')):
    # The reports' ResNet-152 baseline: SGD, 90 epochs, batch 32.
    config.num_epochs = 90.0
    config.batch_size = 32
    config.optimizer.learning_rate = 0.01
    config.optimizer.weight_decay = 1e-4
    config.augment.rotate_deg = 10.0
    if args.model == 'resnet152':
      config.augment.out_size = 224
  config.lock()
  return config
