r"""CIFAR-10 with the recipe of He et al. 2015, section 4.2.

Batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k
and 48k iterations, stop at 64k; pad-4 random crop and horizontal flip;
per-pixel mean subtraction. The argument is the model name (any
`cifar_resnet{6n+2}` / `cifar_plain{6n+2}` of the registry).

Train ResNet-20 on the prepared JPEG copy of CIFAR-10:

  python -m experiments.train --config=configs/cifar10.py:cifar_resnet20 \
    --workdir=runs/r20 --config.dataset=cifar10_jpeg \
    --config.data_dir=../shared/data/tfds

Expected: test error about 8.5-9 % at 64k steps (paper: 8.75 % on the original
CIFAR-10; the JPEG copy costs a little). 300 steps reach about 50 % (chance is
90 %). The paper's 45k/5k split: `--config.val_examples=5000`.
"""
from ml_collections import config_dict


def get_config(arg: str = 'cifar_resnet20') -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.model = arg or 'cifar_resnet20'
  c.model_kwargs = config_dict.ConfigDict()  # e.g. {'shortcut': 'B'}
  c.num_classes = 0  # 0: the dataset's.
  c.dtype = 'float32'  # 'bfloat16': mixed precision (params stay float32).

  # Transfer learning (cnn/transfer.py); applied only when a run starts fresh.
  c.init_from = ''  # 'runs/pre', 'runs/pre:best', 'runs/pre:2000'.
  c.freeze = ''  # 'trunk', 'stem,stage1', 'head', 're:^stage1/'.
  c.new_head = False  # Re-initialise `head` even when its shape fits.

  c.dataset = 'cifar10'
  c.data_dir = config_dict.placeholder(str)
  c.train_split = 'train'
  c.test_split = 'test'
  c.val_examples = 0  # 5000: the paper's 45k/5k split (last 5k held out).
  c.in_memory = 'auto'
  c.augment = 'crop_flip'  # 'flip' or 'none'
  c.pad = 4
  c.mean_subtraction = 'per_pixel'  # 'per_channel' or 'none'
  # Class subsets (transfer learning): original labels kept, relabelled
  # 0..k-1 in this order, e.g. (5, 6, 7, 8, 9); () keeps all classes.
  c.classes = ()
  c.train_examples_per_class = 0  # N > 0: the first N of each class only.

  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_train_steps = 64_000
  c.seed = 0

  c.learning_rate = 0.1
  c.lr_schedule = 'step'  # 'plateau', 'cosine', 'constant'
  c.lr_milestones = (32_000, 48_000)
  c.lr_factor = 0.1
  c.plateau = config_dict.ConfigDict(dict(
      monitor='val', patience=5, threshold=1e-3, threshold_mode='abs',
      cooldown=0, min_lr=1e-4))
  c.warmup_steps = 0  # He et al. use 0.01 for ~400 steps for ResNet-110.
  c.warmup_lr = 0.01
  c.warmup = 'constant'  # or 'linear'
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 1e-4
  c.decay_bn_and_bias = True

  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100
  c.keep_checkpoints = 2
  c.tensorboard = True
  return c
