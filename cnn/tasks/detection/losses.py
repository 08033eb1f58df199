"""The detectors' losses and the task's loss function.

Fast R-CNN eq. 1: cross-entropy over K + 1 classes + smooth-L1 on the
normalised deltas of the true class, averaged over the sampled regions;
Faster R-CNN adds the RPN's objectness (binary cross-entropy) and box
losses over the sampled anchors (approximate joint training: the proposals
are a stop_gradient input to the head).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from cnn.ops import roi as roi_ops
from cnn.tasks.detection.model import Detector, Spec, flip_boxes, pool
from cnn.tasks.detection.model import preprocess
from cnn.tasks.detection.targets import rpn_proposals, rpn_targets
from cnn.tasks.detection.targets import sample_rois


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


def make_loss_fn(model: Detector, config, spec: Spec):
  """`(params, batch_stats, batch, rng) -> (loss, (metrics, batch_stats))`;
  batch: images (B, S, S, 3) uint8, gt_boxes (B, M, 4), gt_classes (B, M)
  (-1 for padding), and for R-CNN / Fast R-CNN proposals (B, P, 4) with
  proposal_valid (B, P)."""
  t = config.roi
  sample = functools.partial(
      sample_rois, num=t.rois_per_image, fg_fraction=t.fg_fraction,
      fg_iou=t.fg_iou, bg_iou=t.bg_iou, canvas=spec.canvas)
  anchors = None if spec.anchors is None else jnp.asarray(spec.anchors)
  rpn_cfg = config.rpn
  flip_aug = bool(config.flip)

  def loss_fn(params, batch_stats, batch, rng):
    flip_rng, roi_rng, rpn_rng = jax.random.split(rng, 3)
    x = preprocess(batch['images'])
    b = x.shape[0]
    gt_boxes, gt_classes = batch['gt_boxes'], batch['gt_classes']
    props = batch.get('proposals')
    if flip_aug:
      flip = jax.random.bernoulli(flip_rng, 0.5, (b,))
      x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
      gt_boxes = flip_boxes(gt_boxes, flip, spec.canvas)
      if props is not None:
        props = flip_boxes(props, flip, spec.canvas)
    roi_keys = jax.random.split(roi_rng, b)
    variables = {'params': params, 'batch_stats': batch_stats}
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
      pooled = pool(f, rois, spec)
    logits, deltas = model.apply({'params': params}, pooled,
                                 method=Detector.classify)
    cls_loss, box_loss, acc = head_loss(
        logits, deltas, labels.reshape(-1), targets.reshape(-1, 4),
        weights.reshape(-1))
    loss = loss + cls_loss + config.roi.box_weight * box_loss
    metrics.update(cls_loss=cls_loss, box_loss=box_loss, roi_accuracy=acc,
                   fg_rois=jnp.sum((labels > 0) * weights) / b)
    return loss, (metrics, new_vars['batch_stats'])
  return loss_fn
