"""Test error against wall-clock time and epochs for one run (issue 17).

The time of an evaluation is the run's own clock: `wall_seconds` in
metrics.jsonl (the training loop's seconds summed over sittings, see
`cnn.training.loop`). Runs whose rows lack it (written before the clock
existed) are timed from their TensorBoard events instead: every sitting
writes its own event file, so the time inside a sitting is the events'
wall_time since its first event, and the gap between two sittings (the
machine idle, the run stopped) is left out; the first log interval of each
sitting, which has no earlier event to measure from, is taken as that
sitting's median seconds per step times its steps. The docstring of the
figure says which clock was used.
"""
from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np

from cnn.errors import ConfigError
from cnn.training import metric_writers


@dataclasses.dataclass
class Point:
  step: int
  epoch: float
  minutes: float
  error: float  # test error in [0, 1]
  top5: float | None = None  # top-5 test error, where the run has it
  # The mean training error (augmented batches, train mode) over the steps
  # since the previous evaluation; None where no training row was logged.
  train_error: float | None = None


def _epochs(rows: list[dict]) -> dict[int, float]:
  return {r['step']: r['epoch'] for r in rows
          if r['split'] == 'train' and 'epoch' in r}


def _epoch_at(step: int, epochs: dict[int, float]) -> float:
  steps = sorted(epochs)
  if not steps:
    return float('nan')
  per_step = epochs[steps[-1]] / steps[-1]
  return epochs.get(step, step * per_step)


def _tensorboard_seconds(workdir: str) -> dict[int, float]:
  """Step -> seconds of training, from the event files (one per sitting)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(workdir, 'tensorboard',
                                        'events.out.tfevents.*')))
  sittings = []
  for path in files:
    stamps = {}
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      if event.step and event.summary.value:
        stamps.setdefault(int(event.step), event.wall_time)
    if stamps:
      sittings.append(sorted(stamps.items()))
  sittings.sort(key=lambda s: s[0][0])
  seconds, offset, last_step = {}, 0.0, 0
  for stamps in sittings:
    steps = np.array([s for s, _ in stamps], float)
    times = np.array([t for _, t in stamps])
    if len(stamps) > 1:
      per_step = float(np.median(np.diff(times) / np.maximum(np.diff(steps),
                                                              1)))
    else:
      per_step = 0.0
    first = offset + (steps[0] - last_step) * per_step
    for s, t in stamps:
      seconds[s] = first + (t - times[0])
    offset, last_step = seconds[stamps[-1][0]], int(steps[-1])
  return seconds


def points(workdir: str, split: str = 'test') -> tuple[list[Point], str]:
  """The run's evaluations on `split` as Points, and the clock used.

  Raises:
    ConfigError: no evaluation of `split` in the run folder.
  """
  if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    raise ConfigError(f'{workdir} holds no run (no metrics.jsonl): check '
                      'the path, or train it first')
  rows = metric_writers.read_metrics(workdir)
  evals = [r for r in rows if r['split'] == split and 'error' in r]
  if not evals:
    raise ConfigError(f'{workdir} has no {split} evaluation in '
                      'metrics.jsonl: pass a classification run folder')
  epochs = _epochs(rows)
  if all('wall_seconds' in r for r in evals):
    clock = 'the run clock (wall_seconds in metrics.jsonl)'
    secs = {r['step']: r['wall_seconds'] for r in evals}
  else:
    clock = ('TensorBoard event times, gaps between sittings left out')
    secs = _tensorboard_seconds(workdir)
    missing = [r['step'] for r in evals if r['step'] not in secs]
    if missing:
      raise ConfigError(f'{workdir}: no time for the evaluations at steps '
                        f'{missing[:5]} (no wall_seconds and no TensorBoard '
                        'event): rerun with tensorboard on')
  train = [(r['step'], r['error']) for r in rows
           if r['split'] == 'train' and 'error' in r]
  out, previous = [], 0
  for r in evals:
    since = [e for s, e in train if previous < s <= r['step']]
    out.append(Point(r['step'], _epoch_at(r['step'], epochs),
                     secs[r['step']] / 60, r['error'], r.get('top5_error'),
                     float(np.mean(since)) if since else None))
    previous = r['step']
  return out, clock


def _pct(x: float | None) -> str:
  return '' if x is None else f'{100 * x:.2f}'


def table(pts: list[Point]) -> str:
  """One row per evaluation; a top-5 column where the run has top-5."""
  top5 = any(p.top5 is not None for p in pts)
  head = ['epoch', 'step', 'wall-clock min', 'test error %'] + (
      ['top-5 test error %'] if top5 else []) + ['train error %']
  lines = ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
  for p in pts:
    cells = [f'{p.epoch:.1f}', str(p.step), f'{p.minutes:.1f}',
             _pct(p.error)] + ([_pct(p.top5)] if top5 else []) + [
                 _pct(p.train_error)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def figure(runs, *, title: str, paper: float | None = 8.75,
           paper_label: str = 'He et al. 2015', goal: float | None = 1.5,
           marks: tuple = ()):
  """Test error (%) against minutes (left) and epochs (right).

  Args:
    runs: the evaluations of one run (a list of Points), or of several as
      (label, Points) pairs, one colour each: test top-1 solid, top-5
      dash-dotted where the run has it, the training error (augmented
      batches) thin dashed.
    title: figure title.
    paper: the paper's test error (%), drawn as a dashed line.
    paper_label: whose figure that is.
    goal: points above `paper` drawn dotted as the goal (None: no line).
    marks: extra reference points (label, minutes, epochs, error %), e.g.
      the 1.5-epoch study.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if runs and isinstance(runs[0], Point):
    runs = [('this run', runs)]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  shown = [m[3] for m in marks] + (
      [paper] + ([paper + goal] if goal is not None else [])
      if paper is not None else [])
  for _, pts in runs:
    for p in pts:
      shown += [100 * v for v in (p.error, p.top5, p.train_error)
                if v is not None and v > 0]
  lo, hi = min(shown) / 1.3, min(max(shown) * 1.3, 100)
  ticks = [t for t in (0.3, 0.5, 0.8, 1, 1.5, 2, 3, 5, 8, 10, 15, 20, 30, 40,
                       50, 60, 70, 80, 100) if lo <= t <= hi]
  for ax, xlabel, k in ((axes[0], 'wall-clock minutes', 1),
                        (axes[1], 'epochs', 2)):
    for i, (label, pts) in enumerate(runs):
      xs = [p.minutes if k == 1 else p.epoch for p in pts]
      colour = f'C{i}'
      ax.plot(xs, [100 * p.error for p in pts], 'o-', ms=3, lw=1.5,
              color=colour, label=f'{label}: test error')
      for key, style, what in (('top5', '-.', 'top-5 test error'),
                               ('train_error', '--', 'training error')):
        got = [(x, 100 * getattr(p, key)) for x, p in zip(xs, pts)
               if getattr(p, key) is not None]
        if got:
          ax.plot(*zip(*got), style, lw=1 if key == 'top5' else 0.8,
                  color=colour, alpha=0.8, label=f'{label}: {what}')
    if paper is not None:
      ax.axhline(paper, ls='--', color='k', lw=1,
                 label=f'{paper_label}: {paper:g} %')
      if goal is not None:
        ax.axhline(paper + goal, ls=':', color='grey', lw=1,
                   label=f'goal: {paper + goal:g} %')
    for label, minutes, epochs, e in marks:
      ax.plot([minutes if k == 1 else epochs], [e], 's', color='C3', ms=7,
              label=label)
    ax.set_xlabel(xlabel)
    ax.set_yscale('log')
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(ticks)
    ax.set_yticklabels([f'{t:g}' for t in ticks])
    ax.grid(True, which='both', alpha=0.3)
  axes[0].set_ylabel('error % (log scale)')
  axes[1].legend(fontsize=7, loc='upper right')
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig
