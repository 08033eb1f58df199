"""Sweeps: the members a config file lists, their folders and their state.

A sweep is plain Python in a config file (big_vision style): besides
`get_config(arg)`, which builds the config of one run, the file defines
`sweep(arg)` returning the members as `(name, overrides)` pairs, where
`overrides` maps config fields (dotted for nested ones, e.g.
`'plateau.patience'`) to values. Member `m` is `get_config(arg)` with
`m.overrides` applied, and runs in `workdir/<m.name>/`.

A member folder is `done` when its final checkpoint and final evaluation
exist, `partial` when training started (it resumes from its checkpoints),
`failed` when the last attempt stopped with an error (recorded in
`error.txt`), `new` otherwise; the runner adds `changed` for a folder whose
saved config differs from the member's (`run_folder.resume_check`). This
module only computes; the runner (`experiments/sweep.py`) trains (through
`cnn.runs.train_and_evaluate`) and prints.
"""
from __future__ import annotations

import dataclasses
import importlib.machinery
import itertools
import math
import os
import re
import statistics
from typing import Any, Sequence

from cnn.errors import ConfigError
from cnn.training import run_folder
from cnn.training.metric_writers import read_metrics

DONE, PARTIAL, FAILED, NEW = 'done', 'partial', 'failed', 'new'
ERROR_FILE = 'error.txt'
_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.+=-]*$')


@dataclasses.dataclass(frozen=True)
class Member:
  """One run of a sweep: a folder name and the config fields it changes."""
  name: str
  overrides: dict

  def describe(self) -> str:
    return ' '.join(f'{k}={v!r}' for k, v in self.overrides.items())


def product(**axes: Sequence[Any]) -> list[dict]:
  """All combinations of the axes, the last axis varying fastest.

  >>> product(a=[1, 2], b=['x'])
  [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}]
  """
  keys = list(axes)
  return [dict(zip(keys, values))
          for values in itertools.product(*(axes[k] for k in keys))]


def load_module(path: str):
  """Imports a config file by path (as ml_collections' config flags do)."""
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path} not found; pass '
                      '--config=configs/FILE.py:ARG')
  name = 'sweep_config_' + re.sub(r'\W', '_', os.path.abspath(path))
  loader = importlib.machinery.SourceFileLoader(name, path)
  return loader.load_module()  # pylint: disable=deprecated-method


def members(module, arg: str | None) -> list[Member]:
  """The members of the sweep defined by `module.sweep(arg)`."""
  fn = getattr(module, 'sweep', None)
  if fn is None:
    raise ConfigError(f'{module.__file__} defines no sweep(arg); a sweep '
                      'config lists its members as (name, overrides) pairs')
  out = [Member(str(name), dict(overrides)) for name, overrides in fn(arg)]
  seen = set()
  for m in out:
    if not _NAME_RE.match(m.name):
      raise ConfigError(f"member name '{m.name}' is not a safe folder name; "
                        'use letters, digits and _ . + = -')
    if m.name in seen:
      raise ConfigError(f"member name '{m.name}' appears twice in the sweep; "
                        'names must be unique')
    seen.add(m.name)
  return out


def select(all_members: list[Member], regex: str | None) -> list[Member]:
  """The members whose name matches `regex` (re.search); all for None."""
  if not regex:
    return list(all_members)
  try:
    pattern = re.compile(regex)
  except re.error as e:
    raise ConfigError(f"--only='{regex}' is not a regular expression ({e})"
                      ) from None
  chosen = [m for m in all_members if pattern.search(m.name)]
  if not chosen:
    raise ConfigError(f"--only='{regex}' matches no member; members are "
                      f'{", ".join(m.name for m in all_members)}')
  return chosen


def apply_overrides(config, overrides: dict):
  """A copy of `config` with dotted-key overrides; unknown keys are errors."""
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      if p not in node:
        raise ConfigError(f"sweep override '{key}': the config has no field "
                          f"'{p}'")
      node = node[p]
    if leaf not in node:
      raise ConfigError(f"sweep override '{key}': the config has no field "
                        f"'{leaf}'")
    with node.unlocked():
      node[leaf] = value
  return c


# Of each GPU's memory, what the members sharing it may take together (the
# rest is left to the CUDA context and fragmentation).
GPU_MEMORY_SHARE = 0.9


def worker_env(slot: int, parallel: int, gpus: int) -> dict[str, str]:
  """Device settings of the sweep worker in `slot` (0..parallel-1).

  Workers go round-robin over the GPUs (`CUDA_VISIBLE_DEVICES`); when
  several share one, each may preallocate only its part of the memory
  (`XLA_PYTHON_CLIENT_MEM_FRACTION`, JAX preallocates 75 % by default, so
  a second process on the same GPU would otherwise run out). On a machine
  without GPUs the workers share the host's cores: each gets its share of
  them for oneDNN's OpenMP threads (`OMP_NUM_THREADS`; OpenMP's barriers
  wait for the slowest thread, so two workers of 2 threads each on 2 cores
  lose far more than they gain), unless the variable is set already.
  """
  if gpus < 1:
    if parallel < 2 or 'OMP_NUM_THREADS' in os.environ:
      return {}
    return {'OMP_NUM_THREADS': str(max(1, (os.cpu_count() or 1) // parallel))}
  env = {'CUDA_VISIBLE_DEVICES': str(slot % gpus)}
  sharing = len(range(slot % gpus, parallel, gpus))  # workers on this GPU
  if sharing > 1:
    env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{GPU_MEMORY_SHARE / sharing:.2f}'
  return env


def member_dir(workdir: str, member: Member) -> str:
  return os.path.join(workdir, member.name)


checkpoint_steps = run_folder.checkpoint_steps


def status(directory: str, total_steps: int) -> str:
  """`done`, `partial`, `failed` or `new` for a member folder."""
  ckpts = checkpoint_steps(directory)
  records = read_metrics(directory)
  final_eval = any(r['step'] == total_steps and r['split'] != 'train'
                   for r in records)
  if total_steps in ckpts and final_eval:
    return DONE
  if os.path.exists(os.path.join(directory, ERROR_FILE)):
    return FAILED
  if ckpts or records:
    return PARTIAL
  return NEW


def read_error(directory: str) -> str:
  path = os.path.join(directory, ERROR_FILE)
  if not os.path.exists(path):
    return ''
  with open(path) as f:
    return f.read().strip()


def write_error(directory: str, message: str) -> None:
  """Records a member's failure, unless another live process holds the
  folder (`in_use_by`): the member is then being trained, not failed, and
  a note written now would outlive that process in every later table."""
  pid = in_use_by(directory)
  if pid is not None and pid != os.getpid():
    return
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, ERROR_FILE), 'w') as f:
    f.write(message.strip() + '\n')


def in_use_by(directory: str) -> int | None:
  """The pid of the live process training in a member folder, else None
  (-1 where the holder's pid is not written yet)."""
  return run_folder.holder(directory)


def clear_error(directory: str) -> None:
  path = os.path.join(directory, ERROR_FILE)
  if os.path.exists(path):
    os.remove(path)


def curves(records: list[dict], split: str, key: str = 'error'
           ) -> tuple[list[int], list[float]]:
  """Steps and values of `key` for one split of a metrics.jsonl."""
  pts = [(r['step'], r[key]) for r in records
         if r['split'] == split and key in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def eval_split(records: list[dict]) -> str | None:
  """The split test error is read from: 'test', else the first held-out."""
  splits = [r['split'] for r in records if r['split'] != 'train']
  if 'test' in splits:
    return 'test'
  return splits[0] if splits else None


def summary_row(directory: str, name: str, total_steps: int,
                metric: str = 'error', mode: str = 'min') -> dict:
  """What the sweep table shows for one member: the task's held-out
  `metric` (an error, or mAP with mode='max') last and best, and its train
  value (the train loss where the train log has no such metric)."""
  records = read_metrics(directory)
  row = {'member': name, 'status': status(directory, total_steps),
         'step': max((r['step'] for r in records), default=0),
         'total': total_steps, 'metric': metric, 'train': math.nan,
         'held_out': math.nan, 'best': math.nan,
         'note': _note(directory)}
  _, train = curves(records, 'train', metric)
  if not train:
    _, train = curves(records, 'train', 'loss')
    row['train_key'] = 'loss'
  if train:
    row['train'] = train[-1]
  split = eval_split(records)
  if split:
    _, test = curves(records, split, metric)
    if test:
      row['held_out'] = test[-1]
      row['best'] = min(test) if mode == 'min' else max(test)
  return row


def _note(directory: str) -> str:
  """A table row's note: 'in use by pid N' while a live process trains the
  member (only then), else the first line of its recorded error."""
  pid = in_use_by(directory)
  if pid is not None:
    return f'in use by pid {pid if pid > 0 else "?"}'
  error = read_error(directory)
  return error.splitlines()[0][:200] if error else ''


def mean_std(values, digits: int = 1) -> str:
  """'m +- s' (sample std) of several values, 'm' of one."""
  values = [float(v) for v in values]
  m = f'{statistics.mean(values):.{digits}f}'
  if len(values) < 2:
    return m
  return f'{m} +- {statistics.stdev(values):.{digits}f}'


def format_table(rows: list[dict]) -> str:
  """A Markdown table of summary rows (errors in %, other metrics as is),
  then a mean ± std row for each set of two or more members that differ only
  by their seed suffix (`seed_group`) and have a held-out value, finished or
  not (the status column says which); none pools members of different
  settings."""
  metric = rows[0]['metric'] if rows else 'error'
  as_pct = metric.endswith('error')

  def fmt(x):
    if x != x:
      return '-'
    return f'{100 * x:.2f}' if as_pct else f'{x:.4f}'
  unit = f'{metric} %' if as_pct else metric
  train_unit = 'loss' if rows and rows[0].get('train_key') else unit
  lines = [f'| member | status | step | train {train_unit} | test {unit} | '
           f'best test {unit} | note |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    train = (f"{r['train']:.4f}" if r.get('train_key') and r['train'] == r['train']
             else fmt(r['train']))
    lines.append(
        f"| {r['member']} | {r['status']} | {r['step']}/{r['total']} | "
        f"{train} | {fmt(r['held_out'])} | "
        f"{fmt(r['best'])} | {r['note'].replace('|', '/')} |")
  groups = {}  # members that differ only by their seed suffix, in order
  for r in rows:
    if r['held_out'] == r['held_out'] and seed_group(r['member']) is not None:
      groups.setdefault(seed_group(r['member']), []).append(r)
  for name, done in groups.items():
    if len(done) < 2:
      continue

    def stat(key, done=done):
      v = [r[key] for r in done if r[key] == r[key]]
      if len(v) < 2:
        return '-'
      loss = rows[0].get('train_key') and key == 'train'
      scale, d = (100.0, 2) if as_pct and not loss else (1.0, 4)
      return (f'{scale * statistics.mean(v):.{d}f} ± '
              f'{scale * statistics.stdev(v):.{d}f}')
    label = f'mean ± std {name} ({len(done)})' if name and len(groups) > 1 \
        else f'mean ± std ({len(done)})'
    lines.append(f'| {label} | | | {stat("train")} | '
                 f'{stat("held_out")} | {stat("best")} | |')
  return '\n'.join(lines)


def seed_group(member: str) -> str | None:
  """A member's name without its seed suffix (`lenet5_s1` -> `lenet5`,
  `s1` -> ''): the members one mean ± std row pools. None without a suffix
  (such a member pools with no other)."""
  m = re.fullmatch(r'(?:(.*)_)?s\d+', member)
  return (m.group(1) or '') if m else None
