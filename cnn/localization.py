"""Classification + localization: a box-regression head beside the class head.

The lecture's route from classification to localization. One conv trunk (the
`features` of a registry model with an FC head, `cifar_fcnet` by default)
feeds two heads:
  * the class head: the model's FC layers and `head`, written as convs (the
    first an F x F VALID conv over the trunk's F x F map, the others 1x1), so
    at the training size they are exactly FC layers and on a larger image
    they slide (OverFeat, see `cnn.fully_conv`);
  * the box head (`box_fc*`, `box_head`): 4 numbers (x, y, w, h) of the
    object relative to the window (`cnn.ops.boxes.encode`), attached after
    the conv trunk (`attach='conv'`) or after the first FC layer
    (`attach='fc'`), the lecture's "where to attach the regression head?".

The three-step recipe (`stage`): `classify` trains the trunk and class head
with cross-entropy; `regress` trains the box head alone with an L2 loss on
(x, y, w, h), the trunk and class head frozen (optax.multi_transform with
set_to_zero, so they do not even decay); `both` runs both heads at test time;
`joint` trains everything with cross-entropy + box_weight * L2.

Multi-scale dense evaluation runs the net on the image resized by each of
`scales`, maps every position's class probabilities and box back to image
coordinates, picks the class with the highest mean probability summed over
scales, and merges that class's boxes (OverFeat's greedy merge, or NMS).

Metrics: classification error, mean IoU, the fraction with IoU >= 0.5, and
the same IoU figures for a baseline that always predicts the mean training
box.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnn import checkpointing
from cnn import fully_conv
from cnn import input_pipeline
from cnn import metric_writers
from cnn import models
from cnn import optim
from cnn import synthetic_localization as synth
from cnn.errors import CheckpointError, ConfigError
from cnn.models.common import Dtype, he_normal
from cnn.ops import boxes as box_ops

STAGES = ('classify', 'regress', 'both', 'joint')
ATTACH = ('conv', 'fc')
MERGES = ('greedy', 'nms')
# Fixed input scaling: canvases are mostly background noise around 127.
_MEAN, _STD = 0.5, 0.25
# Output layers start small: near-uniform class scores and boxes near the
# origin, instead of He-scaled outputs whose first L2 gradients blow up.
_SMALL = nn.initializers.variance_scaling(0.01, 'fan_in', 'normal')


class LocalizationNet(nn.Module):
  """Shared trunk, class head and box head, all convolutional.

  Returns (logits (B, H', W', K), box codes (B, H', W', 4)); H' = W' = 1 at
  the training size.

  Attributes:
    features: the conv trunk (`cnn.fully_conv.trunk_of` a registry model).
    window: F, the trunk's output side at the training input.
    fc_widths: the class head's hidden FC widths (the first is F x F).
    num_classes: classes.
    attach: 'conv' (box head reads the trunk) or 'fc' (reads the first FC).
    box_widths: the box head's hidden widths.
    dropout_rate: dropout after the hidden class-head layers in training.
    dtype: compute dtype.
  """
  features: nn.Module
  window: int
  fc_widths: Sequence[int]
  num_classes: int
  attach: str = 'conv'
  box_widths: Sequence[int] = (256,)
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    def conv(w, k, name, init=he_normal):
      return nn.Conv(w, (k, k), padding='VALID', dtype=self.dtype,
                     kernel_init=init, name=name)
    f = self.features(x)
    h, first_fc = f, None
    for i, width in enumerate(self.fc_widths):
      h = nn.relu(conv(width, self.window if i == 0 else 1, f'fc{i + 1}')(h))
      if i == 0:
        first_fc = h
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    logits = conv(self.num_classes, self.window if not self.fc_widths else 1,
                  'head', _SMALL)(h)
    if self.attach == 'fc' and first_fc is None:
      raise ValueError("attach='fc' needs at least one FC layer")
    b = f if self.attach == 'conv' else first_fc
    k = self.window if self.attach == 'conv' else 1
    for j, width in enumerate(self.box_widths):
      b = nn.relu(conv(width, k, f'box_fc{j + 1}')(b))
      k = 1
    codes = conv(4, k, 'box_head', _SMALL)(b)
    return (jnp.asarray(logits, jnp.float32), jnp.asarray(codes, jnp.float32))


def _fc_widths(base: nn.Module) -> tuple[int, ...]:
  if hasattr(base, 'fc_widths'):
    return tuple(base.fc_widths)
  return (base.fc_width, base.fc_width)


def make_model(config, num_classes: int) -> tuple[LocalizationNet, int]:
  """The localizer for `config` and the stride of its dense map.

  Raises:
    ConfigError: unknown model, or a model without an FC head on a trunk.
  """
  kwargs = dict(config.get('model_kwargs', {}) or {})
  try:
    base = models.get_model(config.model, num_classes=num_classes, **kwargs)
    features = fully_conv.trunk_of(base)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  shape = (config.canvas, config.canvas, 3)
  f_h, f_w, _ = fully_conv.trunk_output_shape(base, shape)
  if f_h < 1 or f_h != f_w:
    raise ConfigError(f'model {config.model} leaves a {f_h}x{f_w} map at '
                      f'canvas={config.canvas}; use a larger canvas')
  dropout = kwargs.get('dropout_rate', getattr(base, 'dropout_rate', 0.0))
  net = LocalizationNet(features, f_h, _fc_widths(base), num_classes,
                        attach=config.attach,
                        box_widths=tuple(config.box_widths),
                        dropout_rate=dropout)
  return net, fully_conv.output_stride(base, shape)


def preprocess(images):
  return (jnp.asarray(images, jnp.float32) / 255.0 - _MEAN) / _STD


def trainable_labels(params, stage: str):
  """'train' / 'frozen' per parameter for a stage of the recipe."""
  def label(path, _):
    is_box = str(path[0].key).startswith('box_')
    if stage == 'regress':
      return 'train' if is_box else 'frozen'
    if stage == 'classify':
      return 'frozen' if is_box else 'train'
    return 'train'
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config, stage: str) -> optax.GradientTransformation:
  """cnn.optim's SGD on the stage's trainable parameters; zero elsewhere."""
  return optax.multi_transform(
      {'train': optim.make_optimizer(config), 'frozen': optax.set_to_zero()},
      lambda p: trainable_labels(p, stage))


@flax.struct.dataclass
class LocState:
  step: jnp.ndarray
  params: Any
  opt_state: Any
  rng: jnp.ndarray


def init_state(model, tx, seed: int, canvas: int) -> LocState:
  init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
  x = jnp.zeros((1, canvas, canvas, 3), jnp.float32)
  params = jax.jit(lambda r: model.init(r, x, train=False))(init_rng)['params']
  return LocState(jnp.zeros((), jnp.int32), params, tx.init(params), rng)


def _flip(images, boxes, flip, canvas):
  """Mirror the images where `flip` and their boxes with them."""
  images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
  x = jnp.where(flip, canvas - boxes[:, 0] - boxes[:, 2], boxes[:, 0])
  return images, boxes.at[:, 0].set(x)


def make_train_step(model, tx, schedule, config, stage: str):
  """Jitted (state, images, labels, boxes) -> (state, metrics)."""
  canvas = config.canvas
  box_weight = float(config.box_weight)
  augment = bool(config.flip)

  def step_fn(state, images, labels, boxes):
    rng = jax.random.fold_in(state.rng, state.step)
    flip_rng, drop_rng = jax.random.split(rng)
    x = preprocess(images)
    if augment:
      flip = jax.random.bernoulli(flip_rng, 0.5, (x.shape[0],))
      x, boxes = _flip(x, boxes, flip, canvas)
    targets = boxes / canvas

    def loss_fn(params):
      logits, codes = model.apply({'params': params}, x, train=True,
                                  rngs={'dropout': drop_rng})
      logits, codes = logits[:, 0, 0], codes[:, 0, 0]
      ce = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
      l2 = jnp.sum((codes - targets) ** 2, axis=-1).mean()
      loss = {'classify': ce, 'regress': l2,
              'joint': ce + box_weight * l2}[stage]
      return loss, (ce, l2, logits, codes)

    (loss, (ce, l2, logits, codes)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = schedule(state.step)
    params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
    iou = box_ops.iou(codes * canvas, boxes)
    metrics = {'loss': loss, 'class_loss': ce, 'box_loss': l2,
               'error': jnp.mean(jnp.argmax(logits, -1) != labels),
               'iou': jnp.mean(iou), 'learning_rate': lr}
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state), metrics

  return jax.jit(step_fn, donate_argnums=0)


def predict(model, params, images, batch_size: int = 250):
  """Single-window prediction at the training size: (logits, boxes px)."""
  canvas = images.shape[1]
  batch_size = min(batch_size, len(images))  # no padding beyond the data
  apply = jax.jit(lambda p, x: model.apply({'params': p}, preprocess(x),
                                           train=False))
  logits, boxes = [], []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    k = len(chunk)
    if k < batch_size:  # one shape, one compilation
      chunk = np.concatenate([chunk, np.zeros((batch_size - k,)
                                              + chunk.shape[1:], chunk.dtype)])
    lo, co = apply(params, chunk)
    logits.append(np.asarray(lo[:k, 0, 0]))
    boxes.append(np.asarray(co[:k, 0, 0]) * canvas)
  return np.concatenate(logits), np.concatenate(boxes)


def dense_maps(model, params, images, scale: float, window: int, stride: int):
  """One scale of dense evaluation, mapped back to image coordinates.

  Args:
    model, params: the localizer.
    images: (B, H, W, C) uint8.
    scale: the images are resized by this factor first.
    window: the training input side T.
    stride: the dense map's stride in (resized) pixels.

  Returns:
    (probs (B, N, K), boxes (B, N, 4) in original image pixels), N = H' W'
    positions; the window at map (i, j) starts at (j*stride, i*stride) of the
    resized image.
  """
  b, h, w, c = images.shape
  sh, sw = int(round(h * scale)), int(round(w * scale))
  if min(sh, sw) < window:
    raise ConfigError(f'scale {scale} makes the {h}x{w} image {sh}x{sw}, '
                      f'smaller than the {window}x{window} window; use scales '
                      f'>= {window / min(h, w):.3g}')
  x = preprocess(images)
  if (sh, sw) != (h, w):
    x = jax.image.resize(x, (b, sh, sw, c), 'bilinear')
  logits, codes = model.apply({'params': params}, x, train=False)
  probs = jax.nn.softmax(logits, axis=-1)
  gy, gx = jnp.meshgrid(jnp.arange(probs.shape[1]),
                        jnp.arange(probs.shape[2]), indexing='ij')
  offsets = jnp.stack([gx, gy], axis=-1).astype(jnp.float32) * stride
  boxes = box_ops.decode(codes, offsets[None], window) / scale
  n = probs.shape[1] * probs.shape[2]
  return probs.reshape(b, n, -1), boxes.reshape(b, n, 4)


def dense_predict(model, params, images, *, window: int, stride: int,
                  scales: Sequence[float] = (1.0,), merge: str = 'greedy',
                  merge_threshold: float = 0.5, top_k: int = 30,
                  batch_size: int = 250):
  """Multi-scale dense evaluation: the final class and box per image.

  The class is the argmax over classes of the per-scale mean probability
  summed over scales; the box comes from merging the `top_k` most confident
  boxes of that class over all scales and positions, weighted by that
  confidence (greedy merge: the merged box with the largest total
  confidence; NMS: the most confident box).

  Returns:
    (classes (B,), boxes (B, 4) in pixels of `images`).
  """
  if merge not in MERGES:
    raise ConfigError(f"merge='{merge}' is unknown; use one of "
                      f'{", ".join(MERGES)}')
  batch_size = min(batch_size, len(images))
  fns = {s: jax.jit(lambda p, x, s=s: dense_maps(model, p, x, s, window,
                                                 stride)) for s in scales}
  classes, out_boxes = [], []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    k = len(chunk)
    if k < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - k,)
                                              + chunk.shape[1:], chunk.dtype)])
    per_scale = [jax.device_get(fns[s](params, chunk)) for s in scales]
    votes = sum(p.mean(axis=1) for p, _ in per_scale)[:k]
    probs = np.concatenate([p for p, _ in per_scale], axis=1)[:k]
    bxs = np.concatenate([b for _, b in per_scale], axis=1)[:k]
    cls = np.argmax(votes, axis=-1)
    for i in range(k):
      conf = probs[i, :, cls[i]]
      top = np.argsort(-conf, kind='stable')[:top_k]
      if merge == 'greedy':
        merged, _ = box_ops.greedy_merge(bxs[i, top], conf[top],
                                         merge_threshold)
        out_boxes.append(merged[0])
      else:
        out_boxes.append(bxs[i, top[0]])
    classes.append(cls)
  return np.concatenate(classes), np.asarray(out_boxes, np.float32)


def box_metrics(pred: np.ndarray, true: np.ndarray, prefix: str = '') -> dict:
  """Mean IoU and the fraction with IoU >= 0.5."""
  ious = np.asarray(box_ops.iou(np.asarray(pred, np.float64),
                                np.asarray(true, np.float64)))
  return {f'{prefix}mean_iou': float(ious.mean()),
          f'{prefix}iou50': float((ious >= 0.5).mean())}


def evaluate(model, params, data: synth.LocalizationData, config, *,
             window: int, stride: int, mean_box: np.ndarray,
             dense: bool = True) -> dict:
  """Single-window and (optionally) multi-scale dense metrics + baseline."""
  logits, boxes = predict(model, params, data.images, config.eval_batch_size)
  out = {'error': float(np.mean(np.argmax(logits, -1) != data.labels)),
         'box_loss': float(np.mean(np.sum(
             ((boxes - data.boxes) / window) ** 2, -1)))}
  out.update(box_metrics(boxes, data.boxes))
  out.update(box_metrics(np.broadcast_to(mean_box, data.boxes.shape),
                         data.boxes, 'mean_box_'))
  if dense:
    classes, dboxes = dense_predict(
        model, params, data.images, window=window, stride=stride,
        scales=tuple(config.scales), merge=config.merge,
        merge_threshold=config.merge_threshold,
        batch_size=config.eval_batch_size)
    out['dense_error'] = float(np.mean(classes != data.labels))
    out.update(box_metrics(dboxes, data.boxes, 'dense_'))
  out['examples'] = float(len(data))
  return out


def validate_config(config) -> None:
  if config.stage not in STAGES:
    raise ConfigError(f"stage='{config.stage}' is unknown; use one of "
                      f'{", ".join(STAGES)}')
  if config.attach not in ATTACH:
    raise ConfigError(f"attach='{config.attach}' is unknown; use conv or fc")
  if config.merge not in MERGES:
    raise ConfigError(f"merge='{config.merge}' is unknown; use greedy or nms")
  if config.dataset not in ('synthetic', 'voc'):
    raise ConfigError(f"dataset='{config.dataset}' is unknown; use synthetic "
                      '(CIFAR pasted on canvases) or voc (TFDS voc/2007)')
  if config.stage in ('regress', 'both') and not config.init_from:
    raise ConfigError(
        f'stage={config.stage} needs a trained trunk: set '
        '--config.init_from=WORKDIR of the classify (or regress) run')
  if min(config.scales) < 1.0:
    raise ConfigError(f'scales={tuple(config.scales)} must all be >= 1 (the '
                      'window is the whole training canvas)')
  if config.stage != 'both':
    optim.validate(config)


class _Data:
  """Train/test sets and the mean training box for one config."""

  def __init__(self, config):
    if config.dataset == 'voc':
      self.train = synth.load_voc(config.train_split, config.data_dir,
                                  config.canvas, config.train_examples or None)
      self.test = synth.load_voc(config.test_split, config.data_dir,
                                 config.canvas, config.test_examples or None)
      self.num_classes = 20
      self.mean_box = self.train.boxes.mean(axis=0)
      return
    kw = dict(canvas=config.canvas, seed=config.seed,
              background=config.background)
    self.train = synth.load(config.source, config.train_split,
                            config.data_dir, limit=config.train_examples,
                            **kw)
    test = synth.load(config.source, config.test_split, config.data_dir,
                      limit=config.test_examples, **kw)
    self.test = test.materialize()
    self.num_classes = input_pipeline.dataset_info(config.source,
                                                   config.data_dir)[0]
    self.mean_box = self.train.boxes.mean(axis=0)

  def train_batch(self, indices):
    if isinstance(self.train, synth.LocalizationData):
      t = self.train
      return t.images[indices], t.labels[indices], t.boxes[indices]
    d = self.train.render(indices)
    return d.images, d.labels, d.boxes


def _meta(config, params) -> dict:
  return {'model': f'localizer/{config.model}/{config.attach}',
          'dataset': f'{config.dataset}/{config.source}',
          'param_shapes': checkpointing.param_shapes(params)}


def _params_from(workdir: str, model, config) -> Any:
  """The parameters of the latest checkpoint of another localization run."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise CheckpointError(f'init_from={workdir} holds no localization run '
                          '(no config.json): train the classify stage first')
  with open(path) as f:
    src_stage = json.load(f).get('stage', 'classify')
  src_stage = 'classify' if src_stage == 'both' else src_stage
  tx = make_optimizer(config, src_stage)
  target = init_state(model, tx, config.seed, config.canvas)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    read_only=True)
  step = ckpt.resolve('latest')
  restored = ckpt.restore(step, target, meta=_meta(config, target.params))
  ckpt.close()
  return restored.params


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs one stage of the recipe in `workdir`; returns the test metrics.

  Resumes from the latest checkpoint in `workdir`; otherwise starts from
  `init_from`'s parameters (stages 2 and 3) or from scratch. Writes
  `config.json`, `metrics.jsonl` (train: loss, class_loss, box_loss, error,
  iou, learning_rate; test: error, mean_iou, iou50, dense_*, mean_box_*),
  TensorBoard events and `checkpoints/`.
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  data = _Data(config)
  model, stride = make_model(config, data.num_classes)
  stage = config.stage
  tx = make_optimizer(config, 'classify' if stage == 'both' else stage)
  schedule = optim.make_schedule(config)
  state = init_state(model, tx, config.seed, config.canvas)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    keep=config.keep_checkpoints)
  meta = _meta(config, state.params)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(ckpt.latest_step(), state, meta=meta)
  elif config.init_from:
    state = state.replace(params=_params_from(config.init_from, model,
                                              config))
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))

  total = 0 if stage == 'both' else int(config.num_train_steps)
  start = int(state.step)
  writer = metric_writers.MetricWriter(workdir, resume_step=start,
                                       tensorboard=config.tensorboard)
  eval_kw = dict(window=config.canvas, stride=stride, mean_box=data.mean_box)
  try:
    if start < total:
      step_fn = make_train_step(model, tx, schedule, config, stage)
      batches = input_pipeline.TrainBatches(data.train, config.batch_size,
                                            config.seed)
      progress = metric_writers.Progress(total, start, config.batch_size)
      window = []
      for step in range(start, total):
        images, labels, bxs = data.train_batch(batches.indices(step))
        state, metrics = step_fn(state, images, labels, bxs)
        window.append(metrics)
        done = step + 1
        if done % config.log_every_steps == 0 or done == total:
          avg = metric_writers.window_means(window, done)
          window = []
          writer.write(done, 'train', **avg)
          progress.log(done, **{k: avg[k] for k in ('loss', 'error', 'iou')})
        if done % config.eval_every_steps == 0 and done != total:
          res = evaluate(model, state.params, data.test, config, dense=False,
                         **eval_kw)
          writer.write(done, 'test', **res)
          progress.reset_clock(done)
        if done % config.checkpoint_every_steps == 0 or done == total:
          ckpt.save(done, state, meta)
    t0 = time.perf_counter()
    result = evaluate(model, state.params, data.test, config,
                      dense=config.dense_eval, **eval_kw)
    result['eval_seconds'] = time.perf_counter() - t0
    writer.write(max(total, start), 'test', **result)
    if stage == 'both' and ckpt.latest_step() is None:
      ckpt.save(0, state, meta)
  finally:
    writer.close()
    ckpt.close()
  return result
