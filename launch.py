r"""Runs one sslj experiment.

  python launch.py --config=configs/mean_teacher.py --workdir=runs/mt
  python launch.py --config=configs/supervised.py:dataset=fashion_mnist,labels_per_class=10 \
      --workdir=runs/sup --config.num_steps=2000

Starting the same command again in the same workdir resumes from the last
checkpoint. Config files are Python and run as code: only use ones you trust.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/supervised.py[:key=value,...].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train'], 'What to do with the run.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a multi-host run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process in a multi-host run.')


def main(argv):
  del argv
  from sslj import cli
  return cli.run(config=_CONFIG.value, workdir=_WORKDIR.value, mode=_MODE.value,
                 coordinator_address=_COORDINATOR.value,
                 num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


if __name__ == '__main__':
  from sslj import cli
  app.run(main, flags_parser=cli.parse_flags)
