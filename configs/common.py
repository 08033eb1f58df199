"""The fields every config shares: optimizer, schedule, run cadence.

They are read by the one training loop (`cnn/training/`) whatever the task:
  learning_rate, lr_schedule ('step' | 'plateau' | 'cosine' | 'constant'),
  lr_milestones or lr_milestone_fractions / lr_factor (step; plateau's cut
  too), plateau.* (PyTorch
  ReduceLROnPlateau: monitor is a held-out split, 'val' or 'test'),
  warmup_steps / warmup_lr / warmup ('constant' | 'linear'), momentum,
  nesterov, weight_decay, decay_bn_and_bias; ema_decay (d > 0: an
  exponential moving average of the weights and BatchNorm statistics,
  evaluated beside the model as split `SPLIT_ema`); init_from / freeze / new_head
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

And the one rule every config names its data folder by (`data_dir`), the
fields of every classification run (`classification`), and the one grammar
of a config file's argument (`Grammar`: `file.py:WORD[,WORD...][,key=value
...]`).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any

from ml_collections import config_dict

from cnn.errors import ConfigError

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
  c.ema_decay = 0.0  # e.g. 0.999: also evaluate a moving average (test_ema)

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


def classification(model: str, dataset: str, data_dir: str | None,
                   **training) -> config_dict.ConfigDict:
  """Every field of a classification run (`cnn.tasks.classification`) at
  the CIFAR-10 recipe's value, then the training fields
  (`add_training_fields(c, **training)`); a config file changes what differs
  (configs/tiny_imagenet.py, configs/mnist.py, configs/imagenet.py)."""
  c = config_dict.ConfigDict()
  c.task = 'classification'
  c.model = model
  c.model_kwargs = config_dict.ConfigDict()  # e.g. {'shortcut': 'B'}
  c.num_classes = 0  # 0: the dataset's.
  c.dtype = 'float32'  # 'bfloat16': mixed precision (params stay float32).

  c.dataset = dataset
  c.data_dir = data_dir_field(data_dir)
  c.train_split = 'train'
  c.test_split = 'test'
  c.val_examples = 0  # 5000: the paper's 45k/5k split (last 5k held out).
  c.in_memory = 'auto'  # 'yes', or 'no': stream through tf.data.
  c.augment = 'crop_flip'  # 'rrc_flip', 'flip' or 'none'
  c.pad = 4  # crop_flip: zero padding before the random crop
  c.crop_area = (0.25, 1.0)  # rrc_flip: the crop's share of the image area
  # 0: the images' own size (a streamed dataset: 224); N > 0: resized on the
  # device to N x N (transfer to another input size, the detectors' 32x32).
  c.image_size = 0
  c.mean_subtraction = 'per_pixel'  # 'per_channel' or 'none'
  # Class subsets (transfer learning): original labels kept, relabelled
  # 0..k-1 in this order, e.g. (5, 6, 7, 8, 9); () keeps all classes.
  c.classes = ()
  c.train_examples_per_class = 0  # N > 0: the first N of each class only.
  c.eval_batch_size = 500
  c.label_smoothing = 0.0  # s: targets (1 - s) one-hot + s / K.
  return add_training_fields(c, **training)


# --- The argument of a config file: `file.py:WORD[,WORD...][,key=value...]`.

@dataclasses.dataclass(frozen=True)
class Word:
  """One positional word of a config file's argument.

  Attributes:
    name: what it sets (`model`, `preset`); a free word shows it in capitals
      in the usage line (MODEL).
    choices: the words allowed; () any word (a model name, which the task
      checks against the registry with a did-you-mean of its own).
    default: its value when the argument leaves it out or empty; '' is off.
  """
  name: str
  choices: tuple[str, ...] = ()
  default: str = ''


@dataclasses.dataclass(frozen=True)
class Grammar:
  """The argument of one config file: positional words, then key=value.

  `parse('cifar_resnet20,fast')`, `parse('cpu,seeds=3,depths=20-56')`. The
  first word is always the first slot's (empty: its default); each later
  word fills the next slot that allows it, so an optional slot may be left
  out (`fast_rcnn,local` leaves out `raccoon|coco128`) but the order is
  fixed. A key=value part sets an option, converted to its default's type
  (int, float, str, or a tuple of ints written a-b-c). Anything else is one
  ConfigError line naming the part, the closest allowed word and the usage.

  Attributes:
    words: the slots, in order.
    options: the allowed keys and their defaults.
    default: the whole argument when none is given (None, or '' as
      `file.py:` passes it).
  """
  words: tuple[Word, ...]
  options: dict[str, Any] = dataclasses.field(default_factory=dict)
  default: str = ''

  def usage(self) -> str:
    """E.g. `MODEL[,fast|fast_local]` or `paper|fig6|cpu|local[,seeds=N]`."""
    parts = []
    for i, w in enumerate(self.words):
      text = '|'.join(w.choices) if w.choices else w.name.upper()
      parts.append(text if i == 0 else f'[,{text}]')
    for key, value in self.options.items():
      parts.append(f'[,{key}={_placeholder(value)}]')
    return ''.join(parts)

  def parse(self, arg: str | None) -> dict[str, Any]:
    """{slot or option name: value} of `arg`; see the class docstring.

    Raises:
      ConfigError: a word no slot allows here, an unknown key, or a value
        of the wrong type (one line, with the fix).
    """
    text = arg if arg else self.default
    out = {w.name: w.default for w in self.words}
    out.update(self.options)
    pos = 0  # the next slot a word may fill
    for i, raw in enumerate(text.split(',')):
      part = raw.strip()
      if '=' in part:
        key, _, value = part.partition('=')
        out[key.strip()] = self._option(key.strip(), value.strip(), part, text)
      elif i == 0:  # the first slot's word; empty: its default
        pos = self._place(part, 0, text, out, first=True) if part else 1
      elif part:
        pos = self._place(part, pos, text, out)
    return out

  def _place(self, part: str, pos: int, text: str, out: dict,
             first: bool = False) -> int:
    """Puts word `part` in the first slot from `pos` on that allows it (the
    first slot only, for the argument's first word); returns the slot
    after it."""
    slots = self.words[:1] if first else self.words[pos:]
    for k, w in enumerate(slots, start=pos):
      if not w.choices and k != pos:
        break  # a free word (a model name) is never skipped to
      if not w.choices or part in w.choices:
        out[w.name] = part
        return k + 1
    if any(part in w.choices for w in self.words[:pos]):
      raise ConfigError(f"'{part}' is out of place in '{text}': one word "
                        f'per slot, in the order {self.usage()}')
    later = [c for w in slots for c in w.choices]
    if not later:
      raise ConfigError(f"unexpected '{part}' in '{text}': write "
                        f'{self.usage()}')
    raise self._unknown(part, text, later)

  def _unknown(self, part: str, text: str, choices) -> ConfigError:
    close = difflib.get_close_matches(part.lower(), list(choices), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ''
    where = f" in '{text}'" if text != part else ''
    return ConfigError(f"unknown preset '{part}'{where}; {hint}use one of "
                       f"{', '.join(choices)}: write {self.usage()}")

  def _option(self, key: str, value: str, part: str, text: str) -> Any:
    if key not in self.options:
      close = difflib.get_close_matches(key, list(self.options), n=1)
      hint = f"did you mean '{close[0]}'? " if close else ''
      keys = (f"use key=value with key one of {', '.join(self.options)}"
              if self.options else 'this file takes no key=value option')
      raise ConfigError(f"unknown option '{part}' in '{text}'; {hint}{keys}: "
                        f'write {self.usage()}')
    default = self.options[key]
    try:
      if isinstance(default, tuple):
        return tuple(int(v) for v in value.split('-'))
      if isinstance(default, bool):
        raise ValueError('no bool options')
      return type(default)(value)
    except ValueError:
      raise ConfigError(f"bad value in option '{part}': expected "
                        f'{_placeholder(default, long=True)}, e.g. {key}='
                        f'{_example(default)}') from None


def _placeholder(default: Any, long: bool = False) -> str:
  if isinstance(default, tuple):
    return 'ints joined by -' if long else 'A-B-...'
  name = {int: ('N', 'an integer'), float: ('X', 'a number'),
          str: ('NAME', 'a word')}.get(type(default), ('VALUE', 'a value'))
  return name[1] if long else name[0]


def _example(default: Any) -> str:
  if isinstance(default, tuple):
    return '-'.join(map(str, default)) or '8-20'
  return str(default or {int: 2, float: 0.5}.get(type(default), 'x'))
