"""Classification on a TFDS dataset: the task of `configs/cifar10.py`,
`configs/mnist.py`, `configs/imagenet.py`.

Loss: softmax cross-entropy; held-out metric: top-1 `error` (lower is
better), over every example of the split (the last batch is padded and
masked). Augmentation (pad-and-crop, flip) and mean subtraction run on the
device inside the jitted step; the batch of step s is a function of (seed,
s) for in-memory datasets.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cnn import models
from cnn.data import augment as augment_lib
from cnn.data import input_pipeline
from cnn.errors import ConfigError
from cnn.ops import conv as conv_ops
from cnn.tasks import base

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
AUGMENTS = ('crop_flip', 'rrc_flip', 'flip', 'none')
# Every field the task reads (configs/common.py: classification).
REQUIRED_FIELDS = (
    'model', 'model_kwargs', 'num_classes', 'dtype', 'dataset', 'data_dir',
    'train_split', 'test_split', 'val_examples', 'in_memory', 'augment', 'pad',
    'crop_area', 'image_size', 'mean_subtraction', 'classes',
    'train_examples_per_class', 'eval_batch_size', 'label_smoothing')


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def model_kwargs(config, num_classes: int) -> dict:
  kwargs = dict(config.model_kwargs)
  kwargs['num_classes'] = config.num_classes or num_classes
  kwargs['dtype'] = DTYPES[config.dtype]
  return kwargs


def init_variables(model, image_shape, rng) -> dict:
  """The model's variables for images of `image_shape` (H, W, C)."""
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  # XLA's RngBitGenerator ('rbg') compiles the init of a deep net faster on
  # CPU than threefry (results/speed/README.md, "Numbers behind the code's
  # comments"); the values are still a pure function of the seed on a given
  # backend.
  init_key = jax.random.wrap_key_data(jnp.tile(rng, 2), impl='rbg')
  return jax.jit(lambda r: model.init(r, dummy, train=False))(init_key)


def check_input_shape(model, name: str, image_shape, dataset: str) -> None:
  """Refuses an input that a model cannot take (before anything runs).

  A net whose maps shrink to nothing (four pools on 8x8) or whose FC layer
  was sized for another input would otherwise fail deep in XLA, or (an
  empty map into a Dense layer) train on biases alone.

  Raises:
    ConfigError: one line naming the model, the image size and the layer.
  """
  dummy = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  where = (f"model {name} cannot take the {'x'.join(map(str, image_shape))} "
           f"images of dataset '{dataset}'")
  hint = (f'use a model made for that size (models.default_input_shape: '
          f'{name} expects {"x".join(map(str, models.default_input_shape(name)))})')
  try:
    _, state = jax.eval_shape(
        lambda x: model.init_with_output(
            jax.random.key(0), x, train=False,
            capture_intermediates=True), dummy)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    raise ConfigError(f'{where}: it fails on that size ({first}); '
                      f'{hint}') from None
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      state.get('intermediates', {})):
    if 0 in leaf.shape:
      layer = '/'.join(str(getattr(k, 'key', k)) for k in path[:-1])
      raise ConfigError(f'{where}: the map is empty after {layer} '
                        f'{tuple(leaf.shape)}; {hint}')


def smoothed_cross_entropy(logits, labels, smoothing: float):
  """Cross-entropy against labels smoothed to (1 - s) one-hot + s / K
  (Szegedy et al. 2016, section 7); s = 0 is the plain cross-entropy."""
  if not smoothing:
    return cross_entropy(logits, labels)
  k = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, k), smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def make_loss_fn(model, mean, *, augment: str = 'crop_flip', pad: int = 4,
                 dtype=jnp.float32, label_smoothing: float = 0.0,
                 crop_area=(0.25, 1.0), image_size: int = 0):
  """`(params, batch_stats, batch, rng) -> (loss, ({'error'}, batch_stats))`.

  Args:
    model: a Linen module called as `model.apply(vars, x, train=...)`.
    mean: training mean in [0, 1] units, per pixel or per channel.
    augment: 'crop_flip' (pad, random crop, flip on device), 'rrc_flip'
      (random resized crop of `crop_area`, flip; `augment.
      random_resized_crop_flip`), 'flip' or 'none'.
    pad: padding for the random crop.
    dtype: compute dtype of the input (bfloat16 for mixed precision).
    label_smoothing: s of `smoothed_cross_entropy` (the train loss only;
      held-out losses stay the plain cross-entropy).
    crop_area: (min, max) area fractions of 'rrc_flip'.
    image_size: > 0: the (augmented) images are resized to this square
      size on the device before the net (bilinear; e.g. CIFAR's 32x32 to
      the 64x64 of a net pretrained on Tiny ImageNet).
  """
  if augment not in AUGMENTS:
    raise base.unknown_value('augment', augment, AUGMENTS)
  mean = jnp.asarray(mean)

  def loss_fn(params, batch_stats, batch, rng):
    aug_rng, dropout_rng = jax.random.split(rng)
    images = augment_lib.normalize(batch['image'], mean)
    if augment == 'rrc_flip':
      images = augment_lib.random_resized_crop_flip(aug_rng, images,
                                                    tuple(crop_area))
    elif augment != 'none':
      images = augment_lib.random_crop_flip(
          aug_rng, images, pad if augment == 'crop_flip' else 0)
    images = resize(images, image_size).astype(dtype)
    labels = batch['label']
    logits, new_vars = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images,
        train=True, mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    loss = smoothed_cross_entropy(logits, labels, label_smoothing).mean()
    error = jnp.mean(jnp.argmax(logits, -1) != labels)
    return loss, ({'error': error}, new_vars.get('batch_stats', batch_stats))
  return loss_fn


# Top-5 error is reported for datasets with more classes than this (Tiny
# ImageNet, ImageNet), as in ILSVRC; not for CIFAR-10 or MNIST.
TOP5_MIN_CLASSES = 10


def top5_wrong(logits, labels):
  """1.0 where the label is not among the 5 highest logits."""
  _, top = jax.lax.top_k(logits, 5)
  return 1.0 - jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def resize(images, size: int):
  """Square `size` images (bilinear), or `images` when size is 0 or theirs."""
  n, h, w, c = images.shape
  if not size or (h, w) == (size, size):
    return images
  return jax.image.resize(images, (n, size, size, c), 'bilinear')


def make_eval_step(model, mean, dtype=jnp.float32, image_size: int = 0):
  """Jitted `(variables, batch) -> summed {'loss', 'error', 'count'}`, plus
  'top5_error' for more than `TOP5_MIN_CLASSES` classes; `image_size` as in
  `make_loss_fn`."""
  mean = jnp.asarray(mean)

  def eval_step(variables, batch):
    images = resize(augment_lib.normalize(batch['image'], mean),
                    image_size).astype(dtype)
    logits = model.apply(variables, images, train=False)
    mask = batch['mask']
    wrong = (jnp.argmax(logits, -1) != batch['label']).astype(jnp.float32)
    out = {'loss': jnp.sum(cross_entropy(logits, batch['label']) * mask),
           'error': jnp.sum(wrong * mask),
           'count': jnp.sum(mask)}
    if logits.shape[-1] > TOP5_MIN_CLASSES:
      out['top5_error'] = jnp.sum(top5_wrong(logits, batch['label']) * mask)
    return out
  # No weight gradients, hence none of the transposes that make the train
  # step skip XLA's fusion: evaluation keeps XLA's defaults.
  # The convolution engine of the train step (config.xla_cpu_conv).
  return jax.jit(eval_step,
                 compiler_options=conv_ops.engine_compiler_options())


class ClassificationTask(base.Task):
  """Labels in, class scores out; held-out metric: top-1 error."""
  metric = 'error'
  metric_mode = 'min'
  log_keys = ('loss', 'error')
  eval_keys = ('loss', 'error', 'top5_error')

  def __init__(self, config):
    super().__init__(config)
    self._eval_step = None

  def validate(self) -> None:
    config = self.config
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
      raise ConfigError(f'config lacks fields {missing}; start from a config '
                        'in configs/')
    if config.dtype not in DTYPES:
      raise ConfigError(f"dtype='{config.dtype}' is unknown; use float32 or "
                        'bfloat16')
    if not 0.0 <= float(config.label_smoothing) < 1.0:
      raise ConfigError(f'label_smoothing={config.label_smoothing} must be in '
                        '[0, 1)')
    if config.augment not in AUGMENTS:
      raise base.unknown_value('augment', config.augment, AUGMENTS)
    if config.lr_schedule == 'plateau':
      monitor = config.plateau.monitor
      if monitor not in base.SPLITS:
        raise ConfigError(f"plateau.monitor='{monitor}' must be val or test")
      if monitor == 'val' and not config.val_examples:
        raise ConfigError('plateau.monitor=val needs a held-out split: set '
                          '--config.val_examples=5000 (or monitor=test)')
    try:
      models.get_model(config.model, **model_kwargs(config, num_classes=10))
    except (ValueError, TypeError) as e:
      raise ConfigError(str(e).splitlines()[0]) from None

  def load_data(self, workdir: str, train: bool = True):
    del workdir, train  # The training mean is needed either way.
    return input_pipeline.get_datasets(self.config)

  def make_model(self, data):
    model = models.get_model(self.config.model,
                             **model_kwargs(self.config, data.num_classes))
    check_input_shape(model, self.config.model, self.input_shape(data),
                      self.config.dataset)
    return model

  def input_shape(self, data) -> tuple:
    """(H, W, C) the net sees: the data's, or image_size x image_size."""
    size = int(self.config.image_size)
    if not size:
      return tuple(data.image_shape)
    return (size, size, data.image_shape[-1])

  def init_variables(self, model, data, rng) -> dict:
    return init_variables(model, self.input_shape(data), rng)

  def _dtype(self):
    return DTYPES[self.config.dtype]

  def loss_fn(self, model, data):
    c = self.config
    return make_loss_fn(
        model, data.mean,
        augment=c.augment if data.train is not None else 'none',
        pad=c.pad, dtype=self._dtype(),
        label_smoothing=float(c.label_smoothing),
        crop_area=tuple(c.crop_area), image_size=int(c.image_size))

  def evaluate(self, model, variables, data, split, *, final, shard) -> dict:
    """Loss and top-1 error over the whole split (no example dropped)."""
    del final
    if self._eval_step is None:
      self._eval_step = make_eval_step(
          model, data.mean, self._dtype(), int(self.config.image_size))
    eval_data = data.evals[split]
    if isinstance(eval_data, input_pipeline.ArrayData):
      batches = input_pipeline.eval_batches(eval_data,
                                            self.config.eval_batch_size)
    else:
      batches = iter(eval_data)
    totals = None
    for batch in batches:
      out = self._eval_step(variables, shard(batch))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = float(totals['count'])
    out = {k: float(v) / count for k, v in totals.items() if k != 'count'}
    out['examples'] = count
    return out
