"""A run folder that cannot mix or lose runs: a lock, and the config check.

* `lock(workdir)`: one training process per folder. An exclusive `flock` on
  `workdir/.lock` (the kernel drops it when the process dies, so a stale
  lock of a killed run is simply taken over); the holder's pid is written
  in the file for the error line.
* `resume_check(saved, config, start)`: a resumed run must be the run that
  is on disk. Every field that differs from the saved config.json is named;
  only what cannot change the steps already taken may differ: the eval /
  log / checkpoint cadence, how many checkpoints are kept, TensorBoard, the
  start-only `init_from` / `new_head` (a resumed run continues from its own
  checkpoint), and a longer `num_train_steps` when the learning rates of the
  steps taken stay the same (constant, step with absolute milestones,
  plateau; not cosine, nor milestones given as fractions of the run).
  When config.json is gone, the config carried by the latest checkpoint
  (`config_of_checkpoint`) stands in for it.
* `complete(saved)`: a config.json written before some field was declared,
  with what the library did without it (`RECORD_DEFAULTS`, the one table of
  such defaults), so an old run loads, evaluates and resumes unchanged.
* `read_numerics` / `write_numerics`: the choices that change a run's
  numbers but are made by measurement, not by the config (the convolution's
  weight-gradient chunk count per shape, `cnn.ops.conv.run_plan`), recorded
  in `numerics.json` when the run first makes them and reused on resume: a
  measurement by another process never changes this run's numbers.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import os
import time

import numpy as np

from cnn.errors import ConfigError, UserError

# Fields that shape the logs and checkpoints but not a single number of the
# steps already taken.
CADENCE = ('eval_every_steps', 'log_every_steps', 'checkpoint_every_steps',
           'keep_checkpoints', 'tensorboard', 'proposals.processes',
           'proposals.cache_dir')
# Read only when a run starts: a resumed run continues from its own
# checkpoint (the record keeps the values it started with).
FRESH_ONLY = ('init_from', 'new_head')
# The step's numerics (configs/common.py): the steps that follow differ from
# the other's by float32 rounding, so a change is allowed and said.
ROUNDING = ('conv', 'conv_weight_grad', 'xla_cpu_conv', 'xla_cpu_fusion')

# What the library did where a run's config.json lacks a field (a run
# recorded before configs/ declared it), by task ('': every task); dotted
# keys are nested fields. History, not today's defaults: a config file that
# later changes a default does not change how an old run was trained.
RECORD_DEFAULTS = {
    '': {
        # The step's numerics were environment variables, 'auto' when unset.
        'conv': 'auto', 'conv_weight_grad': 'auto', 'xla_cpu_conv': 'auto',
        'xla_cpu_fusion': 'auto',
        'lr_milestones': [], 'lr_milestone_fractions': [], 'warmup_steps': 0,
        'warmup': 'constant', 'nesterov': False, 'decay_bn_and_bias': True,
        'ema_decay': 0.0,
        'log_every_steps': 100, 'keep_checkpoints': 2,
        'init_from': '', 'freeze': '', 'new_head': False,
    },
    'classification': {
        'model_kwargs': {}, 'num_classes': 0, 'dtype': 'float32',
        'in_memory': 'auto', 'augment': 'crop_flip', 'pad': 4,
        'crop_area': [0.25, 1.0], 'image_size': 0, 'classes': [],
        'train_examples_per_class': 0, 'label_smoothing': 0.0,
    },
    'localization': {'model_kwargs': {}},
    'detection': {'max_objects_per_photo': 0,
                  'inference.nms_candidates': 256},
}


def complete(saved: dict) -> dict:
  """A run's saved config (config.json, or a checkpoint's copy) with the
  fields it lacks at the values it was run with (`RECORD_DEFAULTS`); a
  record from before config.task gets the task its fields name."""
  out = copy.deepcopy(saved)
  if 'task' not in out:
    out['task'] = ('detection' if 'kind' in out else
                   'localization' if 'stage' in out else 'classification')
  for key, value in {**RECORD_DEFAULTS[''],
                     **RECORD_DEFAULTS.get(out['task'], {})}.items():
    *parents, leaf = key.split('.')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    if isinstance(node, dict):
      node.setdefault(leaf, copy.deepcopy(value))
  return out


class WorkdirInUse(UserError):
  """Another live process trains in this folder."""


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def as_json(config) -> dict:
  """A ConfigDict as config.json holds it (tuples as lists, ...)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _learning_rates(flat: dict, steps: int) -> np.ndarray:
  """The scheduled rate of steps 0..steps-1 under a (flat) config."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  from cnn.training import optim  # pylint: disable=g-import-not-at-top
  schedule = optim.make_schedule(config_dict.ConfigDict(_unflat(flat)))
  return np.asarray(jax.vmap(schedule)(jnp.arange(steps, dtype=jnp.int32)))


def resume_check(saved: dict, config, start: int) -> list[str]:
  """What differs between a run's saved config and the resuming one.

  Args:
    saved: the run's config.json.
    config: the config asked for now.
    start: the steps already taken (the restored checkpoint's step).

  Returns:
    Notes on the allowed differences ('eval_every_steps 100 -> 200').

  Raises:
    ConfigError: one line naming every field that would change the run.
  """
  new = _flat(as_json(config))
  # A run recorded before a field existed ran with RECORD_DEFAULTS' value.
  old = _flat(complete(saved))
  # A field added later that the table does not name, at its neutral value
  # (0, '', (), False: off), is how the run was trained.
  for k, v in new.items():
    if k not in old and v in (0, '', [], False, None):
      old[k] = v
  changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  bad, notes = [], []
  for k in changed:
    what = f'{k} {old.get(k, "(unset)")!r} -> {new.get(k, "(unset)")!r}'
    if k in CADENCE:
      notes.append(what)
    elif k in ROUNDING:
      notes.append(f'{what} (the steps from here differ by float32 '
                   'rounding from an unchanged run)')
    elif k in FRESH_ONLY:
      notes.append(f'{what} (ignored: the run continues from its own '
                   'checkpoint)')
    elif k == 'num_train_steps' and new[k] > old[k]:
      # Allowed when the steps already taken keep their learning rates.
      same = np.array_equal(_learning_rates(old, start),
                            _learning_rates({**old, k: new[k]}, start))
      if same:
        notes.append(what)
      else:
        bad.append(what + ' (it changes the learning rate of steps already '
                   'taken)')
    else:
      bad.append(what)
  if bad:
    raise ConfigError(
        f'the run in this workdir (step {start}) was trained with another '
        f'config: {"; ".join(bad)}; use a fresh --workdir, or the saved '
        'values (config.json)')
  return notes


def _unflat(flat: dict) -> dict:
  out: dict = {}
  for k, v in flat.items():
    node = out
    parts = k.split('.')
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def checkpoint_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps of a run folder (orbax renames a step folder
  when it is complete), read from the folder names alone."""
  path = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def read_config(workdir: str) -> dict | None:
  """The saved config.json, None when there is none.

  Raises:
    ConfigError: it is not valid JSON, or not a JSON object.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f'{path} is not valid JSON ({e}); restore it from the '
                      'command that started the run') from None
  if not isinstance(saved, dict):
    raise ConfigError(f'{path} holds a JSON {type(saved).__name__}, not the '
                      "run's config (an object of its fields); restore it "
                      'from the command that started the run')
  return saved


def write_config(workdir: str, config, saved: dict | None = None) -> None:
  """config.json, atomically (a kill leaves the old one or the new one).

  `saved`: the run's previous record, whose start-only fields (FRESH_ONLY)
  are kept: they say how the run began.
  """
  if saved is not None:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      for k in FRESH_ONLY:
        if k in saved and k in config:
          config[k] = saved[k]
  path = os.path.join(workdir, 'config.json')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
  os.replace(tmp, path)


def config_of_checkpoint(meta: dict, workdir: str, step: int) -> dict:
  """The config a checkpoint's meta carries, for a run whose config.json
  is gone.

  Raises:
    ConfigError: the checkpoint is older than configs in checkpoints.
  """
  saved = meta.get('config')
  if not isinstance(saved, dict):
    raise ConfigError(
        f'{os.path.join(workdir, "config.json")} is missing and checkpoint '
        f'{step} does not carry its config: restore config.json (the '
        'command that started the run), or use a fresh --workdir')
  return saved


NUMERICS = 'numerics.json'


def read_numerics(workdir: str) -> dict:
  """The run's recorded numerics choices ({} when there are none yet).

  Raises:
    ConfigError: the record is damaged.
  """
  path = os.path.join(workdir, NUMERICS)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      record = json.load(f)
    if not isinstance(record, dict):
      raise ValueError('not a JSON object')
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f'{path} is damaged ({e}); delete it to choose again '
                      '(the steps from here may then differ by float32 '
                      'rounding from an unchanged run)') from None
  return record


def write_numerics(workdir: str, record: dict) -> None:
  """numerics.json, atomically."""
  path = os.path.join(workdir, NUMERICS)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(json.dumps(record, indent=1, sort_keys=True) + '\n')
  os.replace(tmp, path)


# The records a run writes in its folder (each replaced whole, atomically):
# one that is read-only is refused before anything is read or trained.
RECORDS = ('metrics.jsonl', 'config.json', NUMERICS, 'provenance.json')


def prepare(workdir: str) -> None:
  """Creates the run folder; one line when it cannot be one, or when one of
  its records (`RECORDS`) cannot be written."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file, not a folder; choose '
                    'another --workdir')
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'--workdir={workdir} cannot be written '
                    f'({e.strerror or e}); choose a folder you can write') from None
  for name in RECORDS:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      raise UserError(f"{path} is a folder, not the run's {name}: move it "
                      'aside, or choose another --workdir')
    if os.path.exists(path) and not os.access(path, os.W_OK):
      raise UserError(f'{path} is read-only, and a run in this folder '
                      f'rewrites it: make it writable (chmod u+w {path}), or '
                      'choose another --workdir')


@contextlib.contextmanager
def lock(workdir: str):
  """Holds the folder's training lock for the `with` block.

  Raises:
    WorkdirInUse: a live process holds it (its pid is named).
  """
  path = os.path.join(workdir, '.lock')
  f = open(path, 'a+')  # pylint: disable=consider-using-with
  try:
    try:
      _take(f)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      f.seek(0)
      pid = f.read().strip() or '?'
      raise WorkdirInUse(
          f'workdir {workdir} in use by pid {pid}: wait for that run to end '
          '(or stop it), or use another --workdir') from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    yield
  finally:
    f.close()  # releases the flock


def _take(f, tries: int = 5) -> None:
  """flock(LOCK_EX | LOCK_NB), tried a few times over 0.2 s: `holder`,
  which may be asking at the same moment, holds the lock for microseconds."""
  for i in range(tries):
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES) or i == tries - 1:
        raise
      time.sleep(0.05)


def holder(workdir: str) -> int | None:
  """The pid of the live process that holds the folder's training lock
  (`lock`), None when none does: a killed holder's lock went with it,
  whatever pid its .lock file still names."""
  path = os.path.join(workdir, '.lock')
  try:
    f = open(path)  # pylint: disable=consider-using-with
  except OSError:
    return None
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        return None
      text = f.read().strip()
      return int(text) if text.isdigit() else -1
    fcntl.flock(f, fcntl.LOCK_UN)
    return None
