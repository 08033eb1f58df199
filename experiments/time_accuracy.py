r"""Test error against wall-clock minutes and epochs for one run.

  python -m experiments.time_accuracy --workdir=runs/r20_fast \
    [--out=DIR] [--paper=8.75] [--paper_label='He et al. 2015'] [--goal=1.5] \
    [--mark='1.5-epoch study,6.6,1.54,40.56']
  python -m experiments.time_accuracy --workdir=runs/a,runs/b --out=DIR \
    --paper=-1 --goal=-1      # several runs, one colour each

Writes DIR/time_accuracy.png (error against minutes, left, and epochs,
right; log scale: test error bold, top-5 test error dash-dotted where the
run has it, the training error on augmented batches thin dashed; the
paper's figure dashed black, the goal of paper + 1.5 dotted, each --mark a
square) and DIR/time_accuracy.md (the table of each run, also printed);
DIR defaults to the (first) workdir. The minutes are the run's own clock,
with the gaps between sittings left out (`cnn.tools.time_accuracy`). Works
on a run still training: it draws what has been evaluated.
"""
import os

from absl import app
from absl import flags

from experiments import common

_WORKDIR = flags.DEFINE_list('workdir', None, 'Classification run folders, '
                             'comma-separated.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (default: --workdir).')
_PAPER = flags.DEFINE_float('paper', 8.75, "The paper's test error in %; "
                            'negative: none.')
_PAPER_LABEL = flags.DEFINE_string('paper_label', 'He et al. 2015',
                                   "Whose figure --paper is.")
_GOAL = flags.DEFINE_float('goal', 1.5, 'Goal line this many points above '
                           '--paper; negative: none.')
_MARKS = flags.DEFINE_multi_string('mark', [], "Reference points: 'label,"
                                   "minutes,epochs,error %'.")
_SPLIT = flags.DEFINE_string('split', 'test', 'Held-out split to draw.')
_DPI = flags.DEFINE_integer('dpi', 90, 'Resolution of the PNG.')
flags.mark_flags_as_required(['workdir'])


def _marks(specs):
  from cnn.errors import ConfigError  # pylint: disable=g-import-not-at-top
  marks = []
  for spec in specs:
    parts = spec.rsplit(',', 3)
    try:
      marks.append((parts[0], *map(float, parts[1:])))
    except (ValueError, TypeError, IndexError):
      raise ConfigError(f"--mark='{spec}' must be 'label,minutes,epochs,"
                        "error %', e.g. '1.5-epoch study,6.6,1.54,40.56'"
                        ) from None
    if len(parts) != 4:
      raise ConfigError(f"--mark='{spec}' needs 4 comma-separated fields")
  return tuple(marks)


def _draw():
  from cnn.tools import plotting  # pylint: disable=g-import-not-at-top
  from cnn.tools import time_accuracy  # pylint: disable=g-import-not-at-top
  from cnn import runs as runs_lib  # pylint: disable=g-import-not-at-top
  marks = _marks(_MARKS.value)
  runs = []
  for workdir in _WORKDIR.value:
    pts, clock = time_accuracy.points(workdir, _SPLIT.value)
    runs.append((workdir, pts, clock, runs_lib.load_config(workdir)))
  out = _OUT.value or _WORKDIR.value[0]
  os.makedirs(out, exist_ok=True)
  text = ''
  for workdir, pts, clock, config in runs:
    if len(runs) > 1:
      text += f'\n{os.path.basename(os.path.normpath(workdir))} ' \
              f'({config.model}):\n\n'
    text += time_accuracy.table(pts) + f'\nClock: {clock}.\n'
  with open(os.path.join(out, 'time_accuracy.md'), 'w') as f:
    f.write(text.lstrip('\n'))
  if len(runs) == 1:
    _, pts, clock, config = runs[0]
    last = pts[-1]
    title = (f'{config.model} on {config.dataset}: {100 * last.error:.2f} % '
             f'{_SPLIT.value} error after {last.epoch:.1f} epochs, '
             f'{last.minutes:.3g} min (clock: {clock})')
    drawn = pts
  else:
    title = (f'{runs[0][3].dataset}: {_SPLIT.value} error of '
             f'{len(runs)} runs (clock: {runs[0][2]})')
    drawn = [(os.path.basename(os.path.normpath(w)), pts)
             for w, pts, _, _ in runs]
  fig = time_accuracy.figure(
      drawn, title=title, paper=_PAPER.value if _PAPER.value >= 0 else None,
      paper_label=_PAPER_LABEL.value,
      goal=_GOAL.value if _GOAL.value >= 0 else None, marks=marks)
  path = plotting.save(fig, os.path.join(out, 'time_accuracy.png'),
                       dpi=_DPI.value)
  print(text.lstrip('\n'), end='')
  print(f'wrote {path}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.run(_draw)


if __name__ == '__main__':
  common.main(main)
