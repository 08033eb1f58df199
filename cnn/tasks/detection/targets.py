"""Training targets, sampled per image inside the jitted step.

Fast R-CNN section 2.3: `rois_per_image` regions per image, up to
`fg_fraction` foreground (IoU >= fg_iou with a ground-truth box; the
ground-truth boxes themselves are candidates), the rest background (IoU in
[bg_iou, fg_iou)). Faster R-CNN section 3.3 for the RPN's anchors. Static
shapes throughout, so everything vmaps over the batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cnn.ops import boxes as box_ops
from cnn.tasks.detection.model import HEAD_DELTA_WEIGHTS


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
