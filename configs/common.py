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
  conv, the convolution's implementation ('auto': oneDNN's kernels on a CPU
  where they are built, else XLA's; 'onednn'; 'xla': `cnn.ops.conv`).
"""
from ml_collections import config_dict


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
  return c
