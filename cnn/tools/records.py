"""Run records: what a study keeps of each run it quotes.

A run folder under runs/ holds checkpoints (large, machine-bound) beside its
records: `metrics.jsonl` (every logged step, the source of every curve and
table), `config.json` (the whole config) and `provenance.json` (the commit,
CPU or GPU, versions and loop seconds of each sitting; `numerics.json` too
where the run recorded numerics choices). `keep` copies the records of a
finished run into `results/<study>/runs/<member>/`, never its checkpoints,
so the study's tables and figures rebuild from the repository alone
(`experiments.plot --workdir=results/<study>/runs`).
"""
from __future__ import annotations

import filecmp
import os
import shutil

from cnn.errors import ConfigError
from cnn.training import metric_writers
from cnn.training import run_folder

RECORDS = ('metrics.jsonl', 'config.json', 'provenance.json')
OPTIONAL = ('numerics.json',)


def last_step(run_dir: str) -> int:
  """The last step metrics.jsonl logged (0 when it logged none)."""
  return max((int(r['step']) for r in metric_writers.read_metrics(run_dir)),
             default=0)


def check_finished(run_dir: str) -> int:
  """The run's length; ConfigError (one line) when a record is missing or
  the run has not reached its num_train_steps."""
  missing = [n for n in RECORDS
             if not os.path.isfile(os.path.join(run_dir, n))]
  if missing:
    raise ConfigError(f'{run_dir} lacks {", ".join(missing)}: keep a run '
                      'folder that the trainer wrote (this version of it '
                      'writes provenance.json)')
  total = int(run_folder.read_config(run_dir)['num_train_steps'])
  reached = last_step(run_dir)
  if reached < total:
    raise ConfigError(f'{run_dir} stopped at step {reached} of {total}: '
                      'finish it (rerun its command) before keeping it, or '
                      'pass --unfinished to keep it as it is')
  return total


def keep(run_dir: str, dest: str, *, unfinished: bool = False,
         replace: bool = False) -> list[str]:
  """Copies a run's records (never its checkpoints) into `dest`.

  Args:
    run_dir: the run folder.
    dest: e.g. results/<study>/runs/<member>.
    unfinished: keep a run that has not reached num_train_steps.
    replace: overwrite records already kept there that differ.

  Returns:
    The paths written.

  Raises:
    ConfigError: the run is unfinished or incomplete, or `dest` holds other
      records (one line each; nothing is written then).
  """
  if not os.path.isdir(run_dir):
    raise ConfigError(f'{run_dir} is not a run folder')
  if not unfinished:
    check_finished(run_dir)
  names = [n for n in RECORDS + OPTIONAL
           if os.path.isfile(os.path.join(run_dir, n))]
  clash = [n for n in names if os.path.isfile(os.path.join(dest, n))
           and not filecmp.cmp(os.path.join(run_dir, n),
                               os.path.join(dest, n), shallow=False)]
  if clash and not replace:
    raise ConfigError(f'{dest} already keeps other records ({", ".join(clash)}'
                      '): choose another member name, or pass --replace')
  os.makedirs(dest, exist_ok=True)
  written = []
  for n in names:
    shutil.copyfile(os.path.join(run_dir, n), os.path.join(dest, n))
    written.append(os.path.join(dest, n))
  return written

