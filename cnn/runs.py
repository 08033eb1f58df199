"""A run: a config's task, data, model and numerics, handed to the loop.

The one place where tasks (`cnn.tasks`), the convolution and compiler
settings (`cnn.ops`) and the training loop (`cnn.training`) meet:

  train_and_evaluate(config, workdir)  checks the config, looks its task up
                                       once, holds the run folder and the
                                       run's numerics, builds a `Run` and
                                       hands it to `loop.train`;
  evaluate_checkpoint(workdir, ...)    restores a run and evaluates it;
  restore_run / load_config            a run folder's Run, state, config.

`cnn.training` imports none of `cnn.tasks`, `cnn.ops` and `cnn.data`: the
loop sees a task only through the `Run` it is handed.
"""
from __future__ import annotations

import contextlib
import os

import jax

from cnn import tasks
from cnn.data import input_pipeline
from cnn.errors import ConfigError, UserError
from cnn.ops import compiler
from cnn.ops import conv as conv_ops
from cnn.training import checkpointing
from cnn.training import console
from cnn.training import loop
from cnn.training import metric_writers
from cnn.training import optim
from cnn.training import run_folder
from cnn.training import sharding
from cnn.training import state as state_lib
from cnn.training import step as step_lib
from cnn.training import transfer

# The step's numerics (configs/common.py).
NUMERICS = ('conv', 'conv_weight_grad', 'xla_cpu_conv', 'xla_cpu_fusion')
# Every field the training loop reads, whatever the task
# (configs/common.py: add_training_fields).
REQUIRED_FIELDS = NUMERICS + (
    'task', 'dataset', 'data_dir', 'init_from', 'freeze', 'new_head',
    'batch_size', 'num_train_steps', 'seed', 'learning_rate', 'lr_schedule',
    'lr_milestones', 'lr_milestone_fractions', 'lr_factor', 'plateau',
    'warmup_steps', 'warmup_lr', 'warmup', 'momentum', 'nesterov',
    'ema_decay',
    'weight_decay', 'decay_bn_and_bias', 'eval_every_steps',
    'checkpoint_every_steps', 'log_every_steps', 'keep_checkpoints',
    'tensorboard')


def validate_config(config, task) -> None:
  """Raises ConfigError (one line) for values that cannot work."""
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ConfigError(f'config lacks fields {missing}; start from a config in '
                      'configs/')
  for field in ('batch_size', 'eval_every_steps', 'checkpoint_every_steps',
                'log_every_steps'):
    if int(config[field]) < 1:
      raise ConfigError(f'{field}={config[field]} must be a positive integer')
  if int(config.num_train_steps) < 0:
    raise ConfigError(f'num_train_steps={config.num_train_steps} must be >= 0 '
                      '(0: evaluate only)')
  if not 0 <= int(config.seed) < 2**31:
    raise ConfigError(f'seed={config.seed} must be an integer in [0, 2**31), '
                      'e.g. --config.seed=0')
  optim.validate(config)
  task.validate()
  # The step's numerics: a bad value, or conv='onednn' where it cannot run,
  # is refused here, before anything runs.
  with numerics(config):
    pass


@contextlib.contextmanager
def numerics(config):
  """The context a run's steps are built and traced in: its config's
  convolution and fusion settings (configs/common.py)."""
  with conv_ops.settings(config.conv, config.conv_weight_grad,
                         config.xla_cpu_conv), \
      compiler.fusion(config.xla_cpu_fusion):
    yield


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
  """Task, data, model, optimizer, step and checkpointer of one config:
  what the training loop (`cnn.training.loop.train`) is handed, and what
  evaluates a finished run."""

  def __init__(self, config, workdir: str, task, read_only: bool = False,
               train: bool = True):
    """`config` checked by `validate_config(config, task)`."""
    self.task = task
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
        keep=config.keep_checkpoints,
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

  def convolution(self) -> str:
    """One line: the convolution the run's steps use, and why."""
    with self.numerics():
      return conv_ops.describe()

  def train_step(self, state, batch):
    with self.numerics():
      if self._train_step is None:
        options = self.task.compiler_options
        if options == 'default':
          options = compiler.train_step_options()
        self._train_step = step_lib.make_train_step(
            self.task.loss_fn(self.step_model, self.data), self.tx,
            self.schedule, frozen=self.frozen, compiler_options=options,
            ema_decay=float(self.config.ema_decay))
      return self._train_step(state, batch)

  def init_state(self):
    state = state_lib.create(self._init_variables, self.tx, self.config.seed,
                             ema=self.has_ema)
    return sharding.replicate(state, self.mesh)

  @property
  def has_ema(self) -> bool:
    """Whether the state carries a moving average (`config.ema_decay`)."""
    return float(self.config.ema_decay) > 0

  def abstract_state(self):
    """Shapes, dtypes and shardings of the train state, nothing computed."""
    abstract = jax.eval_shape(
        lambda: state_lib.create(self._init_variables, self.tx,
                                 self.config.seed, ema=self.has_ema))
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
    if self.has_ema:  # the average starts at the loaded variables
      state = state.replace(ema=state_lib.start_ema(params, batch_stats))
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

  @staticmethod
  def variables(state, ema: bool = False) -> dict:
    """The model's variables in `state`; `ema`: their moving average."""
    if not ema:
      return state.variables
    if state_lib.average(state) is None:
      raise ConfigError('this run keeps no moving average of its weights '
                        '(ema_decay=0): leave out --ema')
    return state_lib.average(state)

  def evaluate(self, state, split: str, final: bool = False,
               ema: bool = False) -> dict:
    """The task's metrics on `split`; `ema`: of the moving average."""
    if split not in self.data.evals:
      raise ConfigError(f"split '{split}' is not held out in this run; "
                        f'choose one of {sorted(self.data.evals)}')
    variables = self.variables(state, ema)
    with self.numerics():
      return self.task.evaluate(self.model, variables, self.data,
                                split, final=final, shard=self.shard)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains the config's task in `workdir`, evaluating and checkpointing.

  The folder is locked for the run (one line naming the holder's pid when
  another process trains there); a run already in it is resumed only with
  the config it was trained with (`run_folder.resume_check`), and with the
  numerics choices it recorded (`run_folder.read_numerics`). Ctrl-C or
  SIGTERM saves the current step and raises `loop.Interrupted`; a full disk
  is one line, the checkpoints written before it kept; a closed stdout only
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
  task = tasks.get(config)
  validate_config(config, task)
  run_folder.prepare(workdir)
  # One writer per folder: process 0 of a multi-host run holds the lock.
  with (run_folder.lock(workdir) if sharding.is_primary()
        else contextlib.nullcontext()), metric_writers.console_may_close(
            workdir):
    try:
      with _recorded_numerics(workdir):
        if sharding.is_primary():  # the data may take minutes to read
          print(console.data_line(task.data_name(), config.data_dir),
                flush=True)
        return loop.train(Run(config, workdir, task), workdir)
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


def load_config(workdir: str):
  """The ConfigDict of a run folder's config.json, completed where it
  predates a field (`run_folder.complete`)."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  saved = run_folder.read_config(workdir)
  if saved is None:
    raise ConfigError(f'{os.path.join(workdir, "config.json")} not found: '
                      '--workdir must be a training run folder')
  # A run recorded before some field existed: its value then
  # (run_folder.RECORD_DEFAULTS).
  return config_dict.ConfigDict(run_folder.complete(saved))


def restore_run(workdir: str, checkpoint: str | int = 'latest',
                train: bool = False):
  """(run, state, step) of a finished or running run's checkpoint."""
  config = load_config(workdir)
  # Before anything that starts JAX's backend (validate_config asks it for
  # the platform), which `jax.distributed.initialize` must precede.
  sharding.maybe_initialize_distributed()
  task = tasks.get(config)
  validate_config(config, task)
  run = Run(config, workdir, task, read_only=True, train=train)
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
                        examples: int = 0, ema: bool = False) -> dict:
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
    ema: evaluate (and draw) the moving average of the weights instead
      (a run with ema_decay > 0).

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
  result = run.evaluate(state, split, final=True, ema=ema)
  if picture:
    os.makedirs(os.path.dirname(os.path.abspath(picture)), exist_ok=True)
    run.task.picture(run.model, Run.variables(state, ema), run.data, picture)
  result['step'] = step
  result['task'] = run.task.name
  result['eval_keys'] = run.task.eval_keys
  return result
