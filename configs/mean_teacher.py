r"""Mean Teacher (Tarvainen & Valpola 2017).

Run:
  python launch.py --config=configs/mean_teacher.py --workdir=runs/mean_teacher

The default trains the small CNN on `digits` with 5 labels per class (50
labeled images, the other 1,297 training images unlabeled) for 3,000 steps;
the teacher should end above the supervised baseline trained on the same 50
labels (configs/supervised.py:labels_per_class=5).

The digits and Fashion-MNIST presets keep the learning rate constant, a
departure from the original code, which ramps it down over the last part of
training. The teacher is an average of the student's recent weights; with a
learning rate annealed to (nearly) zero the student stops moving, the
average of a still student is that student, and the two end level. At a
constant rate the student keeps moving and the teacher ends ahead of it,
with a teacher as good or better (docs/methods/mean_teacher.md).

Presets (config string):
  configs/mean_teacher.py:dataset=fashion_mnist,labels_per_class=10
    4,000 steps of 16 labeled + 48 unlabeled images, consistency ramp-up
    over one epoch, EMA 0.99 during it and 0.999 after, Gaussian input
    noise 0.15 and dropout 0.5 (as the paper).
  configs/mean_teacher.py:dataset=stl10,labels_per_class=64,model=resnet152
    the report's recipe: SGD Nesterov 0.9, lr 0.02, weight decay 1e-4, cosine
    annealing, EMA 0.999, KL consistency, logit distance 0.01, 90 epochs.
    Without `model=` the network is the FixMatch code's WRN-37-2 (`wrn37_2`).
  configs/mean_teacher.py:dataset=cifar10,labels_per_class=100,model=convlarge
    the paper's CIFAR-10 recipe: batch 100 with 50 labeled, MSE consistency
    weight 100 ramped up over 5 epochs, logit distance 0.01, Gaussian input
    noise 0.15, and the EMA decay and length of the reference code's
    `experiments/cifar10_test.py`: 0.99 and 300 epochs from 400 labels per
    class up (its 4,000-label runs), 0.97 and 180 epochs below (its 1,000-label
    runs). Its cosine rate ramps down over 210 (350) epochs and stops at 180
    (300); ours reaches zero at the last step. Without `model=` the same
    recipe trains the FixMatch code's WRN-28-2 (`wrn28_2`).

Results: docs/results.md; recipe and departures: docs/methods/mean_teacher.md.
"""

from ml_collections import config_dict

from sslj import configlib
from sslj.data import randaugment


def get_config(arg=None):
  args = configlib.parse_arg(arg, configlib.WRN_BENCHMARK_MODELS, labels_per_class='5')
  config = configlib.base_config('mean_teacher', args)
  config.num_steps = 3000
  config.batch_size = 128
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  config.optimizer.update(learning_rate=0.05, schedule='constant')

  config.mean_teacher = dict(
      labeled_batch_size=32,     # the rest of batch_size is unlabeled
      ema_decay=0.99,
      # The teacher's decay during the consistency ramp-up (None: ema_decay);
      # the paper used 0.99 there and 0.999 after.
      ema_decay_rampup=config_dict.placeholder(float),
      consistency='mse',         # 'mse' (softmax MSE / K) or 'kl'
      consistency_weight=30.0,
      rampup_epochs=30.0,        # sigmoid ramp-up of the consistency weight
      logit_distance_cost=0.01,  # > 0: two heads tied by this cost (dual output)
      # The class loss: 'labeled' = mean cross-entropy over the labeled images;
      # 'batch' = their sum divided by the whole batch (the reference codes).
      class_loss_over='labeled',
      # The consistency ramp-up's epoch: 'step' = fractional, moving every step
      # (the TensorFlow code); 'epoch' = whole epochs (the PyTorch code).
      rampup_granularity='step',
      # The student's view of the unlabeled images: 'weak' (the paper: the
      # same augmentation as the teacher's, drawn independently) or 'strong'
      # (the weak view, then RandAugment + Cutout with the fields below, as
      # FixMatch's strong view; a departure, sslj/methods/mean_teacher.py).
      student_view='weak',
      **randaugment.strong_view_fields(),
  )

  if args.dataset == 'fashion_mnist':
    # Sized for a CPU: 4,000 steps of 16 labeled + 48 unlabeled images
    # (about 3 passes over the 59,900 unlabeled images).
    config.num_steps = 4000
    config.batch_size = 64
    config.mean_teacher.labeled_batch_size = 16
    config.eval_batch_size = 1000
    config.eval_every = 500
    config.checkpoint_every = 1000
    config.mean_teacher.rampup_epochs = 1.0
    # As the paper: EMA 0.99 during the ramp-up, 0.999 after.
    config.mean_teacher.update(ema_decay=0.999, ema_decay_rampup=0.99)
    # The paper's and its code's noise: Gaussian input noise 0.15 and dropout
    # 0.5, drawn independently for the student and the teacher.
    config.augment.noise_std = 0.15
    config.model.dropout_rate = 0.5

  if args.dataset == 'stl10' or args.dataset.startswith('image_folder'):
    # The report's recipe.
    config.num_epochs = 90.0
    config.batch_size = 64
    config.mean_teacher.labeled_batch_size = 16
    config.optimizer.update(learning_rate=0.02, momentum=0.9, nesterov=True,
                            weight_decay=1e-4, schedule='cosine')
    config.mean_teacher.update(ema_decay=0.999, consistency='kl', consistency_weight=1.0,
                               rampup_epochs=5.0, logit_distance_cost=0.01)
    config.augment.rotate_deg = 10.0
    if args.model == 'resnet152':
      config.augment.out_size = 224

  if args.dataset == 'cifar10':
    # The paper's CIFAR-10 recipe (ConvLarge, the 13-layer CNN).
    budget = args.labels_per_class
    many = budget is None or budget >= 400  # the reference's 4,000-label runs
    config.num_epochs = 300.0 if many else 180.0
    config.batch_size = 100
    config.mean_teacher.labeled_batch_size = 50
    config.optimizer.update(learning_rate=0.05, weight_decay=2e-4, nesterov=True,
                            schedule='cosine')
    config.mean_teacher.update(
        ema_decay=0.99 if many else 0.97,
        consistency='mse', consistency_weight=100.0, rampup_epochs=5.0,
        logit_distance_cost=0.01)
    config.augment.noise_std = 0.15  # the paper's Gaussian input noise
  config.lock()
  return config
