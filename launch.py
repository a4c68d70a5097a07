r"""Runs one sslj experiment.

  python launch.py --config=configs/mean_teacher.py --workdir=runs/mt
  python launch.py --config=configs/supervised.py:dataset=fashion_mnist,labels_per_class=10 \
      --workdir=runs/sup --config.num_steps=2000

Starting the same command again in the same workdir resumes from the last
checkpoint. Use a run (its config comes from DIR/config.json):

  python launch.py --mode=eval --workdir=runs/mt [--step=N] [--split=train] [--dataset=NAME]
  python launch.py --mode=probe --workdir=runs/mt      # eval + linear and kNN probes
  python launch.py --mode=predict --workdir=runs/mt --images=my_images/
  python launch.py --mode=export --workdir=runs/mt     # then sslj.load('runs/mt/export')
  python launch.py --mode=viz --workdir=runs/mt        # pictures: runs/mt/pictures/index.html

Config files are Python and run as code: only use ones you trust.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/supervised.py[:key=value,...].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'probe', 'predict', 'export', 'viz'],
                          'What to do with the run: train it, or use it (see sslj/use).')
_STEP = flags.DEFINE_integer('step', None, 'eval/probe/predict/export: checkpoint step (default: latest).')
_SPLIT = flags.DEFINE_string('split', None, 'eval/probe: test (default), train or labeled.')
_DATASET = flags.DEFINE_string('dataset', None, "eval/probe: a dataset with the run's classes (default: the run's).")
_IMAGES = flags.DEFINE_string('images', None, 'predict: a folder of images (recursive) or a text file of image paths.')
_OUT = flags.DEFINE_string('out', None, 'predict: CSV path (default DIR/predictions.csv); export: folder (default DIR/export).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a multi-host run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process in a multi-host run.')


def main(argv):
  del argv
  from sslj import cli
  try:
    config = _CONFIG.value
    getattr(config, 'method', None)  # a lazy config file is loaded on first use
  except OSError as e:  # a config file that is missing or cannot be read
    cli.config_unreadable(e)
  return cli.run(config=config, workdir=_WORKDIR.value, mode=_MODE.value,
                 coordinator_address=_COORDINATOR.value,
                 num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                 step=_STEP.value, split=_SPLIT.value, dataset=_DATASET.value,
                 images=_IMAGES.value, out=_OUT.value)


if __name__ == '__main__':
  from sslj import cli
  app.run(main, flags_parser=cli.parse_flags)
