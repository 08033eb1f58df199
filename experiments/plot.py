r"""Draws a sweep's figures and table from its run folders.

  python -m experiments.plot --workdir=runs/plain_vs_resnet_cpu [--out=DIR] \
    [--dpi=80] [--only=REGEX] [--filters_run=NAME] [--checkpoint=latest]

Writes into `--out` (default: the workdir):
  figure6.png      He et al. Figure 6: plain nets left, ResNets right,
                   dashed training error, bold test error, one colour per depth.
  table6.md        depth, parameters, final/best test error (mean ± std over
                   seeds) beside the paper's Table 6 (also printed).
  lr_<run>.png     the learning rate over iterations, one per run.
  filters.png      the first conv layer's filters of a trained checkpoint
                   (by default of the deepest ResNet).
Works on a sweep still running: it plots what has been logged.
"""
import sys

from absl import app
from absl import flags
from absl import logging

from experiments import common

_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep folder (one subfolder '
                               'per run).')
_OUT = flags.DEFINE_string('out', None, 'Output folder (default: --workdir).')
_DPI = flags.DEFINE_integer('dpi', 80, 'Resolution of the PNGs.')
_ONLY = flags.DEFINE_string('only', None, 'Plot only runs whose name matches '
                            'this regular expression.')
_FILTERS_RUN = flags.DEFINE_string('filters_run', None, 'Run whose first '
                                   'conv filters to draw (default: the '
                                   'deepest ResNet with a checkpoint).')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest', 'Checkpoint of '
                                  'that run: latest, best or a step.')
flags.mark_flags_as_required(['workdir'])


def _plot():
  from cnn.tools import plotting  # pylint: disable=g-import-not-at-top
  if '--verbosity' not in ' '.join(sys.argv):
    # Orbax warns that a read-only checkpoint folder is read-only.
    logging.set_verbosity(logging.ERROR)
  written, table = plotting.write_all(
      _WORKDIR.value, _OUT.value, dpi=_DPI.value,
      filters_run=_FILTERS_RUN.value, checkpoint=_CHECKPOINT.value,
      only=_ONLY.value)
  print(table, end='')
  for path in written:
    print(f'wrote {path}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.run(_plot)


if __name__ == '__main__':
  common.main(main)
