"""The fields every config shares: optimizer, schedule, run cadence.

They are read by the one training loop (`cnn/training/`) whatever the task:
  learning_rate, lr_schedule ('step' | 'plateau' | 'cosine' | 'constant'),
  lr_milestones or lr_milestone_fractions / lr_factor (step; plateau's cut
  too), plateau.* (PyTorch
  ReduceLROnPlateau: monitor is a held-out split, 'val' or 'test'),
  warmup_steps / warmup_lr / warmup ('constant' | 'linear'), momentum,
  nesterov, weight_decay, decay_bn_and_bias; init_from / freeze / new_head
  (transfer, applied when a run starts fresh); batch_size, num_train_steps,
  seed; eval / checkpoint / log cadence in steps, keep_checkpoints (the last
  N; the best by the task's held-out metric is kept too), tensorboard;
  the numerics of the step, recorded in config.json like every field (a
  change on resume is said: the steps differ by float32 rounding): conv, the
  convolution's implementation ('auto': oneDNN's kernels on a CPU where they
  are built, else XLA's; 'onednn'; 'xla'); conv_weight_grad, XLA's weight
  gradient ('auto': summed over batch chunks measured per shape on CPU;
  'xla'; a chunk count); xla_cpu_conv, XLA:CPU's convolution kernels
  ('auto', 'ynnpack', 'eigen'); xla_cpu_fusion, XLA:CPU's fusion pass in the
  train step ('auto', 'on', 'off'). See `cnn.ops.conv` and
  `cnn.training.step`; 'auto' is what measured fastest.

And the one rule every config names its data folder by (`data_dir`).
"""
import os

from ml_collections import config_dict

# The prepared TFDS datasets beside the project (../shared/data/tfds from
# its root): CIFAR-10 as JPEG, MNIST, Tiny ImageNet, ...
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TFDS = os.path.join(os.path.dirname(_ROOT), 'shared', 'data', 'tfds')


def data_dir() -> str | None:
  """The folder TFDS datasets are read from, the same for every config.

  TFDS's own `$TFDS_DATA_DIR` when it is set; else the prepared copies in
  ../shared/data/tfds beside the project when that folder exists; else None
  (TFDS's default, ~/tensorflow_datasets, where it downloads on first use).
  `--config.data_dir=DIR` overrides it, and config.json records the value.

  The shared folder is named relative to the working directory when that is
  the project's root (as the README's commands run, and as the runs of
  results/ recorded it, so they resume unchanged), else by its absolute path.
  """
  env = os.environ.get('TFDS_DATA_DIR')
  if env:
    return env
  if not os.path.isdir(SHARED_TFDS):
    return None
  if os.path.abspath(os.getcwd()) == _ROOT:
    return os.path.relpath(SHARED_TFDS)
  return SHARED_TFDS


def dataset_and_dir(prepared: str, tfds_name: str) -> tuple[str, str | None]:
  """The dataset a config reads by default, and its folder (`data_dir()`).

  Args:
    prepared: a prepared copy (e.g. 'cifar10_jpeg'), read where the folder
      holds it.
    tfds_name: TFDS's own dataset (e.g. 'cifar10'), read elsewhere, and
      downloaded into the folder on first use where there is network.
  """
  folder = data_dir()
  if folder and os.path.isdir(os.path.join(os.path.expanduser(folder),
                                           prepared)):
    return prepared, folder
  return tfds_name, folder


def data_dir_field(folder: str | None) -> config_dict.FieldReference:
  """`folder` as a config field of type str that may be None (TFDS's default
  folder), so `--config.data_dir=DIR` parses either way."""
  return config_dict.FieldReference(folder, field_type=str)


def add_training_fields(c: config_dict.ConfigDict, *, batch_size: int,
                        num_train_steps: int, learning_rate: float,
                        weight_decay: float, lr_schedule: str = 'step',
                        lr_milestones=(), lr_milestone_fractions=(),
                        lr_factor: float = 0.1,
                        warmup_steps: int = 0, warmup_lr: float = 0.0,
                        warmup: str = 'constant',
                        decay_bn_and_bias: bool = True,
                        plateau_monitor: str = 'val',
                        eval_every_steps: int = 1000,
                        checkpoint_every_steps: int = 1000,
                        log_every_steps: int = 100,
                        keep_checkpoints: int = 2) -> config_dict.ConfigDict:
  """Sets the shared fields on `c` (in place) and returns it."""
  # Transfer learning (cnn/training/transfer.py).
  c.init_from = ''  # 'runs/pre', 'runs/pre:best', 'runs/pre:2000'.
  c.freeze = ''  # 'trunk', 'stem,stage1', 'head', 're:^stage1/'.
  c.new_head = False  # Re-initialise `head` even when its shape fits.

  c.batch_size = batch_size
  c.num_train_steps = num_train_steps
  c.seed = 0

  c.learning_rate = learning_rate
  c.lr_schedule = lr_schedule
  c.lr_milestones = tuple(lr_milestones)
  # Or milestones as fractions of num_train_steps (they follow an override
  # of the run's length); one of the two is empty.
  c.lr_milestone_fractions = tuple(lr_milestone_fractions)
  c.lr_factor = lr_factor
  c.plateau = config_dict.ConfigDict(dict(
      monitor=plateau_monitor, patience=5, threshold=1e-3,
      threshold_mode='abs', cooldown=0, min_lr=1e-4))
  c.warmup_steps = warmup_steps
  c.warmup_lr = warmup_lr
  c.warmup = warmup
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = weight_decay
  c.decay_bn_and_bias = decay_bn_and_bias

  c.eval_every_steps = eval_every_steps
  c.checkpoint_every_steps = checkpoint_every_steps
  c.log_every_steps = log_every_steps
  c.keep_checkpoints = keep_checkpoints
  c.tensorboard = True
  c.conv = 'auto'
  c.conv_weight_grad = 'auto'
  c.xla_cpu_conv = 'auto'
  c.xla_cpu_fusion = 'auto'
  return c
