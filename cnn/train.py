"""`train_and_evaluate(config, workdir)`: the training loop.

Resumable and deterministic: the batch, the augmentation and the dropout of
step `s` depend only on (seed, s), evaluation and checkpoint steps are fixed
by the config, and the restored state is bitwise the saved one. A run killed
at any moment and restarted on the same workdir therefore ends with the same
numbers as an uninterrupted run (on CPU, where XLA is deterministic).
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnn import checkpointing
from cnn import input_pipeline
from cnn import models
from cnn import optim
from cnn import sharding
from cnn import steps as steps_lib
from cnn import transfer
from cnn.errors import ConfigError, NonFiniteLossError

REQUIRED_FIELDS = ('model', 'dataset', 'data_dir', 'batch_size',
                   'num_train_steps', 'seed', 'learning_rate', 'lr_schedule',
                   'weight_decay', 'momentum', 'eval_every_steps',
                   'checkpoint_every_steps')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def validate_config(config) -> None:
  """Raises ConfigError (one line) for values that cannot work."""
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ConfigError(f'config lacks fields {missing}; start from a config in '
                      'configs/')
  for field in ('batch_size', 'num_train_steps', 'eval_every_steps',
                'checkpoint_every_steps'):
    if int(config[field]) < 1:
      raise ConfigError(f'{field}={config[field]} must be a positive integer')
  if config.get('dtype', 'float32') not in DTYPES:
    raise ConfigError(f"dtype='{config.dtype}' is unknown; use float32 or "
                      'bfloat16')
  optim.validate(config)
  if config.lr_schedule == 'plateau':
    monitor = config.plateau.monitor
    if monitor not in ('val', 'test'):
      raise ConfigError(f"plateau.monitor='{monitor}' must be val or test")
    if monitor == 'val' and not config.val_examples:
      raise ConfigError('plateau.monitor=val needs a held-out split: set '
                        '--config.val_examples=5000 (or monitor=test)')
  try:
    models.get_model(config.model, **_model_kwargs(config, num_classes=10))
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e).splitlines()[0]) from None


def _model_kwargs(config, num_classes: int) -> dict:
  kwargs = dict(config.get('model_kwargs', {}))
  kwargs['num_classes'] = config.get('num_classes') or num_classes
  kwargs['dtype'] = DTYPES[config.get('dtype', 'float32')]
  return kwargs


def log_interval(config) -> int:
  """Train-log interval dividing the eval and checkpoint intervals.

  Train metrics are averaged over the steps since the previous log point;
  aligning log points with checkpoints keeps that window identical after a
  resume.
  """
  return math.gcd(int(config.get('log_every_steps', 100)),
                  int(config.eval_every_steps),
                  int(config.checkpoint_every_steps))


class Experiment:
  """Model, data, steps and checkpointer for one config; shared by the
  training loop and by evaluation of a finished run."""

  def __init__(self, config, workdir: str, read_only: bool = False):
    validate_config(config)
    self.config = config
    self.workdir = workdir
    sharding.maybe_initialize_distributed()
    self.mesh = sharding.make_mesh()
    sharding.check_batch_size(config.batch_size, self.mesh)
    sharding.check_batch_size(config.eval_batch_size, self.mesh,
                              'eval_batch_size')
    self.data = input_pipeline.get_datasets(config)
    self.model = models.get_model(
        config.model, **_model_kwargs(config, self.data.num_classes))
    self.tx = optim.make_optimizer(config)
    self.schedule = optim.make_schedule(config)
    augment = config.augment if self.data.train is not None else 'none'
    step_model, self.frozen = self.model, None
    if config.get('freeze', ''):
      step_model, self.frozen = self._freeze(config.freeze)
    self.steps = steps_lib.make_steps(
        step_model, self.tx, self.schedule, self.data.mean, augment=augment,
        pad=config.get('pad', 4), dtype=DTYPES[config.get('dtype', 'float32')],
        frozen=self.frozen)
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, 'checkpoints'),
        keep=config.get('keep_checkpoints', 2), read_only=read_only)

  def _freeze(self, spec: str):
    """Masks, optimizer partition and BN wrapper for `config.freeze`."""
    dummy = jnp.zeros((1,) + tuple(self.data.image_shape), jnp.float32)
    shapes = jax.eval_shape(lambda: self.model.init(
        jax.random.PRNGKey(0), dummy, train=False))
    masks = transfer.freeze_masks(spec, shapes['params'],
                                  shapes.get('batch_stats', {}))
    self.tx = transfer.freeze_optimizer(self.tx, masks[0])
    return (transfer.FrozenBatchNorm(self.model,
                                     transfer.frozen_modules(masks[1])),
            masks)

  def load_init_from(self, state):
    """`state` with params and batch_stats from `config.init_from`."""
    params, batch_stats, message = transfer.load_pretrained(
        self.config.init_from, self.config.model,
        jax.device_get(state.params), jax.device_get(state.batch_stats),
        new_head=self.config.get('new_head', False))
    print(message, flush=True)
    state = state.replace(params=params, batch_stats=batch_stats,
                          opt_state=self.tx.init(params))
    return sharding.replicate(state, self.mesh)

  def init_state(self):
    state = steps_lib.create_train_state(
        self.model, self.tx, jax.random.PRNGKey(self.config.seed),
        self.data.image_shape)
    return sharding.replicate(state, self.mesh)

  def abstract_state(self):
    """Shapes, dtypes and shardings of the train state, nothing computed."""
    abstract = jax.eval_shape(
        lambda rng: steps_lib.create_train_state(
            self.model, self.tx, rng, self.data.image_shape),
        jax.random.PRNGKey(self.config.seed))
    replicated = jax.sharding.NamedSharding(self.mesh,
                                            jax.sharding.PartitionSpec())
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        abstract)

  def meta(self, state) -> dict:
    return checkpointing.describe(self.config, state.params)

  def restore(self, state, which='latest'):
    step = self.checkpointer.resolve(which)
    restored = self.checkpointer.restore(step, state, meta=self.meta(state))
    return sharding.replicate(restored, self.mesh)

  def evaluate(self, state, split: str) -> dict:
    """Loss and top-1 error over the whole split (no example dropped)."""
    data = self.data.evals[split]
    if isinstance(data, input_pipeline.ArrayData):
      batches = input_pipeline.eval_batches(data, self.config.eval_batch_size)
    else:
      batches = iter(data)
    totals = None
    for batch in batches:
      out = self.steps.eval(state, self._local(batch))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = float(totals['count'])
    return {'loss': float(totals['loss']) / count,
            'error': float(totals['error']) / count,
            'examples': count}

  def _local(self, batch: dict) -> dict:
    if jax.process_count() > 1:
      n = len(batch['label']) // jax.process_count()
      i = jax.process_index()
      batch = {k: v[i * n:(i + 1) * n] for k, v in batch.items()}
    return sharding.shard_batch(batch, self.mesh)


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


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config.model` on `config.dataset`, evaluating and checkpointing.

  Args:
    config: a ConfigDict as built by `configs/*.py`.
    workdir: run folder: checkpoints/, metrics.jsonl, tensorboard/,
      config.json. An existing run there is resumed.

  Returns:
    The last evaluation's metrics by split, e.g. {'test': {'error': ...}}.
  """
  if config.get('task', 'classification') == 'detection':
    # Detectors (configs/detection.py) have their own loop: region sampling,
    # proposals and mAP evaluation instead of labels and error.
    from cnn import detection  # pylint: disable=g-import-not-at-top
    return {'test': detection.train_and_evaluate(config, workdir)}
  # Local import: metric writing pulls in TensorFlow's summary ops.
  from cnn import metric_writers  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  exp = Experiment(config, workdir)
  start = 0
  if exp.checkpointer.latest_step() is not None:
    # Restored straight into the abstract state: no init to compile.
    state = exp.restore(exp.abstract_state(), 'latest')
    start = int(state.step)
    print(f'resuming from step {start} in {workdir}', flush=True)
  else:
    state = exp.init_state()
    if config.get('init_from', ''):
      # Only a fresh run starts from another run's weights; a resumed one
      # continues from its own checkpoint above.
      state = exp.load_init_from(state)
  # Only after the checkpoint proved compatible: never overwrite the record
  # of another run's config.
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')

  total = int(config.num_train_steps)
  log_every = log_interval(config)
  writer = metric_writers.MetricWriter(workdir, resume_step=start,
                                       tensorboard=config.get('tensorboard',
                                                              True))
  progress = metric_writers.Progress(total, start, config.batch_size)
  if exp.data.train is not None:
    batches = input_pipeline.TrainBatches(exp.data.train, config.batch_size,
                                          config.seed)
    next_batch = batches.batch
  else:
    stream = iter(exp.data.train_stream)
    next_batch = lambda _: next(stream)

  monitor = config.plateau.monitor if config.lr_schedule == 'plateau' else (
      'val' if 'val' in exp.data.evals else 'test')
  last_eval: dict = {}
  window: list = []
  window_start = start
  batch = exp._local(next_batch(start)) if start < total else None  # pylint: disable=protected-access
  compiled = False
  try:
    for step in range(start, total):
      state, metrics = exp.steps.train(state, batch)
      window.append(metrics)
      s = step + 1
      if s < total:
        # Prepared while the device runs the step just dispatched.
        batch = exp._local(next_batch(s))  # pylint: disable=protected-access
      if not compiled:
        jax.block_until_ready(state.step)
        progress.reset_clock(s)
        compiled = True
      is_eval = s % config.eval_every_steps == 0 or s == total
      is_ckpt = s % config.checkpoint_every_steps == 0 or s == total
      if s % log_every == 0 or is_eval or is_ckpt:
        _check_finite(window, window_start, exp.checkpointer)
        means = {k: float(np.mean(jax.device_get([m[k] for m in window])))
                 for k in ('loss', 'error')}
        lr = float(window[-1]['learning_rate'])
        writer.write(s, 'train', learning_rate=lr,
                     epoch=batches.epoch_of(s) if exp.data.train is not None
                     else 0.0, **means)
        progress.log(s, loss=means['loss'], error=means['error'], lr=lr)
        window, window_start = [], s
      if is_eval:
        t_eval = time.perf_counter()
        last_eval = {}
        for split in exp.data.evals:
          last_eval[split] = exp.evaluate(state, split)
          writer.write(s, split, loss=last_eval[split]['loss'],
                       error=last_eval[split]['error'])
        if config.lr_schedule == 'plateau':
          state = state.replace(plateau=optim.plateau_update(
              jax.device_get(state.plateau), last_eval[monitor]['error'],
              config))
          state = sharding.replicate(state, exp.mesh)
        print('  eval ' + ' | '.join(
            f"{k} loss {v['loss']:.4f} error {v['error']:.4f}"
            for k, v in last_eval.items()) +
              f' ({time.perf_counter() - t_eval:.1f}s)', flush=True)
        progress.reset_clock(s)
      if is_ckpt:
        _check_finite_params(state, s, exp.checkpointer)
        metric = last_eval[monitor]['error'] if is_eval and last_eval else None
        exp.checkpointer.save(s, state, exp.meta(state), metric=metric)
      writer.flush()
  finally:
    exp.checkpointer.close()
    writer.close()
  return last_eval


def evaluate_checkpoint(workdir: str, split: str = 'test',
                        checkpoint: str = 'latest') -> dict:
  """Restores a run's checkpoint and evaluates it on one split."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'{path} not found: --workdir must be a training run '
                      'folder')
  with open(path) as f:
    config = config_dict.ConfigDict(json.load(f))
  if config.get('task', 'classification') == 'detection':
    from cnn import detection  # pylint: disable=g-import-not-at-top
    if split != 'test':
      raise ConfigError(f"split '{split}': detection runs hold out only "
                        'test canvases')
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                      read_only=True)
    step = ckpt.resolve(checkpoint)
    ckpt.close()
    result = detection.evaluate_run(workdir, step)
    result['step'] = step
    return result
  exp = Experiment(config, workdir, read_only=True)
  if split not in exp.data.evals:
    raise ConfigError(f"split '{split}' is not held out in this run; choose "
                      f'one of {sorted(exp.data.evals)}')
  step = exp.checkpointer.resolve(checkpoint)
  state = exp.restore(exp.abstract_state(), step)
  result = exp.evaluate(state, split)
  result['step'] = step
  return result
