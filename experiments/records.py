r"""Keeps a finished run's records in the repository.

  python -m experiments.records --run=runs/plain_vs_resnet_fig6/resnet20_s0 \
    --study=plain_vs_resnet_fig6 [--member=resnet20_s0] [--unfinished] \
    [--replace]

copies metrics.jsonl, config.json and provenance.json (numerics.json where
present; never checkpoints) into results/STUDY/runs/MEMBER/ (MEMBER defaults
to the run folder's name). The study's table and figure then rebuild from the
repository alone:

  python -m experiments.plot --workdir=results/STUDY/runs \
    --out=results/STUDY
"""
import os

from absl import app
from absl import flags

from experiments import common

_RUN = flags.DEFINE_string('run', None, 'A finished run folder.')
_STUDY = flags.DEFINE_string('study', None, 'The study: results/STUDY/.')
_MEMBER = flags.DEFINE_string('member', None, "The member's name (default: "
                              "the run folder's name).")
_RESULTS = flags.DEFINE_string('results', 'results', 'The results folder.')
_UNFINISHED = flags.DEFINE_bool('unfinished', False, 'Keep a run that has '
                                'not reached its num_train_steps.')
_REPLACE = flags.DEFINE_bool('replace', False, 'Overwrite other records '
                             'kept under the same name.')
flags.mark_flags_as_required(['run', 'study'])


def _keep():
  from cnn.tools import records  # pylint: disable=g-import-not-at-top
  member = _MEMBER.value or os.path.basename(os.path.normpath(_RUN.value))
  dest = os.path.join(_RESULTS.value, _STUDY.value, 'runs', member)
  for path in records.keep(_RUN.value, dest, unfinished=_UNFINISHED.value,
                           replace=_REPLACE.value):
    print(f'kept {path}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.run(_keep)


if __name__ == '__main__':
  common.main(main)
