r"""Runs every member of a sweep config, each in its own folder.

  python -m experiments.sweep --config=configs/plain_vs_resnet.py:cpu \
    --workdir=runs/plain_vs_resnet_cpu [--parallel=N] [--only=REGEX] \
    [--dry-run] [--config.FIELD=VALUE ...]

Member `m` trains `get_config(ARG)` with its overrides in `WORKDIR/m.name`
(see cnn/tools/sweeps.py); `--config.FIELD=VALUE` applies to every member
(a member's own overrides win). Finished members are skipped, interrupted
ones resume from their checkpoints, a member that fails is recorded in the
table and the others go on; a member whose folder holds a run of another
config (`changed`) or that another process trains (`in use by pid N`) is
left alone and named at the end. Re-running a finished sweep only prints the table;
it ends with a mean ± std row for each set of members that differ only by
their seed suffix (`NAME_s0`, `NAME_s1`, ...).
`--parallel=N` trains N members at once, each in a subprocess (logs in
`WORKDIR/m.name/sweep.log`); on a machine with several GPUs each gets its own.
"""
import os
import signal
import subprocess
import sys
import time
import traceback

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Sweep config file and argument, e.g. '
    'configs/plain_vs_resnet.py:cpu.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep folder: one subfolder '
                               'per member.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Members trained at once '
                                 '(subprocesses when > 1).')
_ONLY = flags.DEFINE_string('only', None, 'Run only members whose name '
                            'matches this regular expression.')
_DRY_RUN = flags.DEFINE_boolean('dry_run', False, 'List the members, their '
                                'status and overrides; run nothing.')
flags.mark_flags_as_required(['config', 'workdir'])
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Flags a worker subprocess must not inherit from the parent's command line.
_PARENT_ONLY = ('--parallel', '--only', '--dry_run', '--dry-run',
                '--nodry_run', '--nodry-run')


def _gpu_count() -> int:
  """GPUs on this machine, without initialising JAX (which grabs memory)."""
  if os.environ.get('CUDA_VISIBLE_DEVICES') is not None:
    return 0  # The user already chose; leave the workers alone.
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True,
                         timeout=20, check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return 0
  return sum(line.startswith('GPU ') for line in out.splitlines())


def _worker_argv(name: str, parent_argv: list[str]) -> list[str]:
  """The parent's command line for one member, run in-process."""
  argv, skip = [], False
  for a in parent_argv:
    if skip:
      skip = False
      continue
    if a.split('=')[0] in _PARENT_ONLY:
      skip = '=' not in a and a.split('=')[0] in ('--parallel', '--only')
      continue
    argv.append(a)
  return ([sys.executable, '-m', 'experiments.sweep'] + argv +
          [f'--only=^{name}$', '--parallel=1'])


def _run_in_process(todo, configs, workdir, failures):
  from cnn.tools import sweeps  # pylint: disable=g-import-not-at-top
  from cnn.training import loop  # pylint: disable=g-import-not-at-top
  from cnn import runs  # pylint: disable=g-import-not-at-top
  from cnn.errors import UserError  # pylint: disable=g-import-not-at-top
  for m in todo:
    d = sweeps.member_dir(workdir, m)
    print(f'=== {m.name}: {m.describe()} -> {d}', flush=True)
    sweeps.clear_error(d)
    try:
      runs.train_and_evaluate(configs[m.name], d)
    except loop.Interrupted:
      raise  # Ctrl-C stops the sweep, not just this member.
    except UserError as e:
      message = f'error: {e}'
    except Exception as e:  # pylint: disable=broad-except
      # A bug in one member must not cost the others their turn.
      traceback.print_exc()
      first = (str(e).splitlines() or [''])[0]
      message = f'{type(e).__name__}: {first}'
    else:
      continue
    print(f'=== {m.name} failed: {message}', file=sys.stderr, flush=True)
    sweeps.write_error(d, message)
    failures.append(m.name)


def _run_subprocesses(todo, workdir, parallel, parent_argv, failures):
  gpus = _gpu_count()
  queue, running = list(todo), {}  # slot -> (member, process, log)
  previous = signal.signal(signal.SIGTERM, _raise_interrupt)
  # Ctrl-C too raises here (not common.stop_at_once): the workers stop first.
  previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _schedule(queue, running, workdir, parallel, parent_argv, failures, gpus)
  except KeyboardInterrupt:
    # Ctrl-C or SIGTERM: the workers save their step and stop (a worker
    # treats SIGTERM as Ctrl-C); a rerun resumes them, and their workdir
    # locks stop a rerun from training a member twice meanwhile.
    for m, proc, _ in running.values():
      if proc.poll() is None:
        proc.terminate()
    deadline = time.time() + 120
    for m, proc, log in running.values():
      try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      log.close()
    from cnn.training import loop  # pylint: disable=g-import-not-at-top
    raise loop.Interrupted(
        f'sweep stopped: {len(running)} worker(s) ('
        f'{", ".join(m.name for m, _, _ in running.values()) or "none"}) '
        'saved their step and exited; rerun the same command to resume'
        ) from None
  finally:
    signal.signal(signal.SIGTERM, previous)
    signal.signal(signal.SIGINT, previous_int)


def _changed_members(chosen, configs, workdir) -> dict:
  """{member: one-line reason} for the member folders whose saved config
  differs from the sweep's config for them in a way that changes the run."""
  from cnn.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from cnn.tools import sweeps  # pylint: disable=g-import-not-at-top
  from cnn.training import run_folder  # pylint: disable=g-import-not-at-top
  out = {}
  for m in chosen:
    d = sweeps.member_dir(workdir, m)
    steps = sweeps.checkpoint_steps(d)
    try:
      saved = run_folder.read_config(d)
      if saved is not None and steps:
        run_folder.resume_check(saved, configs[m.name], steps[-1])
    except ConfigError as e:
      out[m.name] = str(e)
  return out


def _raise_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def _schedule(queue, running, workdir, parallel, parent_argv, failures, gpus):
  from cnn.tools import sweeps  # pylint: disable=g-import-not-at-top
  while queue or running:
    for slot in range(parallel):
      if slot in running or not queue:
        continue
      m = queue.pop(0)
      d = sweeps.member_dir(workdir, m)
      os.makedirs(d, exist_ok=True)
      sweeps.clear_error(d)
      env = dict(os.environ)
      # Workers import `experiments` and `configs` from this checkout.
      env['PYTHONPATH'] = os.pathsep.join(
          [_ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
                     if p])
      env.update(sweeps.worker_env(slot, parallel, gpus))
      log = open(os.path.join(d, 'sweep.log'), 'a')
      proc = subprocess.Popen(_worker_argv(m.name, parent_argv), stdout=log,
                              stderr=subprocess.STDOUT, env=env)
      print(f'=== {m.name}: started (pid {proc.pid}, log {d}/sweep.log)',
            flush=True)
      running[slot] = (m, proc, log)
    time.sleep(1.0)
    for slot, (m, proc, log) in list(running.items()):
      if proc.poll() is None:
        continue
      log.close()
      del running[slot]
      d = sweeps.member_dir(workdir, m)
      if proc.returncode == 0:
        print(f'=== {m.name}: finished', flush=True)
        continue
      if not sweeps.read_error(d):
        sweeps.write_error(d, f'worker exited with status {proc.returncode}; '
                           f'see {d}/sweep.log')
      holder = sweeps.in_use_by(d)
      print(f'=== {m.name} failed: {sweeps.read_error(d)}' if holder is None
            else f'=== {m.name}: in use by pid {holder}, not trained here',
            file=sys.stderr, flush=True)
      failures.append(m.name)


def run(config_arg: str, base_config, workdir: str, parallel: int = 1,
        only: str | None = None, dry_run: bool = False,
        argv: list[str] | None = None) -> None:
  """Trains the sweep's members that are not done, then prints the table.

  Args:
    config_arg: `path.py:ARG` of the sweep config.
    base_config: `get_config(ARG)` with the command line's overrides.
    workdir: the sweep folder.
    parallel: members at once; above 1 each runs in a subprocess.
    only: a regular expression selecting members by name.
    dry_run: list the members and their status only.
    argv: the command-line arguments the workers repeat (parallel > 1).

  Raises:
    UserError: for bad arguments, or after the table when members failed.
  """
  from cnn import tasks  # pylint: disable=g-import-not-at-top
  from cnn.tools import sweeps  # pylint: disable=g-import-not-at-top
  from cnn.errors import ConfigError, UserError  # pylint: disable=g-import-not-at-top
  path, _, arg = config_arg.partition(':')
  module = sweeps.load_module(path)
  all_members = sweeps.members(module, arg or None)
  chosen = sweeps.select(all_members, only)
  configs = {m.name: sweeps.apply_overrides(base_config, m.overrides)
             for m in chosen}
  total = {n: int(c.num_train_steps) for n, c in configs.items()}
  state = {m.name: sweeps.status(sweeps.member_dir(workdir, m), total[m.name])
           for m in chosen}
  # A member folder trained with another config (other --config.
  # overrides) is never resumed, nor reported as done.
  changed = _changed_members(chosen, configs, workdir)
  for name in changed:
    state[name] = 'changed'
  if parallel < 1:
    raise ConfigError(f'--parallel={parallel} must be >= 1')
  if dry_run:
    print(f'{len(chosen)} members in {workdir} (nothing is run):')
    width = max(len(m.name) for m in chosen)
    for m in chosen:
      print(f'  {m.name:<{width}}  {state[m.name]:<7}  {m.describe()}')
    if parallel > 1:
      gpus = _gpu_count()
      print(f'--parallel={parallel} on {gpus or "no"} GPU(s): worker device '
            'settings')
      for slot in range(parallel):
        env = sweeps.worker_env(slot, parallel, gpus)
        print(f'  worker {slot}: ' + (' '.join(
            f'{k}={v}' for k, v in env.items()) or
            "the host's CPU cores (no device settings)"))
    return
  todo = [m for m in chosen if state[m.name] not in (sweeps.DONE, 'changed')]
  failures: list[str] = []
  for name, message in changed.items():
    print(f'=== {name} failed: error: {message}', file=sys.stderr, flush=True)
    failures.append(name)
  if todo:
    print(f'{len(chosen) - len(todo)} of {len(chosen)} members done; '
          f'training {", ".join(m.name for m in todo)}', flush=True)
    if parallel == 1:
      _run_in_process(todo, configs, workdir, failures)
    else:
      argv = argv or [f'--config={config_arg}', f'--workdir={workdir}']
      _run_subprocesses(todo, workdir, parallel, argv, failures)
  task = tasks.get(configs[chosen[0].name])  # one task per sweep
  rows = [sweeps.summary_row(sweeps.member_dir(workdir, m), m.name,
                             total[m.name], task.metric, task.metric_mode)
          for m in chosen]
  for row in rows:
    if row['member'] in changed:  # its folder is another run's result
      row['status'], row['note'] = 'changed', changed[row['member']][:200]
  print(sweeps.format_table(rows), flush=True)
  held = {m.name: sweeps.in_use_by(sweeps.member_dir(workdir, m))
          for m in chosen if m.name in failures}
  busy = [f'{n} (pid {pid})' for n, pid in held.items() if pid is not None]
  failed = [n for n in failures if held.get(n) is None]
  if failed or busy:
    raise UserError('; '.join(
        ([f'{len(failed)} member(s) failed: {", ".join(failed)}; see '
          f'error.txt in their folders under {workdir}'] if failed else []) +
        ([f'{len(busy)} member(s) in use by another process, not trained '
          f'here: {", ".join(busy)}; rerun when it has ended'] if busy
         else [])))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config_arg = config_flags.get_config_filename(flags.FLAGS['config'])
  common.run(run, config_arg, _CONFIG.value, _WORKDIR.value,
             parallel=_PARALLEL.value, only=_ONLY.value,
             dry_run=_DRY_RUN.value, argv=sys.argv[1:])


def _check_config_arg(argv: list[str]) -> None:
  """Builds the config once before absl does: a bad preset is then one
  `error:` line instead of absl's flag-parsing traceback."""
  from cnn.tools import sweeps  # pylint: disable=g-import-not-at-top
  for i, a in enumerate(argv):
    value = (a.split('=', 1)[1] if a.startswith('--config=') else
             argv[i + 1] if a == '--config' and i + 1 < len(argv) else None)
    if value is None:
      continue
    path, _, arg = value.partition(':')
    module = sweeps.load_module(path)
    if arg:
      module.get_config(arg)
    else:
      module.get_config()


if __name__ == '__main__':
  common.run(_check_config_arg, sys.argv)
  # The documented spelling `--dry-run` (absl only knows `--dry_run`).
  sys.argv = [a.replace('dry-run', 'dry_run', 1)
              if a.split('=')[0] in ('--dry-run', '--nodry-run') else a
              for a in sys.argv]
  common.main(main, flags_parser=common.parse_flags)
