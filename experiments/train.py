r"""Trains a model from a config.

  python -m experiments.train --config=configs/cifar10.py:cifar_resnet20 \
    --workdir=runs/r20 [--config.FIELD=VALUE ...]

Restarting the same command on the same workdir resumes the run.
`--print_config` prints the resolved config (as the run's config.json will
hold it, the overrides applied) and exits: the fields a --config.FIELD may
set.
"""
import os
import shutil
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and argument, e.g. configs/cifar10.py:MODEL.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (resumed if it '
                               'holds a run).')
_PRINT_CONFIG = flags.DEFINE_bool(
    'print_config', False, 'Print the resolved config (its fields and '
    'values, as config.json records them) and exit; no --workdir needed.')
flags.mark_flags_as_required(['config'])


def _remove_if_unused(workdir: str) -> None:
  """Removes a run folder this process created when the run left nothing in
  it but its own `.lock` (a dataset that is not there, a bad config): a
  retry then starts clean, and no empty run is left to mistake for one."""
  lock = os.path.join(workdir, '.lock')
  files = [os.path.join(d, f) for d, _, fs in os.walk(workdir) for f in fs]
  if any(f != lock for f in files):
    return
  try:
    with open(lock) as f:
      holder = f.read().strip()
  except OSError:
    holder = None  # No lock file: the run stopped before it took one.
  if holder in (None, '', str(os.getpid())):
    shutil.rmtree(workdir, ignore_errors=True)


def _resume_note() -> str:
  """Where a rerun of a command that Ctrl-C stopped at once resumes (from
  a signal handler: the library's folder reader where it is loaded)."""
  run_folder = sys.modules.get('cnn.training.run_folder')
  steps = getattr(run_folder, 'checkpoint_steps', None)
  if steps is None:
    return (f'a rerun of the same command resumes from the last checkpoint '
            f'in {_WORKDIR.value}, if it has one')
  saved = steps(_WORKDIR.value)
  if not saved:
    return (f'no checkpoint in {_WORKDIR.value} yet: a rerun of the same '
            'command starts at step 0')
  return (f'a rerun of the same command resumes from step {saved[-1]} '
          f'({os.path.join(_WORKDIR.value, "checkpoints", str(saved[-1]))})')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.on_interrupt(_resume_note)
  if _PRINT_CONFIG.value:
    try:
      print(_CONFIG.value.to_json_best_effort(indent=2, sort_keys=True),
            flush=True)
    except BrokenPipeError:  # `... | head`: the reader has what it wanted.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return
  if not _WORKDIR.value:
    print('error: --workdir=DIR is required: the run folder (or '
          '--print_config to print the config)', file=sys.stderr)
    sys.exit(2)
  from cnn import runs  # pylint: disable=g-import-not-at-top
  fresh = not os.path.exists(_WORKDIR.value)
  try:
    common.run(runs.train_and_evaluate, _CONFIG.value, _WORKDIR.value)
  finally:
    if fresh:
      _remove_if_unused(_WORKDIR.value)

if __name__ == '__main__':
  common.main(main, flags_parser=common.parse_flags)
