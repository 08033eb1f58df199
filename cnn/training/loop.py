"""`train_and_evaluate(config, workdir)`: the one training loop, every task.

`config.task` picks the task (`cnn.tasks`); the task supplies its data,
model, loss and evaluation, and this loop does the rest for all of them:
schedules and the plateau cut, weight decay, init_from / freeze, the data
mesh, the NaN guard, checkpoints (last N + best by the task's held-out
metric), exact resume, metrics.jsonl / TensorBoard / the progress line.

Resumable and deterministic: the batch, the augmentation and the dropout of
step `s` depend only on (seed, s), evaluation and checkpoint steps are fixed
by the config, and the restored state is bitwise the saved one. A run killed
at any moment and restarted on the same workdir therefore ends with the same
numbers as an uninterrupted run (on CPU, where XLA is deterministic).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnn import tasks
from cnn.data import input_pipeline
from cnn.errors import ConfigError, NonFiniteLossError, UserError
from cnn.ops import conv as conv_ops
from cnn.tasks import base
from cnn.training import checkpointing
from cnn.training import console
from cnn.training import optim
from cnn.training import provenance
from cnn.training import run_folder
from cnn.training import sharding
from cnn.training import state as state_lib
from cnn.training import step as step_lib
from cnn.training import transfer

# The step's numerics (configs/common.py).
NUMERICS = ('conv', 'conv_weight_grad', 'xla_cpu_conv', 'xla_cpu_fusion')
REQUIRED_FIELDS = NUMERICS + (
    'task', 'batch_size', 'num_train_steps', 'seed', 'learning_rate',
    'lr_schedule', 'weight_decay', 'momentum', 'eval_every_steps',
    'checkpoint_every_steps')


def validate_config(config, task) -> None:
  """Raises ConfigError (one line) for values that cannot work."""
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ConfigError(f'config lacks fields {missing}; start from a config in '
                      'configs/')
  for field in ('batch_size', 'eval_every_steps', 'checkpoint_every_steps',
                'log_every_steps'):
    if field in config and int(config[field]) < 1:
      raise ConfigError(f'{field}={config[field]} must be a positive integer')
  if int(config.num_train_steps) < 0:
    raise ConfigError(f'num_train_steps={config.num_train_steps} must be >= 0 '
                      '(0: evaluate only)')
  if not 0 <= int(config.seed) < 2**31:
    raise ConfigError(f'seed={config.seed} must be an integer in [0, 2**31), '
                      'e.g. --config.seed=0')
  optim.validate(config)
  task.validate()
  # The step's numerics (config.conv, conv_weight_grad, xla_cpu_conv,
  # xla_cpu_fusion; entered while a run's steps are built and traced): a bad
  # value, or conv='onednn' where it cannot run, is refused here, before
  # anything runs.
  with numerics(config):
    pass


@contextlib.contextmanager
def numerics(config):
  """The context a run's steps are built and traced in: its config's
  convolution and fusion settings (configs/common.py)."""
  with conv_ops.settings(config.conv, config.conv_weight_grad,
                         config.xla_cpu_conv), \
      step_lib.fusion(config.xla_cpu_fusion):
    yield


def log_interval(config) -> int:
  """Train-log interval dividing the eval and checkpoint intervals.

  Train metrics are averaged over the steps since the previous log point;
  aligning log points with checkpoints keeps that window identical after a
  resume.
  """
  return math.gcd(int(config.get('log_every_steps', 100)),
                  int(config.eval_every_steps),
                  int(config.checkpoint_every_steps))


def monitor_split(config, evals: dict) -> str | None:
  """The held-out split whose metric picks the best checkpoint and drives
  the plateau schedule."""
  if config.lr_schedule == 'plateau':
    monitor = config.plateau.monitor
    if monitor not in evals:
      raise ConfigError(
          f"plateau.monitor='{monitor}' is not a held-out split of this run "
          f"(it has {', '.join(sorted(evals)) or 'none'}); set "
          '--config.plateau.monitor to one of them')
    return monitor
  return 'val' if 'val' in evals else ('test' if 'test' in evals else None)


class Run:
  """Task, data, model, optimizer, step and checkpointer of one config;
  shared by the training loop and by the evaluation of a finished run."""

  def __init__(self, config, workdir: str, read_only: bool = False,
               train: bool = True):
    # Before anything that starts JAX's backend (validate_config asks it for
    # the platform), which `jax.distributed.initialize` must precede.
    sharding.maybe_initialize_distributed()
    self.task = tasks.get(config)
    validate_config(config, self.task)
    self.config = config
    self.workdir = workdir
    self.mesh = sharding.make_mesh()
    sharding.check_batch_size(config.batch_size, self.mesh)
    if 'eval_batch_size' in config:
      sharding.check_batch_size(config.eval_batch_size, self.mesh,
                                'eval_batch_size')
    self.data = self.task.load_data(workdir, train=train)
    self.monitor = monitor_split(config, self.data.evals)
    self.model = self.task.make_model(self.data)
    self.tx = optim.make_optimizer(config)
    self.schedule = optim.make_schedule(config)
    self.step_model, self.frozen = self.model, None
    spec = self.task.freeze_spec()
    if spec:
      self._freeze(spec)
    self._train_step = None
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, 'checkpoints'),
        keep=config.get('keep_checkpoints', 2),
        best_mode=self.task.metric_mode, read_only=read_only)

  def _init_variables(self, rng):
    return self.task.init_variables(self.model, self.data, rng)

  def _freeze(self, spec: str):
    """Masks, optimizer partition and BN wrapper for a freeze spec."""
    shapes = jax.eval_shape(self._init_variables, jax.random.PRNGKey(0))
    masks = transfer.freeze_masks(spec, shapes['params'],
                                  shapes.get('batch_stats', {}))
    self.tx = transfer.freeze_optimizer(self.tx, masks[0])
    self.step_model = transfer.FrozenBatchNorm(
        self.model, transfer.frozen_modules(masks[1]))
    self.frozen = masks

  def numerics(self):
    """The context the run's steps are built and traced in (`numerics`)."""
    return numerics(self.config)

  def train_step(self, state, batch):
    with self.numerics():
      if self._train_step is None:
        self._train_step = step_lib.make_train_step(
            self.task.loss_fn(self.step_model, self.data), self.tx,
            self.schedule, frozen=self.frozen,
            compiler_options=self.task.compiler_options)
      return self._train_step(state, batch)

  def init_state(self):
    state = state_lib.create(self._init_variables, self.tx, self.config.seed)
    return sharding.replicate(state, self.mesh)

  def abstract_state(self):
    """Shapes, dtypes and shardings of the train state, nothing computed."""
    abstract = jax.eval_shape(
        lambda: state_lib.create(self._init_variables, self.tx,
                                 self.config.seed))
    replicated = jax.sharding.NamedSharding(self.mesh,
                                            jax.sharding.PartitionSpec())
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        abstract)

  def load_init_from(self, state):
    """`state` with params and batch_stats from `config.init_from`."""
    params, batch_stats, message = self.task.load_init_from(
        self.config.init_from, jax.device_get(state.params),
        jax.device_get(state.batch_stats))
    print(message, flush=True)
    state = state.replace(params=params, batch_stats=batch_stats,
                          opt_state=self.tx.init(params))
    return sharding.replicate(state, self.mesh)

  def meta(self, state) -> dict:
    meta = dict(self.task.meta())
    meta['task'] = self.task.name
    meta['param_shapes'] = checkpointing.param_shapes(state.params)
    # What a resume is checked against where config.json is gone.
    meta['config'] = run_folder.as_json(self.config)
    return meta

  def restore(self, state, which='latest'):
    step = self.checkpointer.resolve(which)
    restored = self.checkpointer.restore(step, state, meta=self.meta(state))
    return sharding.replicate(restored, self.mesh)

  def shard(self, batch: dict) -> dict:
    """This process's part of a global host batch, on the mesh."""
    if jax.process_count() > 1:
      n = len(next(iter(jax.tree.leaves(batch)))) // jax.process_count()
      i = jax.process_index()
      batch = jax.tree.map(lambda v: v[i * n:(i + 1) * n], batch)
    return sharding.shard_batch(batch, self.mesh)

  def evaluate(self, state, split: str, final: bool = False) -> dict:
    if split not in self.data.evals:
      raise ConfigError(f"split '{split}' is not held out in this run; "
                        f'choose one of {sorted(self.data.evals)}')
    with self.numerics():
      return self.task.evaluate(self.model, state.variables, self.data,
                                split, final=final, shard=self.shard)


def _check_finite(window: list, first_step: int, checkpointer,
                  what: str = 'loss is') -> None:
  losses = np.asarray(jax.device_get([m['loss'] for m in window]))
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    step = first_step + int(bad[0]) + 1
    last = checkpointer.latest_step()
    kept = (f'the last good checkpoint, step {last}, is kept in '
            f'{checkpointer.directory}' if last is not None
            else 'no checkpoint had been written yet')
    raise NonFiniteLossError(
        f'{what} {losses[bad[0]]} at step {step}; {kept}; lower '
        '--config.learning_rate or add warm-up (--config.warmup_steps)')


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x))
                              for x in jax.tree.leaves(tree)]))


def _check_finite_params(state, step: int, checkpointer) -> None:
  """Never checkpoint a diverged state (finite loss, overflowed weights)."""
  if not bool(_all_finite(state.params)):
    _check_finite([{'loss': jnp.float32(np.nan)}], step - 1, checkpointer,
                  what='parameters are')


class Interrupted(UserError):
  """Ctrl-C or SIGTERM: the run saved its current step and stopped."""


def _saved_window(meta: dict, start: int):
  """The train-log window a Ctrl-C checkpoint carries (see `_interrupt`)."""
  w = meta.get('window')
  if not w:
    return [], start
  return ([{k: np.float32(v) for k, v in m.items()} for m in w['metrics']],
          int(w['start']))


class _Clock:
  """Seconds of this run's training loop, summed over every sitting.

  Saved in each checkpoint's meta (`wall_seconds`) and restored on resume,
  so time-to-accuracy curves of a run split over several sittings leave
  out the gaps between them. None when the run was resumed from a
  checkpoint written before the clock existed (its time is unknown).
  """

  def __init__(self, meta: dict | None):
    self._base = 0.0 if meta is None else meta.get('wall_seconds')
    self._t0 = time.perf_counter()

  def seconds(self) -> float | None:
    if self._base is None:
      return None
    return self._base + time.perf_counter() - self._t0

  def stamp(self, meta: dict) -> dict:
    """`meta` with the run's seconds so far."""
    if self._base is not None:
      meta['wall_seconds'] = self.seconds()
    return meta

  def fields(self) -> dict:
    return {} if self._base is None else {'wall_seconds': self.seconds()}


def _interrupt(run, state, s: int, window: list, window_start: int, signum,
               clock: _Clock):
  """Saves step `s` (with the steps since the last log point, so the
  resumed run logs the same averages) and stops with one line."""
  ckpt = run.checkpointer
  if ckpt.latest_step() != s:
    if window:
      _check_finite(window, window_start, ckpt)
    _check_finite_params(state, s, ckpt)
    meta = clock.stamp(run.meta(state))
    meta['window'] = {'start': window_start, 'metrics': [
        {k: float(v) for k, v in m.items()} for m in jax.device_get(window)]}
    ckpt.save(s, state, meta)
  name = signal.Signals(signum).name
  raise Interrupted(f'{name} at step {s}: checkpoint {s} saved in '
                    f'{ckpt.directory}; rerun the same command to resume')


def _logged(result: dict) -> dict:
  """A result's metrics for metrics.jsonl: 'examples' is a count."""
  return {k: v for k, v in result.items() if k != 'examples'}


def _print_eval(task, results: dict, seconds: float) -> None:
  print('  eval ' + ' | '.join(
      f'{split} {base.format_metrics(r, task.eval_keys)}'
      for split, r in results.items()) + f' ({seconds:.1f}s)', flush=True)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains the config's task in `workdir`, evaluating and checkpointing.

  The folder is locked for the run (one line naming the holder's pid when
  another process trains there); a run already in it is resumed only with
  the config it was trained with (`run_folder.resume_check`), and with the
  numerics choices it recorded (`run_folder.read_numerics`). Ctrl-C or
  SIGTERM saves the current step and raises `Interrupted`; a full disk is
  one line, the checkpoints written before it kept; a closed stdout only
  ends the console lines.

  Args:
    config: a ConfigDict as built by `configs/*.py` (with `task`).
    workdir: run folder: checkpoints/, metrics.jsonl, tensorboard/,
      config.json. An existing run there is resumed.

  Returns:
    The last evaluation's metrics by split, e.g. {'test': {'error': ...}}.
  """
  # A multi-host run joins its peers first: validate_config starts JAX's
  # backend, after which `jax.distributed.initialize` refuses to run.
  sharding.maybe_initialize_distributed()
  # A config that cannot work is refused before anything is created.
  validate_config(config, tasks.get(config))
  run_folder.prepare(workdir)
  from cnn.training import metric_writers  # pylint: disable=g-import-not-at-top
  # One writer per folder: process 0 of a multi-host run holds the lock.
  with (run_folder.lock(workdir) if sharding.is_primary()
        else contextlib.nullcontext()), metric_writers.console_may_close(
            workdir):
    try:
      with _recorded_numerics(workdir):
        return _train_and_evaluate(config, workdir)
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, UserError) or not checkpointing.is_disk_full(e):
        raise
      steps = run_folder.checkpoint_steps(workdir)
      kept = (f'it resumes from step {steps[-1]}' if steps
              else 'no checkpoint had been written')
      raise UserError(f'disk full while writing {workdir} ({e}); free some '
                      f'space and rerun the same command: {kept}') from None


def _recorded_numerics(workdir: str):
  """The run's convolution chunk counts (numerics.json), held while it
  trains; a count chosen for a new shape is recorded before its step runs."""
  record = run_folder.read_numerics(workdir)
  chunks = record.setdefault('conv_weight_grad_chunks', {})
  save = ((lambda _: run_folder.write_numerics(workdir, record))
          if sharding.is_primary() else None)
  return conv_ops.run_plan(chunks, save)


def _train_and_evaluate(config, workdir: str) -> dict:
  # Local import: metric writing pulls in TensorFlow's summary ops.
  from cnn.training import metric_writers  # pylint: disable=g-import-not-at-top
  if sharding.is_primary():  # the data may take minutes to read
    print(console.data_line(config), flush=True)
  run = Run(config, workdir)
  if jax.process_count() > 1:
    print(f'multi-host: process {jax.process_index()} of '
          f'{jax.process_count()}, {jax.device_count()} devices in all '
          f'({jax.local_device_count()} here)', flush=True)
  task = run.task
  total = int(config.num_train_steps)
  with run.numerics():
    convolution = conv_ops.describe()
  if sharding.is_primary():
    print(f'convolution: {convolution}', flush=True)
  saved = run_folder.read_config(workdir)
  start, window, window_start = 0, [], 0
  latest = run.checkpointer.latest_step()
  saved_meta = None
  if latest is not None:
    if saved is None:  # config.json is gone: the checkpoint carries it.
      saved = run_folder.config_of_checkpoint(
          run.checkpointer.read_meta(latest), workdir, latest)
    # Before anything is written: a resumed run is the run on disk.
    for note in run_folder.resume_check(saved, config, latest):
      print(f'resuming with {note}', flush=True)
    # Restored straight into the abstract state: no init to compile.
    state = run.restore(run.abstract_state(), 'latest')
    start = int(state.step)
    saved_meta = run.checkpointer.read_meta(start)
    window, window_start = _saved_window(saved_meta, start)
    print(f'resuming from step {start} in {workdir}', flush=True)
  else:
    state = run.init_state()
    if config.get('init_from', ''):
      # Only a fresh run starts from another run's weights; a resumed one
      # continues from its own checkpoint above.
      state = run.load_init_from(state)
  primary = sharding.is_primary()
  if primary and (latest is None or start < total):
    # A rerun that trains nothing leaves the record as it is.
    run_folder.write_config(workdir, config,
                            saved if latest is not None else None)

  log_every = log_interval(config)
  writer = (metric_writers.MetricWriter(
      workdir, resume_step=start, tensorboard=config.get('tensorboard', True))
            if primary else metric_writers.NullWriter())
  progress = metric_writers.Progress(total, start, config.batch_size)
  if start < total:
    if run.data.train is not None:
      batches = input_pipeline.TrainBatches(run.data.train, config.batch_size,
                                            config.seed)
      next_batch = lambda s: run.data.train.batch(batches.indices(s))
      epoch_of = batches.epoch_of
    else:
      stream = iter(run.data.train_stream)
      next_batch = lambda _: next(stream)
      epoch_of = lambda _: 0.0

  clock = _Clock(saved_meta)
  if primary and start < total:
    was = provenance.start_sitting(workdir, start, convolution)
    if was:
      print(f'resuming with another convolution: {was} -> {convolution} '
            '(the steps from here differ by float32 rounding)', flush=True)
    for note in optim.schedule_notes(config):  # a warning: on stderr
      print(f'schedule: {note}', file=sys.stderr, flush=True)

  def evaluate_all(s: int, final: bool) -> dict:
    t_eval = time.perf_counter()
    results = {}
    for split in run.data.evals:
      results[split] = run.evaluate(state, split, final=final)
      writer.write(s, split, **_logged(results[split]), **clock.fields())
    _print_eval(task, results, time.perf_counter() - t_eval)
    return results

  last_eval: dict = {}
  batch = run.shard(next_batch(start)) if start < total else None
  compiled = False
  t_start = time.perf_counter()
  stop = console.StopRequest()
  try:
    stop.__enter__()
    if total == 0:
      # An evaluation-only run (e.g. localization's `both` stage).
      last_eval = evaluate_all(0, final=True)
      if run.checkpointer.latest_step() is None:
        run.checkpointer.save(0, state, clock.stamp(run.meta(state)))
    for step in range(start, total):
      stop.step = step + 1  # the step a Ctrl-C now saves
      if not compiled:
        print(console.COMPILING, flush=True)
      state, metrics = run.train_step(state, batch)
      window.append(metrics)
      s = step + 1
      if s < total:
        # Prepared while the device runs the step just dispatched.
        batch = run.shard(next_batch(s))
      if not compiled:
        jax.block_until_ready(state.step)
        print(f'step {s}/{total}: compiled and ran the first step in '
              f'{time.perf_counter() - t_start:.1f}s', flush=True)
        progress.reset_clock(s)
        compiled = True
      is_eval = s % config.eval_every_steps == 0 or s == total
      is_ckpt = s % config.checkpoint_every_steps == 0 or s == total
      if s % log_every == 0 or is_eval or is_ckpt:
        host = jax.device_get(window)  # one transfer per log point
        _check_finite(host, window_start, run.checkpointer)
        # The loss first, then the task's metrics (sorted, as jit returns).
        keys = ['loss'] + [k for k in host[0]
                           if k not in ('loss', 'learning_rate')]
        means = {k: float(np.mean([m[k] for m in host])) for k in keys}
        lr = float(host[-1]['learning_rate'])
        writer.write(s, 'train', learning_rate=lr, epoch=epoch_of(s),
                     **means, **clock.fields())
        progress.log(s, **{k: means[k] for k in task.log_keys}, lr=lr)
        window, window_start = [], s
      if is_eval:
        last_eval = evaluate_all(s, final=s == total)
        if config.lr_schedule == 'plateau':
          metric = last_eval[run.monitor][task.metric]
          # plateau_update lowers the rate when its metric stops falling.
          signed = metric if task.metric_mode == 'min' else -metric
          state = state.replace(plateau=optim.plateau_update(
              jax.device_get(state.plateau), signed, config))
          state = sharding.replicate(state, run.mesh)
        progress.reset_clock(s)
      if is_ckpt:
        _check_finite_params(state, s, run.checkpointer)
        metric = (last_eval[run.monitor][task.metric]
                  if is_eval and run.monitor else None)
        run.checkpointer.save(s, state, clock.stamp(run.meta(state)),
                              metric=metric)
      writer.flush()
      # Between log points: a line when the last is ~30 s old.
      progress.tick(s, lambda: jax.block_until_ready(state.step))
      if stop.signal is not None and s < total:
        _interrupt(run, state, s, window, window_start, stop.signal, clock)
  finally:
    stop.__exit__()
    run.checkpointer.close()
    writer.close()
    if primary and start < total:
      provenance.end_sitting(workdir, int(jax.device_get(state.step)),
                             clock.fields().get('wall_seconds'))
  return last_eval


def load_config(workdir: str):
  """The ConfigDict of a run folder's config.json."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  saved = run_folder.read_config(workdir)
  if saved is None:
    raise ConfigError(f'{os.path.join(workdir, "config.json")} not found: '
                      '--workdir must be a training run folder')
  config = config_dict.ConfigDict(saved)
  for field in NUMERICS:
    # Runs written before these fields existed (see run_folder.resume_check).
    if field not in config:
      config[field] = 'auto'
  if 'task' not in config:
    # Runs written before config.task existed.
    config.task = ('detection' if 'kind' in config else
                   'localization' if 'stage' in config else 'classification')
  return config


def restore_run(workdir: str, checkpoint: str | int = 'latest',
                train: bool = False):
  """(run, state, step) of a finished or running run's checkpoint."""
  run = Run(load_config(workdir), workdir, read_only=True, train=train)
  try:
    step = run.checkpointer.resolve(checkpoint)
    state = run.restore(run.abstract_state(), step)
  finally:
    run.checkpointer.close()
  return run, state, step


def _check_picture(path: str) -> None:
  """ConfigError (one line) before anything is evaluated when the picture
  cannot be written: its folder (made if missing) must lie in a writable
  folder."""
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ConfigError(f'--picture={path} is a folder: name a PNG file, e.g. '
                      f'{os.path.join(path, "picture.png")}')
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
    raise ConfigError(f'--picture={path}: {existing} is not a writable '
                      'folder; name a PNG in a folder you can write')


def evaluate_checkpoint(workdir: str, split: str = 'test',
                        checkpoint: str | int = 'latest',
                        picture: str | None = None,
                        examples: int = 0) -> dict:
  """Restores a run's checkpoint and evaluates it on one held-out split.

  Args:
    workdir: a run folder of any task.
    split: a held-out split of the run ('test', 'val'), or 'train': the
      run's own training images (in memory, after any val / class / per-class
      selection) as the test images are seen, clean and in eval mode, which
      measures the generalisation gap.
    checkpoint: 'latest', 'best' or a step.
    picture: where to draw the checkpoint's predictions on test images (a
      PNG; localization and detection), or None.
    examples: > 0: only the first this many examples of the split.

  Returns:
    The task's metrics, plus 'step' and 'task'.
  """
  if picture:
    _check_picture(picture)
  run, state, step = restore_run(workdir, checkpoint)
  in_memory = isinstance(run.data.train, input_pipeline.ArrayData)
  if split != 'train' and split not in run.data.evals:
    raise ConfigError(f"split '{split}' is not held out in this run; "
                      f'choose one of {sorted(run.data.evals)}'
                      + (" or 'train'" if in_memory else ''))
  if split == 'train':
    if not in_memory:
      raise ConfigError(f'{workdir}: --split=train works where the training '
                        'images sit in memory (classification runs); use '
                        'test or val')
    run.data.evals = {**run.data.evals, 'train': run.data.train}
  if examples:
    held = run.data.evals[split]
    if not isinstance(held, input_pipeline.ArrayData):
      raise ConfigError(f'--examples needs a split held in memory; {split} '
                        'streams: leave --examples unset')
    if not 0 < examples <= len(held):
      raise ConfigError(f'--examples={examples} must be between 1 and the '
                        f'{len(held)} examples of {split}')
    run.data.evals = {**run.data.evals, split: held.take(slice(0, examples))}
  result = run.evaluate(state, split, final=True)
  if picture:
    os.makedirs(os.path.dirname(os.path.abspath(picture)), exist_ok=True)
    run.task.picture(run.model, state.variables, run.data, picture)
  result['step'] = step
  result['task'] = run.task.name
  result['eval_keys'] = run.task.eval_keys
  return result
