"""What a task supplies to the one training loop. `cnn.runs` looks the task
up, builds a `Run` from it and hands that to `cnn.training.loop.train`.

A task is what differs between, say, classification and detection: its
config checks, its data, its model, its loss and its evaluation. The rest
is the same for all tasks: `cnn.runs.Run` holds the device mesh, the
optimizer and schedules (`cnn.training.optim`), init_from / freeze
(`cnn.training.transfer`) and the jitted step; the loop and its hooks own
the NaN guard, checkpoints, exact resume and metrics.jsonl / TensorBoard /
progress line. So adding a task touches no loop: subclass `Task`, then
`cnn.tasks.register(name, cls)`.

Data objects are the task's own; the loop and `Run` read only
  * `data.train`: the training examples, with `len()` and
    `batch(indices) -> dict of arrays` with a leading batch axis (the
    indices come from `cnn.training.batches.TrainBatches`: batch of step
    s = f(seed, s)), or None;
  * `data.train_stream` (optional): an iterable of batches for datasets
    that stream (ImageNet), used when `data.train` is None;
  * `data.evals`: {split: anything `evaluate` takes}, splits named from
    one vocabulary: 'val' (held out of the training data) and 'test'.
"""
from __future__ import annotations

from typing import Any, Callable

from cnn.errors import ConfigError
from cnn.training import transfer

SPLITS = ('val', 'test')


class Task:
  """Base class of the tasks; override what differs.

  Class attributes:
    name: the `config.task` that selects it.
    metric: the held-out metric, a key of `evaluate`'s result; it picks the
      best checkpoint and drives reduce-on-plateau.
    metric_mode: 'min' (an error) or 'max' (mAP).
    log_keys: train metrics shown on the console progress line.
    eval_keys: held-out metrics shown on the console after an evaluation.
    compiler_options: XLA options of the train step: 'default' takes the
      run's numerics' (`cnn.ops.compiler.train_step_options`: the config's
      convolution engine and fusion setting on CPU), None XLA's own.
  """
  name = ''
  metric = 'error'
  metric_mode = 'min'
  log_keys: tuple = ('loss',)
  eval_keys: tuple = ('loss', 'error')
  compiler_options: str | dict | None = 'default'

  def __init__(self, config):
    self.config = config

  def validate(self) -> None:
    """Raises ConfigError (one line) for task fields that cannot work."""

  def load_data(self, workdir: str, train: bool = True):
    """The task's data (see the module docstring); `train=False` when only
    the held-out splits are needed (evaluating a checkpoint), so a task may
    skip what only training needs."""
    raise NotImplementedError

  def make_model(self, data):
    """The Linen module (an `nn.Module`)."""
    raise NotImplementedError

  def init_variables(self, model, data, rng) -> dict:
    """Fresh variables {'params': ..., 'batch_stats': ...} from a PRNG key."""
    raise NotImplementedError

  def loss_fn(self, model, data) -> Callable:
    """`(params, model_state, batch, rng) -> (loss, (metrics,
    new_model_state))`, traced inside the jitted step; `model` may be
    `Run`'s wrapper of the task's model (frozen BatchNorm layers)."""
    raise NotImplementedError

  def evaluate(self, model, variables: dict, data, split: str, *,
               final: bool, shard: Callable) -> dict:
    """Metrics of the held-out split `data.evals[split]` (must include
    `metric` and 'examples'). `final` is True for the run's last evaluation (a task may
    add costlier measurements there); `shard(batch)` puts a host batch on
    the devices of the run's mesh."""
    raise NotImplementedError

  def meta(self) -> dict:
    """What a checkpoint must match: {'model': ..., 'dataset': ...}."""
    return {'model': self.config.model, 'dataset': self.config.dataset}

  def data_name(self) -> str:
    """What the run reads, for its first line ('loading NAME from ...')."""
    return str(self.config.dataset)

  def freeze_spec(self) -> str:
    """Parameters to freeze (`transfer.freeze_masks` syntax)."""
    return self.config.freeze

  def load_init_from(self, spec: str, params, batch_stats):
    """(params, batch_stats, message) with the weights of another run
    (`config.init_from`); by default a run of the same model."""
    return transfer.load_pretrained(
        spec, self.meta()['model'], params, batch_stats,
        new_head=self.config.new_head)

  def picture(self, model, variables: dict, data, path: str) -> None:
    """Draws predictions on held-out images to a PNG (optional)."""
    raise ConfigError(f"task '{self.name}' draws no pictures")


def canvases_name(config) -> str:
  """`Task.data_name` of the tasks that paste `config.source`'s images on
  canvases where `config.dataset` is 'synthetic' (localization, detection)."""
  if config.dataset == 'synthetic' and config.source:
    return f'synthetic canvases of {config.source}'
  return str(config.dataset)


def unknown_value(field: str, value: Any, choices) -> ConfigError:
  return ConfigError(f"{field}='{value}' is unknown; use one of "
                     f'{", ".join(choices)}')
