"""Region-based detection: R-CNN, Fast R-CNN and Faster R-CNN.

The lecture's path to detecting an unknown number of objects, as three
detectors that share every part except where the regions are cut out:

  * R-CNN (Girshick et al. 2014): selective-search proposals, each warped to
    a fixed `crop` x `crop` image (`cnn.ops.roi.crop_and_resize`) and run
    through the whole CNN; one conv pass per proposal.
  * Fast R-CNN (Girshick 2015): one conv pass over the image, each proposal
    cut from the last feature map by RoI max pooling (`cnn.ops.roi`) to the
    same `roi_size` x `roi_size` grid that the R-CNN crop produces, so the
    head (FC layers, class scores, class-specific box deltas) is the same.
  * Faster R-CNN (Ren et al. 2015): a Region Proposal Network on the last
    feature map (objectness + box deltas per anchor) replaces selective
    search; its proposals feed the Fast R-CNN head. Approximate joint
    training: one loss, the proposals are a stop_gradient input to the head.

Trunk: `widths` stages of `convs_per_stage` 3x3 conv + BatchNorm + ReLU and a
2x2 max-pool, so the feature stride is 2 ** len(widths); the R-CNN crop side
is roi_size * stride, which makes R-CNN's trunk output on a crop exactly the
RoI-pooled grid of Fast R-CNN.

Training samples `rois_per_image` regions per image (Fast R-CNN section 2.3):
up to `fg_fraction` foreground (IoU >= fg_iou with a ground-truth box; the
ground-truth boxes themselves are candidates), the rest background (IoU in
[bg_iou, fg_iou)); loss = cross-entropy over K + 1 classes + smooth-L1 on the
normalised deltas of the true class. Everything, including RoI sampling and
the RPN's NMS, runs inside one jitted step with static shapes.

Test time per image is measured as it would be served: proposals computed on
the image (selective search for R-CNN and Fast R-CNN, the RPN for Faster),
the network, then per-class NMS; mAP@0.5 by `cnn.detection_eval` (VOC).
"""
from __future__ import annotations

import dataclasses
import functools
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
from cnn import detection_eval
from cnn import input_pipeline
from cnn import metric_writers
from cnn import optim
from cnn import proposals as proposals_lib
from cnn import synthetic_detection as synth
from cnn import transfer
from cnn.errors import CheckpointError, ConfigError
from cnn.models.common import Dtype
from cnn.models.detnet import FCLayers
from cnn.models.detnet import Trunk
from cnn.ops import boxes as box_ops
from cnn.ops import roi as roi_ops

KINDS = ('rcnn', 'fast_rcnn', 'faster_rcnn')
PROPOSAL_METHODS = ('selective_search_fast', 'selective_search_quality',
                    'sliding', 'random')
# Canvases are mostly mid-grey noise; a fixed scaling is enough.
_MEAN, _STD = 0.5, 0.25
# Fast R-CNN's normalisation of the regression targets (stds 0.1, 0.1, 0.2,
# 0.2), so that the box loss is on the scale of the class loss.
HEAD_DELTA_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# R-CNN / Fast R-CNN initialise the class layer with std 0.01 and the box
# layer with std 0.001: near-uniform scores, near-zero deltas at the start.
_CLS_INIT = nn.initializers.normal(0.01)
_BOX_INIT = nn.initializers.normal(0.001)


class RPN(nn.Module):
  """Region Proposal Network: 3x3 conv, then objectness and deltas per anchor.

  Returns (objectness logits (B, H*W*A), deltas (B, H*W*A, 4)) in the order
  of `cnn.ops.boxes.anchors` (position-major, then anchor).
  """
  num_anchors: int
  width: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f):
    init = nn.initializers.normal(0.01)
    h = nn.relu(nn.Conv(self.width, (3, 3), padding='SAME', kernel_init=init,
                        dtype=self.dtype, name='conv')(f))
    obj = nn.Conv(self.num_anchors, (1, 1), kernel_init=init,
                  dtype=self.dtype, name='objectness')(h)
    deltas = nn.Conv(4 * self.num_anchors, (1, 1), kernel_init=init,
                     dtype=self.dtype, name='deltas')(h)
    b = f.shape[0]
    return (jnp.asarray(obj, jnp.float32).reshape(b, -1),
            jnp.asarray(deltas, jnp.float32).reshape(b, -1, 4))


class RoIHead(nn.Module):
  """FC layers on a pooled region, K + 1 class logits and K box deltas."""
  num_classes: int
  widths: Sequence[int] = (256, 256)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # The same `fc` module as the `det_trunk` classifier's, so that its
    # pretrained FC layers load here (`load_pretrained`).
    x = FCLayers(tuple(self.widths), self.dtype, name='fc')(x)
    logits = nn.Dense(self.num_classes + 1, kernel_init=_CLS_INIT,
                      dtype=self.dtype, name='cls')(x)
    deltas = nn.Dense(4 * self.num_classes, kernel_init=_BOX_INIT,
                      dtype=self.dtype, name='box')(x)
    return (jnp.asarray(logits, jnp.float32),
            jnp.asarray(deltas, jnp.float32).reshape(-1, self.num_classes, 4))


class Detector(nn.Module):
  """Trunk, RoI head and (Faster R-CNN) RPN; the methods are the parts."""
  kind: str
  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  convs_per_stage: int = 2
  head_widths: Sequence[int] = (256, 256)
  roi_size: int = 4
  num_anchors: int = 9
  rpn_width: int = 64
  dtype: Dtype = jnp.float32

  def setup(self):
    self.trunk = Trunk(tuple(self.widths), self.convs_per_stage, self.dtype)
    self.head = RoIHead(self.num_classes, tuple(self.head_widths), self.dtype)
    if self.kind == 'faster_rcnn':
      self.rpn = RPN(self.num_anchors, self.rpn_width, self.dtype)

  @property
  def stride(self) -> int:
    return 2 ** len(self.widths)

  def features(self, x, train: bool = False):
    return self.trunk(x, train=train)

  def propose(self, f):
    return self.rpn(f)

  def classify(self, pooled):
    return self.head(pooled)

  def __call__(self, x, train: bool = False):
    """Touches every part (for init): the trunk on x, the head on a grid."""
    f = self.features(x, train)
    if self.kind == 'faster_rcnn':
      self.propose(f)
    pooled = jnp.zeros((1, self.roi_size, self.roi_size, f.shape[-1]),
                       f.dtype)
    return self.classify(pooled)


def preprocess(images):
  return (jnp.asarray(images, jnp.float32) / 255.0 - _MEAN) / _STD


# ---------------------------------------------------------------------------
# Sampling and targets (per image; vmapped over the batch inside the step).


def _sample(key, positive, negative, num: int, max_positive: int):
  """Indices of `num` entries: up to `max_positive` random positives, the rest
  random negatives; (indices (num,), weight (num,) 0 where none was left,
  is_positive (num,))."""
  n = positive.shape[0]
  u = jax.random.uniform(key, (n,))
  # Rank positives in a random order and keep the first max_positive.
  order = jnp.argsort(jnp.where(positive, -u, 1.0))
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n))
  keep_pos = positive & (rank < max_positive)
  priority = jnp.where(keep_pos, 2.0 + u, jnp.where(negative, 1.0 + u, 0.0))
  top, idx = jax.lax.top_k(priority, num)
  return idx, (top > 0).astype(jnp.float32), top >= 2.0


def sample_rois(key, proposals, valid, gt_boxes, gt_classes, *, num: int,
                fg_fraction: float, fg_iou: float, bg_iou: float,
                canvas: int):
  """Fast R-CNN minibatch sampling for one image.

  Args:
    key: PRNG key.
    proposals: (P, 4) candidate regions; valid: (P,) bool.
    gt_boxes: (M, 4); gt_classes: (M,) int, -1 for padding.
    num: regions to return.
    fg_fraction, fg_iou, bg_iou: foreground share and IoU bands.
    canvas: image side (padding entries are replaced by the whole image so
      that their targets stay finite; their weight is 0).

  Returns:
    rois (num, 4), labels (num,) in 0..K (0 = background), box targets
    (num, 4) (normalised deltas to the matched ground truth), weights (num,).
  """
  gt_valid = gt_classes >= 0
  cand = jnp.concatenate([proposals, gt_boxes])
  cvalid = jnp.concatenate([valid, gt_valid])
  whole = jnp.asarray([0.0, 0.0, canvas, canvas], jnp.float32)
  cvalid = cvalid & (cand[:, 2] > 0) & (cand[:, 3] > 0)
  cand = jnp.where(cvalid[:, None], cand, whole)
  ious = jnp.where(gt_valid[None], box_ops.pairwise_iou(cand, gt_boxes), -1.0)
  best, match = ious.max(axis=1), ious.argmax(axis=1)
  fg = cvalid & (best >= fg_iou)
  bg = cvalid & (best < fg_iou) & (best >= bg_iou)
  idx, weight, is_fg = _sample(key, fg, bg, num, int(round(num * fg_fraction)))
  rois = cand[idx]
  matched = gt_boxes[match[idx]]
  matched = jnp.where(is_fg[:, None], matched, rois)  # bg: finite dummy
  labels = jnp.where(is_fg, gt_classes[match[idx]] + 1, 0)
  targets = box_ops.encode_deltas(matched, rois, HEAD_DELTA_WEIGHTS)
  return rois, labels.astype(jnp.int32), targets, weight


def rpn_targets(key, anchors, gt_boxes, gt_classes, *, canvas: int, num: int,
                pos_fraction: float, pos_iou: float, neg_iou: float):
  """Faster R-CNN's anchor labels and sampled minibatch for one image.

  An anchor is positive when its IoU with some ground-truth box is at least
  `pos_iou` or it is a box's best anchor; negative below `neg_iou`; anchors
  that cross the image border are ignored in training (section 3.3).

  Returns:
    indices (num,), objectness labels (num,) in {0, 1}, delta targets
    (num, 4), weights (num,).
  """
  gt_valid = gt_classes >= 0
  x0, y0 = anchors[:, 0], anchors[:, 1]
  inside = ((x0 >= 0) & (y0 >= 0) & (x0 + anchors[:, 2] <= canvas)
            & (y0 + anchors[:, 3] <= canvas))
  ious = jnp.where(gt_valid[None] & inside[:, None],
                   box_ops.pairwise_iou(anchors, gt_boxes), -1.0)
  best, match = ious.max(axis=1), ious.argmax(axis=1)
  best_per_gt = ious.max(axis=0)
  is_best = jnp.any((ious == best_per_gt[None]) & (best_per_gt > 0)[None]
                    & gt_valid[None], axis=1)
  pos = inside & ((best >= pos_iou) | is_best)
  neg = inside & (best < neg_iou) & ~pos
  idx, weight, is_pos = _sample(key, pos, neg, num,
                                int(round(num * pos_fraction)))
  targets = box_ops.encode_deltas(gt_boxes[match[idx]], anchors[idx])
  return idx, is_pos.astype(jnp.float32), targets, weight


def rpn_proposals(objectness, deltas, anchors, *, canvas: int, pre_nms: int,
                  post_nms: int, nms_iou: float, min_size: float):
  """One image's RPN proposals: decode, clip, top `pre_nms`, NMS.

  Returns:
    boxes (post_nms, 4), valid (post_nms,), objectness logits (post_nms,).
  """
  boxes = box_ops.clip(box_ops.decode_deltas(deltas, anchors), canvas, canvas)
  ok = (boxes[:, 2] >= min_size) & (boxes[:, 3] >= min_size)
  scores = jnp.where(ok, objectness, -jnp.inf)
  top_scores, top = jax.lax.top_k(scores, min(pre_nms, scores.shape[0]))
  keep_idx, keep = box_ops.nms_padded(boxes[top], top_scores, nms_iou,
                                      post_nms, valid=ok[top])
  return boxes[top][keep_idx], keep, top_scores[keep_idx]


def smooth_l1(x, beta: float = 1.0):
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def head_loss(logits, deltas, labels, targets, weights):
  """Cross-entropy over K + 1 classes + smooth-L1 on the true class's deltas,
  both averaged over the sampled regions (Fast R-CNN eq. 1, lambda = 1)."""
  denom = jnp.maximum(weights.sum(), 1.0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  cls_loss = jnp.sum(ce * weights) / denom
  k = jnp.maximum(labels - 1, 0)
  pred = jnp.take_along_axis(deltas, k[:, None, None], axis=1)[:, 0]
  fg = (labels > 0).astype(jnp.float32) * weights
  box_loss = jnp.sum(smooth_l1(pred - targets).sum(-1) * fg) / denom
  acc = jnp.sum((jnp.argmax(logits, -1) == labels) * weights) / denom
  return cls_loss, box_loss, acc


# ---------------------------------------------------------------------------
# Model, state, train step.


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static facts the steps need: kind, sizes, anchors."""
  kind: str
  canvas: int
  stride: int
  roi_size: int
  num_classes: int
  anchors: np.ndarray | None

  @property
  def crop(self) -> int:
    return self.roi_size * self.stride


def make_model(config, num_classes: int) -> tuple[Detector, Spec]:
  m = config.detector
  if config.kind not in KINDS:
    raise ConfigError(f"kind='{config.kind}' is unknown; use one of "
                      f'{", ".join(KINDS)}')
  sizes, ratios = tuple(m.anchor_sizes), tuple(m.anchor_ratios)
  model = Detector(config.kind, num_classes, widths=tuple(m.widths),
                   convs_per_stage=m.convs_per_stage,
                   head_widths=tuple(m.head_widths), roi_size=m.roi_size,
                   num_anchors=len(sizes) * len(ratios),
                   rpn_width=m.rpn_width)
  stride = model.stride
  if config.canvas % stride:
    raise ConfigError(f'canvas={config.canvas} must be a multiple of the '
                      f'trunk stride {stride} (2 ** len(widths))')
  anchors = None
  if config.kind == 'faster_rcnn':
    side = config.canvas // stride
    anchors = np.asarray(box_ops.anchors(side, side, stride, sizes, ratios),
                         np.float32)
  return model, Spec(config.kind, config.canvas, stride, m.roi_size,
                     num_classes, anchors)


@flax.struct.dataclass
class DetState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jnp.ndarray


def init_state(model: Detector, tx, seed: int, spec: Spec) -> DetState:
  init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
  side = spec.crop if spec.kind == 'rcnn' else spec.canvas
  x = jnp.zeros((1, side, side, 3), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, x))(init_rng)
  params = variables['params']
  return DetState(jnp.zeros((), jnp.int32), params, variables['batch_stats'],
                  tx.init(params), rng)


def _flip_boxes(boxes, flip, canvas):
  """Mirrors boxes (B, N, 4) of the images where `flip` (B,)."""
  new_x = canvas - boxes[..., 0] - boxes[..., 2]
  return boxes.at[..., 0].set(jnp.where(flip[:, None], new_x, boxes[..., 0]))


def _pool(f, rois, spec: Spec):
  """RoI max pooling of (B, R) regions from the feature maps f."""
  pooled = jax.vmap(lambda fi, ri: roi_ops.roi_max_pool(
      fi, ri, (spec.roi_size, spec.roi_size), 1.0 / spec.stride))(f, rois)
  return pooled.reshape((-1,) + pooled.shape[2:])


def make_train_step(model: Detector, tx, schedule, config, spec: Spec):
  """Jitted (state, batch) -> (state, metrics); batch: images (B, S, S, 3)
  uint8, gt_boxes (B, M, 4), gt_classes (B, M), and for R-CNN / Fast R-CNN
  proposals (B, P, 4) with proposal_valid (B, P)."""
  t = config.train
  sample = functools.partial(
      sample_rois, num=t.rois_per_image, fg_fraction=t.fg_fraction,
      fg_iou=t.fg_iou, bg_iou=t.bg_iou, canvas=spec.canvas)
  anchors = None if spec.anchors is None else jnp.asarray(spec.anchors)
  rpn_cfg = config.rpn
  flip_aug = bool(config.flip)

  def step_fn(state: DetState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    flip_rng, roi_rng, rpn_rng = jax.random.split(rng, 3)
    x = preprocess(batch['images'])
    b = x.shape[0]
    gt_boxes, gt_classes = batch['gt_boxes'], batch['gt_classes']
    props = batch.get('proposals')
    if flip_aug:
      flip = jax.random.bernoulli(flip_rng, 0.5, (b,))
      x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
      gt_boxes = _flip_boxes(gt_boxes, flip, spec.canvas)
      if props is not None:
        props = _flip_boxes(props, flip, spec.canvas)
    roi_keys = jax.random.split(roi_rng, b)

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      metrics = {}
      loss = 0.0
      if spec.kind == 'rcnn':
        rois, labels, targets, weights = jax.vmap(sample)(
            roi_keys, props, batch['proposal_valid'], gt_boxes, gt_classes)
        crops = jax.vmap(lambda xi, ri: roi_ops.crop_and_resize(
            xi, ri, (spec.crop, spec.crop)))(x, rois)
        crops = crops.reshape((-1,) + crops.shape[2:])
        pooled, new_vars = model.apply(variables, crops, True,
                                       method=Detector.features,
                                       mutable=['batch_stats'])
      else:
        f, new_vars = model.apply(variables, x, True,
                                  method=Detector.features,
                                  mutable=['batch_stats'])
        if spec.kind == 'faster_rcnn':
          obj, deltas = model.apply({'params': params}, f,
                                    method=Detector.propose)
          idx, lab, tgt, w = jax.vmap(
              lambda k, g, c: rpn_targets(
                  k, anchors, g, c, canvas=spec.canvas,
                  num=rpn_cfg.anchors_per_image,
                  pos_fraction=rpn_cfg.pos_fraction, pos_iou=rpn_cfg.pos_iou,
                  neg_iou=rpn_cfg.neg_iou))(
                      jax.random.split(rpn_rng, b), gt_boxes, gt_classes)
          o = jnp.take_along_axis(obj, idx, axis=1)
          d = jnp.take_along_axis(deltas, idx[..., None], axis=1)
          denom = jnp.maximum(w.sum(), 1.0)
          rpn_cls = jnp.sum(optax.sigmoid_binary_cross_entropy(o, lab) * w
                            ) / denom
          rpn_box = jnp.sum(smooth_l1(d - tgt, 1.0 / 9).sum(-1) * lab * w
                            ) / denom
          loss = loss + rpn_cls + rpn_cfg.box_weight * rpn_box
          metrics.update(rpn_cls_loss=rpn_cls, rpn_box_loss=rpn_box)
          props_in, valid_in, _ = jax.vmap(functools.partial(
              rpn_proposals, canvas=spec.canvas,
              pre_nms=rpn_cfg.pre_nms_train, post_nms=rpn_cfg.post_nms_train,
              nms_iou=rpn_cfg.nms_iou, min_size=rpn_cfg.min_size),
                                              in_axes=(0, 0, None))(
                  jax.lax.stop_gradient(obj),
                  jax.lax.stop_gradient(deltas), anchors)
        else:
          props_in, valid_in = props, batch['proposal_valid']
        rois, labels, targets, weights = jax.vmap(sample)(
            roi_keys, props_in, valid_in, gt_boxes, gt_classes)
        pooled = _pool(f, rois, spec)
      logits, deltas = model.apply({'params': params}, pooled,
                                   method=Detector.classify)
      cls_loss, box_loss, acc = head_loss(
          logits, deltas, labels.reshape(-1), targets.reshape(-1, 4),
          weights.reshape(-1))
      loss = loss + cls_loss + config.train.box_weight * box_loss
      metrics.update(cls_loss=cls_loss, box_loss=box_loss, roi_accuracy=acc,
                     fg_rois=jnp.sum((labels > 0) * weights) / b)
      return loss, (metrics, new_vars['batch_stats'])

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = schedule(state.step)
    params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
    metrics.update(loss=loss, learning_rate=lr)
    return state.replace(step=state.step + 1, params=params,
                         batch_stats=batch_stats, opt_state=opt_state), metrics

  return jax.jit(step_fn, donate_argnums=0)


# ---------------------------------------------------------------------------
# Inference.


def postprocess(rois, valid, logits, deltas, *, canvas: int,
                score_threshold: float, nms_iou: float, per_class: int,
                max_detections: int):
  """Class-specific boxes, per-class NMS, the top detections of one image.

  Returns:
    boxes (max_detections, 4), scores (max_detections,) (-1 for padding),
    classes (max_detections,) in 0..K-1.
  """
  probs = jax.nn.softmax(logits, axis=-1)[:, 1:]
  boxes = box_ops.clip(box_ops.decode_deltas(deltas, rois[:, None, :],
                                             HEAD_DELTA_WEIGHTS),
                       canvas, canvas)

  def per_class_nms(b, s):
    ok = valid & (s > score_threshold) & (b[:, 2] > 0) & (b[:, 3] > 0)
    idx, keep = box_ops.nms_padded(b, s, nms_iou, per_class, valid=ok)
    return b[idx], jnp.where(keep, s[idx], -1.0)

  kept_boxes, kept_scores = jax.vmap(per_class_nms, in_axes=(1, 1))(
      boxes, probs)
  k = kept_scores.shape[0]
  classes = jnp.broadcast_to(jnp.arange(k)[:, None], kept_scores.shape)
  top, idx = jax.lax.top_k(kept_scores.reshape(-1),
                           min(max_detections, kept_scores.size))
  return (kept_boxes.reshape(-1, 4)[idx], top,
          classes.reshape(-1)[idx].astype(jnp.int32))


class Predictor:
  """Detections for one image at a time, timed the way they would be served.

  `__call__(image)` returns (boxes, scores, classes) as numpy arrays and the
  seconds spent on proposals and on the network (+ NMS) for that image.
  """

  def __init__(self, model: Detector, variables, config, spec: Spec):
    self.model, self.variables, self.spec = model, variables, spec
    self.config = config
    p, te = config.proposals, config.test
    self.num_proposals = int(p.test_per_image)
    post = functools.partial(
        postprocess, canvas=spec.canvas,
        score_threshold=te.score_threshold, nms_iou=te.nms_iou,
        per_class=te.per_class, max_detections=te.max_detections)
    self.chunk = int(te.rcnn_chunk)

    def features(v, image):
      return model.apply(v, preprocess(image)[None], False,
                         method=Detector.features)

    def head(v, pooled):
      return model.apply(v, pooled, method=Detector.classify)

    if spec.kind == 'rcnn':
      def crops_fn(v, image, rois):
        crops = roi_ops.crop_and_resize(preprocess(image), rois,
                                        (spec.crop, spec.crop))
        pooled = model.apply(v, crops, False, method=Detector.features)
        return head(v, pooled)
      self._crops = jax.jit(crops_fn)
      self._post = jax.jit(post)
    elif spec.kind == 'fast_rcnn':
      def fast_fn(v, image, rois, valid):
        f = features(v, image)
        logits, deltas = head(v, _pool(f, rois[None], spec))
        return post(rois, valid, logits, deltas)
      self._fast = jax.jit(fast_fn)
    else:
      r = config.rpn
      anchors = jnp.asarray(spec.anchors)

      def faster_fn(v, image):
        f = features(v, image)
        obj, deltas = model.apply(v, f, method=Detector.propose)
        rois, valid, _ = rpn_proposals(
            obj[0], deltas[0], anchors, canvas=spec.canvas,
            pre_nms=r.pre_nms_test, post_nms=r.post_nms_test,
            nms_iou=r.nms_iou, min_size=r.min_size)
        logits, d = head(v, _pool(f, rois[None], spec))
        return post(rois, valid, logits, d), (rois, valid)
      self._faster = jax.jit(faster_fn)

  def proposals(self, image):
    """Selective search (or a baseline) on one image, padded to a fixed count."""
    boxes, counts = proposals_lib.compute(
        image[None], self.config.proposals.method, self.num_proposals,
        seed=0)
    valid = np.arange(self.num_proposals) < counts[0]
    return boxes[0], valid

  def __call__(self, image):
    """(boxes, scores, classes, rois, roi_valid, proposal_s, network_s)."""
    t0 = time.perf_counter()
    if self.spec.kind == 'faster_rcnn':
      (b, s, c), (rois, valid) = jax.block_until_ready(
          self._faster(self.variables, image))
      t1 = t0
    else:
      rois, valid = self.proposals(image)
      t1 = time.perf_counter()
      if self.spec.kind == 'fast_rcnn':
        b, s, c = jax.block_until_ready(
            self._fast(self.variables, image, rois, valid))
      else:
        n = int(valid.sum())
        logits = np.zeros((len(rois), self.spec.num_classes + 1), np.float32)
        deltas = np.zeros((len(rois), self.spec.num_classes, 4), np.float32)
        # One network pass per proposal, in chunks of a fixed size so that
        # one compilation serves every image; chunks past the last valid
        # proposal are skipped, as R-CNN would not run them.
        for start in range(0, n, self.chunk):
          part = rois[start:start + self.chunk]
          k = len(part)
          if k < self.chunk:
            part = np.concatenate([part, np.tile(
                [[0, 0, self.spec.canvas, self.spec.canvas]],
                (self.chunk - k, 1)).astype(np.float32)])
          lo, de = self._crops(self.variables, image, part)
          logits[start:start + k] = np.asarray(lo)[:k]
          deltas[start:start + k] = np.asarray(de)[:k]
        b, s, c = jax.block_until_ready(
            self._post(rois, valid, logits, deltas))
    t2 = time.perf_counter()
    b, s, c = np.asarray(b), np.asarray(s), np.asarray(c)
    keep = s > 0
    return (b[keep], s[keep], c[keep], np.asarray(rois),
            np.asarray(valid), t1 - t0, t2 - t1)


def evaluate(model, variables, data: synth.DetectionData, config,
             spec: Spec) -> dict:
  """mAP@0.5 (VOC all-point AP), proposal recall and time per image."""
  predictor = Predictor(model, variables, config, spec)
  predictor(data.images[0])  # compile outside the timed loop
  detections, truths = [], []
  prop_s = net_s = 0.0
  hits = total = num_props = 0
  for i in range(len(data)):
    b, s, c, rois, valid, tp, tn = predictor(data.images[i])
    prop_s += tp
    net_s += tn
    n = int(data.num_objects[i])
    gt_boxes, gt_classes = data.boxes[i][:n], data.classes[i][:n]
    detections.append({'boxes': b, 'scores': s, 'classes': c})
    truths.append({'boxes': gt_boxes, 'classes': gt_classes})
    if data.difficult is not None:
      truths[-1]['difficult'] = data.difficult[i][:n]
    rois = rois[valid]
    num_props += len(rois)
    if n and len(rois):
      ious = np.asarray(box_ops.pairwise_iou(gt_boxes.astype(np.float64),
                                             rois.astype(np.float64)))
      hits += int((ious.max(axis=1) >= 0.5).sum())
    total += n
  res = detection_eval.evaluate(detections, truths, spec.num_classes,
                                iou_threshold=0.5)
  n = len(data)
  out = {'map': float(res['map']),
         'proposal_seconds': prop_s / n, 'network_seconds': net_s / n,
         'seconds_per_image': (prop_s + net_s) / n,
         'proposals_per_image': num_props / n,
         'proposal_recall': hits / max(total, 1),
         'detections_per_image': sum(len(d['scores']) for d in detections) / n,
         'examples': float(n)}
  for k, ap in enumerate(res['ap']):
    out[f'ap_{k}'] = float(ap)
  return out


# ---------------------------------------------------------------------------
# Data and the training loop.


def validate_config(config) -> None:
  if config.kind not in KINDS:
    raise ConfigError(f"kind='{config.kind}' is unknown; use one of "
                      f'{", ".join(KINDS)}')
  if config.get('dataset', 'synthetic') not in ('synthetic', 'voc'):
    raise ConfigError(f"dataset='{config.dataset}' is unknown; use synthetic "
                      '(CIFAR pasted on canvases) or voc (TFDS voc/2007)')
  if config.proposals.method not in PROPOSAL_METHODS:
    raise ConfigError(f"proposals.method='{config.proposals.method}' is "
                      f'unknown; use one of {", ".join(PROPOSAL_METHODS)}')
  for field in ('batch_size', 'num_train_steps', 'eval_every_steps',
                'checkpoint_every_steps', 'log_every_steps'):
    if int(config[field]) < 1:
      raise ConfigError(f'{field}={config[field]} must be a positive integer')
  t = config.train
  if not 0 < t.fg_fraction <= 1:
    raise ConfigError(f'train.fg_fraction={t.fg_fraction} must be in (0, 1]')
  if not 0 <= t.bg_iou < t.fg_iou <= 1:
    raise ConfigError(f'need 0 <= train.bg_iou ({t.bg_iou}) < train.fg_iou '
                      f'({t.fg_iou}) <= 1')
  optim.validate(config)


def canvases(config, split: str, limit: int) -> synth.DetectionData:
  """The config's images of one split: synthetic canvases (one per source
  image of the first `limit` (0: all) images of the split) or VOC 2007
  images resized to the canvas."""
  if config.get('dataset', 'synthetic') == 'voc':
    return synth.load_voc(split, config.data_dir, config.canvas,
                          limit or None)
  return synth.load(
      config.source, split, config.data_dir, limit=limit or None,
      canvas=config.canvas, seed=config.seed, min_objects=config.min_objects,
      max_objects=config.max_objects, min_size=config.min_size,
      max_size=config.max_size, max_iou=config.max_iou,
      background=config.background).materialize()


def num_classes(config) -> int:
  if config.get('dataset', 'synthetic') == 'voc':
    return 20
  return input_pipeline.dataset_info(config.source, config.data_dir)[0]


class _Data:
  """Train/test images and, for R-CNN / Fast R-CNN, the cached
  selective-search proposals of the training images."""

  def __init__(self, config, workdir: str, needs_proposals: bool):
    self.num_classes = num_classes(config)
    self.train = canvases(config, config.train_split, config.train_examples)
    self.test = canvases(config, config.test_split, config.test_examples)
    self.proposals = self.counts = None
    if needs_proposals:
      p = config.proposals
      cache_dir = p.cache_dir or os.path.join(workdir, 'proposals')
      os.makedirs(cache_dir, exist_ok=True)
      cache = os.path.join(
          cache_dir, f'{p.method}_{config.source}_{config.train_split}_'
          f'{len(self.train)}_{p.train_per_image}_s{config.seed}.npz')
      if not os.path.exists(cache):
        print(f'proposals: {p.method} on {len(self.train)} training canvases '
              f'(cached in {cache})', flush=True)
      self.proposals, self.counts = proposals_lib.compute(
          self.train.images, p.method, int(p.train_per_image),
          seed=config.seed, processes=int(p.processes), cache=cache)

  def batch(self, indices) -> dict:
    t = self.train
    classes = t.classes[indices]
    if t.difficult is not None:  # not trained on, as in Fast R-CNN
      classes = np.where(t.difficult[indices], -1, classes)
    out = {'images': t.images[indices], 'gt_boxes': t.boxes[indices],
           'gt_classes': classes}
    if self.proposals is not None:
      out['proposals'] = self.proposals[indices]
      p = self.proposals.shape[1]
      out['proposal_valid'] = np.arange(p)[None] < self.counts[indices][:, None]
    return out


PRETRAINED_MODEL = 'det_trunk'


def load_pretrained(spec: str, state: DetState) -> tuple[DetState, str]:
  """The trunk and FC layers of a `det_trunk` classification run.

  The classifier's `trunk/*` (weights and BatchNorm statistics) and `fc/fc*`
  go to the detector's `trunk/*` and `head/fc/*`; its class `head` is left
  out (the detector has K + 1 classes and box deltas), as is the RPN.

  Raises:
    CheckpointError: no such run, another model, or a name or shape mismatch
      (all listed; nothing is loaded).
  """
  directory, which = transfer.parse_init_from(spec)
  ckpt = checkpointing.Checkpointer(directory, read_only=True)
  try:
    step = ckpt.resolve(which)
    model = ckpt.read_meta(step).get('model')
    if model != PRETRAINED_MODEL:
      raise CheckpointError(
          f"init_from='{spec}' holds a '{model}' checkpoint; detectors start "
          f"from a '{PRETRAINED_MODEL}' classifier: python -m "
          'experiments.train --config=configs/cifar10.py:det_trunk ...')
    saved = transfer._restore_raw(ckpt, step)  # pylint: disable=protected-access
  finally:
    ckpt.close()
  prefix = {'trunk': '', 'fc': 'head/'}
  got_p = {prefix[p.split('/')[0]] + p: v
           for p, v in transfer.flat_paths(saved['params']).items()
           if p.split('/')[0] in prefix}
  got_s = {p: v for p, v in transfer.flat_paths(saved['batch_stats']).items()
           if p.startswith('trunk/')}
  want_p = {p: v for p, v in transfer.flat_paths(state.params).items()
            if p.startswith('trunk/') or p.startswith('head/fc/')}
  want_s = transfer.flat_paths(state.batch_stats)
  lines = (transfer.mismatches(got_p, want_p, 'params')
           + transfer.mismatches(got_s, want_s, 'batch_stats'))
  if lines:
    raise CheckpointError(
        f"init_from='{spec}' (step {step}) does not fit this detector: "
        f'{len(lines)} mismatches, nothing loaded; pretrain det_trunk with '
        'the same widths\n  ' + '\n  '.join(lines))
  take = lambda got: lambda p, fresh: (
      np.asarray(got[p], np.asarray(fresh).dtype) if p in got else fresh)
  params = transfer._map_paths(take(got_p), state.params)  # pylint: disable=protected-access
  stats = transfer._map_paths(take(got_s), state.batch_stats)  # pylint: disable=protected-access
  message = (f'init_from: loaded {len(got_p)} parameter arrays and '
             f'{len(got_s)} BatchNorm statistics (trunk, fc layers) from step '
             f'{step} of {directory}')
  return state.replace(params=params, batch_stats=stats), message


def _meta(config, state) -> dict:
  dataset = config.get('dataset', 'synthetic')
  return {'model': f'detector/{config.kind}',
          'dataset': ('voc/2007' if dataset == 'voc'
                      else f'synthetic_detection/{config.source}'),
          'param_shapes': checkpointing.param_shapes(state.params)}


def _log_keys(kind: str) -> tuple[str, ...]:
  keys = ('loss', 'cls_loss', 'box_loss', 'roi_accuracy')
  return keys + (('rpn_cls_loss',) if kind == 'faster_rcnn' else ())


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains one detector in `workdir` (resumed if it holds a run) and
  evaluates it on the test canvases; returns the test metrics.

  Writes config.json, metrics.jsonl (train: losses, RoI accuracy, learning
  rate; test: map, ap_<k>, seconds_per_image, proposal/network seconds,
  proposal recall), TensorBoard events and checkpoints/.
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  data = _Data(config, workdir, needs_proposals=config.kind != 'faster_rcnn')
  model, spec = make_model(config, data.num_classes)
  tx = optim.make_optimizer(config)
  schedule = optim.make_schedule(config)
  state = init_state(model, tx, config.seed, spec)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    keep=config.keep_checkpoints)
  meta = _meta(config, state)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(ckpt.latest_step(), state, meta=meta)
    print(f'resuming from step {int(state.step)} in {workdir}', flush=True)
  elif config.get('init_from', ''):
    state, message = load_pretrained(config.init_from, state)
    print(message, flush=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))

  total, start = int(config.num_train_steps), int(state.step)
  writer = metric_writers.MetricWriter(workdir, resume_step=start,
                                       tensorboard=config.tensorboard)
  variables = lambda s: {'params': s.params, 'batch_stats': s.batch_stats}
  eval_data = data.test.take(slice(0, config.eval_examples))
  try:
    if start < total:
      step_fn = make_train_step(model, tx, schedule, config, spec)
      batches = input_pipeline.TrainBatches(data.train, config.batch_size,
                                            config.seed)
      progress = metric_writers.Progress(total, start, config.batch_size)
      window = []
      for step in range(start, total):
        state, metrics = step_fn(state, data.batch(batches.indices(step)))
        window.append(metrics)
        done = step + 1
        if done % config.log_every_steps == 0 or done == total:
          avg = metric_writers.window_means(window, done)
          window = []
          writer.write(done, 'train', **avg)
          progress.log(done, **{k: avg[k] for k in _log_keys(config.kind)})
        if done % config.eval_every_steps == 0 and done != total:
          res = evaluate(model, variables(state), eval_data, config, spec)
          writer.write(done, 'eval', **res)
          progress.reset_clock(done)
        if done % config.checkpoint_every_steps == 0 or done == total:
          ckpt.save(done, state, meta)
    result = evaluate(model, variables(state), data.test, config, spec)
    writer.write(max(total, start), 'test', **result)
  finally:
    writer.close()
    ckpt.close()
  print(f"test: mAP@0.5 {result['map']:.4f}, "
        f"{result['seconds_per_image'] * 1000:.1f} ms per image "
        f"(proposals {result['proposal_seconds'] * 1000:.1f} ms, network "
        f"{result['network_seconds'] * 1000:.1f} ms), proposal recall "
        f"{result['proposal_recall']:.3f}", flush=True)
  return result


def load_run(workdir: str, checkpoint: str | int = 'latest'):
  """(config, model, spec, variables) of a detection run's checkpoint."""
  import json  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'{workdir} holds no detection run (no config.json); '
                      'train one with experiments.train first')
  with open(path) as f:
    config = config_dict.ConfigDict(json.load(f))
  model, spec = make_model(config, num_classes(config))
  tx = optim.make_optimizer(config)
  target = init_state(model, tx, config.seed, spec)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    read_only=True)
  try:
    state = ckpt.restore(ckpt.resolve(checkpoint), target,
                         meta=_meta(config, target))
  finally:
    ckpt.close()
  return config, model, spec, {'params': state.params,
                               'batch_stats': state.batch_stats}


def evaluate_run(workdir: str, checkpoint: str | int = 'latest',
                 limit: int = 0) -> dict:
  """Test metrics (mAP@0.5, times, recall) of a run's checkpoint on its
  test images (the first `limit`, 0: all of the config's)."""
  config, model, spec, variables = load_run(workdir, checkpoint)
  data = canvases(config, config.test_split, config.test_examples)
  if limit:
    data = data.take(slice(0, limit))
  return evaluate(model, variables, data, config, spec)
