"""Classification + localization: the task of `configs/localization.py`.

The three-step recipe (`stage`): `classify` trains the trunk and class head
with cross-entropy (the box head frozen); `regress` trains the box head
alone with an L2 loss on (x, y, w, h), the trunk and class head frozen (no
update, no decay, no optimizer state); `both` runs both heads at test time
(an evaluation-only run, num_train_steps=0); `joint` trains everything with
cross-entropy + box_weight * L2.

Held-out metric: `loc_error` on `test`, the ILSVRC localization error of the
single centred window (wrong class, or IoU < 0.5); also reported: class
`error`, `mean_iou`, `iou50`, `oracle_loc_error` (the box alone, class taken
as right), the mean-box baseline (`mean_box_*`: the net's class, the mean
training box), and at the run's last evaluation multi-scale dense
evaluation (`dense_*`). With more than 5 classes (Tiny ImageNet) also the
top-5 versions (`top5_error`, `*loc_error_top5`).

Data: CIFAR pasted on canvases (`synthetic`), VOC 2007 single-object images
(`voc`), or any TFDS dataset with one `bbox` per image at canvas x canvas
(`tiny_imagenet`).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnn.data import input_pipeline
from cnn.data import synthetic_localization as synth
from cnn.errors import ConfigError
from cnn.ops import boxes as box_ops
from cnn.tasks import base
from cnn.tasks.localization import dense
from cnn.tasks.localization import model as model_lib
from cnn.training import transfer

STAGES = ('classify', 'regress', 'both', 'joint')
# Besides these, any TFDS dataset with one `bbox` per image (tiny_imagenet).
DATASETS = ('synthetic', 'voc')
# The parameters each stage trains, as freeze specs over the others.
_FREEZE = {'classify': 're:^box_', 'regress': 're:^(?!box_)', 'both': '',
           'joint': ''}


def _flip(images, boxes, flip, canvas):
  """Mirror the images where `flip` and their boxes with them."""
  images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
  x = jnp.where(flip, canvas - boxes[:, 0] - boxes[:, 2], boxes[:, 0])
  return images, boxes.at[:, 0].set(x)


class Canvases:
  """Training canvases with `len()` and `batch(indices)` for the loop."""

  def __init__(self, dataset):
    self.dataset = dataset  # LocalizationData, or the lazy synthetic set

  def __len__(self) -> int:
    return len(self.dataset)

  def batch(self, indices) -> dict:
    d = self.dataset
    if not isinstance(d, synth.LocalizationData):
      d = d.render(indices)
      return {'image': d.images, 'label': d.labels, 'box': d.boxes}
    return {'image': d.images[indices], 'label': d.labels[indices],
            'box': d.boxes[indices]}


def load_boxed(name: str, split: str, data_dir, canvas: int,
               limit: int | None) -> synth.LocalizationData:
  """A TFDS split with one box per image (Tiny ImageNet) as canvases.

  Boxes go from TFDS's normalised (ymin, xmin, ymax, xmax) to (x, y, w, h)
  in pixels; the images must already be canvas x canvas.

  Raises:
    DataError: no such dataset, or it has no `bbox` feature.
    ConfigError: its images are not canvas x canvas.
  """
  if limit:  # read only what is used
    split = f'{split}[:{limit}]'
  data = input_pipeline.load_arrays(name, split, data_dir, boxes=True)
  h, w = data.images.shape[1:3]
  if (h, w) != (canvas, canvas):
    raise ConfigError(f"dataset '{name}' has {h}x{w} images: set "
                      f'--config.canvas={h}' if h == w else
                      f"dataset '{name}' has {h}x{w} images, not square")
  if data.images.shape[-1] == 1:
    data = input_pipeline.ArrayData(np.repeat(data.images, 3, -1),
                                    data.labels, data.boxes)
  ymin, xmin, ymax, xmax = data.boxes.T
  boxes = np.stack([xmin * w, ymin * h, (xmax - xmin) * w,
                    (ymax - ymin) * h], axis=1).astype(np.float32)
  return synth.LocalizationData(data.images, data.labels, boxes)


class LocalizationData:
  """Train canvases, the test set, the mean training box, class names."""

  def __init__(self, config):
    self.class_names = None
    if config.dataset not in DATASETS:
      train = load_boxed(config.dataset, config.train_split, config.data_dir,
                         config.canvas, config.train_examples or None)
      test = load_boxed(config.dataset, config.test_split, config.data_dir,
                        config.canvas, config.test_examples or None)
      self.num_classes = input_pipeline.dataset_info(config.dataset,
                                                     config.data_dir)[0]
      self.class_names = input_pipeline.class_names(config.dataset,
                                                    config.data_dir)
    elif config.dataset == 'voc':
      train = synth.load_voc(config.train_split, config.data_dir,
                             config.canvas, config.train_examples or None)
      test = synth.load_voc(config.test_split, config.data_dir,
                            config.canvas, config.test_examples or None)
      self.num_classes = 20
    else:
      kw = dict(canvas=config.canvas, seed=config.seed,
                background=config.background)
      train = synth.load(config.source, config.train_split, config.data_dir,
                         limit=config.train_examples, **kw)
      test = synth.load(config.source, config.test_split, config.data_dir,
                        limit=config.test_examples, **kw).materialize()
      self.num_classes = input_pipeline.dataset_info(config.source,
                                                     config.data_dir)[0]
    self.mean_box = train.boxes.mean(axis=0)
    self.train = Canvases(train)
    self.evals = {'test': test}


class LocalizationTask(base.Task):
  """Class scores and one box per image; held-out metric: loc_error."""
  metric = 'loc_error'
  metric_mode = 'min'
  log_keys = ('loss', 'error', 'iou')
  eval_keys = ('error', 'top5_error', 'mean_iou', 'loc_error',
               'loc_error_top5', 'dense_loc_error', 'dense_loc_error_top5')
  # XLA's defaults: this step was measured (and its tables made) with the
  # fusion pass on; the CPU option that turns it off was measured on ResNets.
  compiler_options = None

  def __init__(self, config):
    super().__init__(config)
    self.stride = None

  def validate(self) -> None:
    c = self.config
    if c.stage not in STAGES:
      raise base.unknown_value('stage', c.stage, STAGES)
    if c.attach not in model_lib.ATTACH:
      raise base.unknown_value('attach', c.attach, model_lib.ATTACH)
    if c.merge not in dense.MERGES:
      raise base.unknown_value('merge', c.merge, dense.MERGES)
    if c.dataset not in DATASETS and not input_pipeline.has_boxes(
        c.dataset, c.data_dir):
      raise ConfigError(
          f"dataset '{c.dataset}' has no 'bbox' feature (one box per image):"
          ' use tiny_imagenet, synthetic (CIFAR pasted on canvases) or voc '
          '(TFDS voc/2007)')
    if c.stage in ('regress', 'both') and not c.init_from:
      raise ConfigError(
          f'stage={c.stage} needs a trained trunk: set '
          '--config.init_from=WORKDIR of the classify (or regress) run')
    if c.stage == 'both' and c.num_train_steps:
      raise ConfigError('stage=both only evaluates: set '
                        '--config.num_train_steps=0')
    if min(c.scales) < 1.0:
      raise ConfigError(f'scales={tuple(c.scales)} must all be >= 1 (the '
                        'window is the whole training canvas)')

  def load_data(self, workdir: str, train: bool = True):
    del workdir, train  # The mean training box is a baseline either way.
    return LocalizationData(self.config)

  def make_model(self, data):
    model, self.stride = model_lib.make_model(self.config, data.num_classes)
    return model

  def init_variables(self, model, data, rng) -> dict:
    del data
    x = jnp.zeros((1, self.config.canvas, self.config.canvas, 3),
                  jnp.float32)
    return jax.jit(lambda r: model.init(r, x, train=False))(rng)

  def data_name(self) -> str:
    return base.canvases_name(self.config)

  def meta(self) -> dict:
    c = self.config
    return {'model': f'localizer/{c.model}/{c.attach}',
            'dataset': f'{c.dataset}/{c.source}'}

  def load_init_from(self, spec: str, params, batch_stats):
    """A localizer's weights: from another localization run only (its
    `classify` stage trains the trunk and the class head)."""
    return transfer.load_pretrained(
        spec, self.meta()['model'], params, batch_stats,
        new_head=self.config.new_head,
        other_model_fix=self._init_from_fix)

  def _init_from_fix(self, saved: str | None) -> str:
    c = self.config
    kind, _, rest = str(saved).partition('/')
    model, _, attach = rest.partition('/')
    if kind == 'localizer' and model and attach:
      fields = ' '.join(f'--config.{k}={v}' for k, v, now in (
          ('model', model, c.model), ('attach', attach, c.attach))
                        if v != now)
      return (f'set {fields} (that localizer), or start from a localization '
              f'run of {c.model} (attach {c.attach})')
    preset = 'classify' + (',tiny_imagenet' if c.dataset == 'tiny_imagenet'
                           else '')
    attach = '' if c.attach == 'conv' else f' --config.attach={c.attach}'
    return ('a localizer starts from a localization run, not a '
            'classifier: train its classify stage (trunk and class head), '
            'python -m experiments.train --config=configs/localization.py:'
            f'{preset} --config.model={c.model}{attach} --workdir=DIR, then '
            'set --config.init_from=DIR')

  def freeze_spec(self) -> str:
    own = _FREEZE[self.config.stage]
    return ','.join(s for s in (super().freeze_spec(), own) if s)

  def loss_fn(self, model, data):
    c = self.config
    canvas, box_weight, stage = c.canvas, float(c.box_weight), c.stage
    augment = bool(c.flip)

    def loss_fn(params, batch_stats, batch, rng):
      flip_rng, drop_rng = jax.random.split(rng)
      x = model_lib.preprocess(batch['image'])
      boxes, labels = batch['box'], batch['label']
      if augment:
        flip = jax.random.bernoulli(flip_rng, 0.5, (x.shape[0],))
        x, boxes = _flip(x, boxes, flip, canvas)
      logits, codes = model.apply({'params': params}, x, train=True,
                                  rngs={'dropout': drop_rng})
      logits, codes = logits[:, 0, 0], codes[:, 0, 0]
      ce = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
      l2 = jnp.sum((codes - boxes / canvas) ** 2, axis=-1).mean()
      loss = {'classify': ce, 'regress': l2,
              'joint': ce + box_weight * l2}[stage]
      iou = box_ops.iou(jax.lax.stop_gradient(codes) * canvas, boxes)
      metrics = {'class_loss': ce, 'box_loss': l2,
                 'error': jnp.mean(jnp.argmax(logits, -1) != labels),
                 'iou': jnp.mean(iou)}
      return loss, (metrics, batch_stats)
    return loss_fn

  def evaluate(self, model, variables, data, split, *, final, shard) -> dict:
    """Single-window metrics + the mean-box baseline; at the last
    evaluation also multi-scale dense evaluation (`config.dense_eval`)."""
    del shard  # Small held-out sets: evaluated on the default device.
    c, test = self.config, data.evals[split]
    params = variables['params']
    t0 = time.perf_counter()
    logits, boxes = dense.predict(model, params, test.images,
                                  c.eval_batch_size)
    # Guesses best first: 5 where there are more than 5 classes (top-5).
    k = min(5, logits.shape[-1])
    classes = np.argsort(-logits, axis=-1, kind='stable')[:, :k]
    out = {'error': float(np.mean(classes[:, 0] != test.labels)),
           'box_loss': float(np.mean(np.sum(
               ((boxes - test.boxes) / c.canvas) ** 2, -1)))}
    if k == 5:
      out['top5_error'] = float(np.mean(
          ~np.any(classes == test.labels[:, None], axis=1)))
    out.update(dense.box_metrics(boxes, test.boxes, '', classes,
                                 test.labels))
    # The mean-box baseline: the net's classes, the mean training box.
    out.update(dense.box_metrics(
        np.broadcast_to(data.mean_box, test.boxes.shape), test.boxes,
        'mean_box_', classes, test.labels))
    if final and c.dense_eval:
      d_classes, d_boxes = dense.dense_predict(
          model, params, test.images, window=c.canvas, stride=self.stride,
          scales=tuple(c.scales), merge=c.merge,
          merge_threshold=c.merge_threshold, batch_size=c.eval_batch_size,
          guesses=k)
      out['dense_error'] = float(np.mean(d_classes[:, 0] != test.labels))
      out.update(dense.box_metrics(d_boxes, test.boxes, 'dense_', d_classes,
                                   test.labels))
    out['eval_seconds'] = time.perf_counter() - t0
    out['examples'] = float(len(test))
    return out

  def picture(self, model, variables, data, path: str) -> None:
    """Test canvases with the dense score map of the true class, the true
    and the predicted (dense) boxes."""
    from cnn.tasks.localization import picture  # pylint: disable=g-import-not-at-top
    picture.draw(self.config, model, variables['params'], self.stride,
                 data.evals['test'], path, names=data.class_names)
