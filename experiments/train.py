r"""Trains a model from a config.

  python -m experiments.train --config=configs/cifar10.py:cifar_resnet20 \
    --workdir=runs/r20 [--config.FIELD=VALUE ...]

Restarting the same command on the same workdir resumes the run.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from cnn.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and argument, e.g. configs/cifar10.py:MODEL.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (resumed if it '
                               'holds a run).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from cnn import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
