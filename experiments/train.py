r"""Trains a model from a config.

  python -m experiments.train --config=configs/cifar10.py:cifar_resnet20 \
    --workdir=runs/r20 [--config.FIELD=VALUE ...]

Restarting the same command on the same workdir resumes the run.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and argument, e.g. configs/cifar10.py:MODEL.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (resumed if it '
                               'holds a run).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from cnn.training import loop  # pylint: disable=g-import-not-at-top
  common.run(loop.train_and_evaluate, _CONFIG.value, _WORKDIR.value)

if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags)
