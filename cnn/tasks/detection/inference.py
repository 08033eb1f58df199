"""Inference: detections for one image at a time, timed as served, and the
held-out evaluation (mAP@0.5, proposal recall, time per image).

Test time per image is measured as it would be served: proposals computed on
the image (selective search for R-CNN and Fast R-CNN, the RPN for Faster),
the network, then per-class NMS; mAP@0.5 by `cnn.tasks.detection.metrics`
(VOC all-point AP).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnn.ops import boxes as box_ops
from cnn.ops import roi as roi_ops
from cnn.tasks.detection import metrics
from cnn.tasks.detection import proposals as proposals_lib
from cnn.tasks.detection.model import HEAD_DELTA_WEIGHTS, Detector, Spec
from cnn.tasks.detection.model import pool, preprocess
from cnn.tasks.detection.targets import rpn_proposals


# Per-class NMS on each class's best boxes (`postprocess`); runs whose
# config.json predates config.inference.nms_candidates use it too.
NMS_CANDIDATES = 256


def postprocess(rois, valid, logits, deltas, *, canvas: int,
                score_threshold: float, nms_iou: float, per_class: int,
                max_detections: int, candidates: int = NMS_CANDIDATES):
  """Class-specific boxes, per-class NMS, the top detections of one image.

  Per-class NMS builds an N x N IoU matrix per class (80 classes x 2,000
  proposals: 320M pairs). Only boxes scoring above `score_threshold` take
  part in it, so when no class has more than `candidates` of them, each
  class's NMS runs on its `candidates` best boxes instead (kept in proposal
  order, so score ties break as before): the same detections, exactly.
  Otherwise (decided per image, at run time) every class runs on all N.
  `candidates=0` always runs on all N.

  Returns:
    boxes (max_detections, 4), scores (max_detections,) (-1 for padding),
    classes (max_detections,) in 0..K-1.
  """
  probs = jax.nn.softmax(logits, axis=-1)[:, 1:]
  boxes = box_ops.clip(box_ops.decode_deltas(deltas, rois[:, None, :],
                                             HEAD_DELTA_WEIGHTS),
                       canvas, canvas)
  ok = (valid[:, None] & (probs > score_threshold) & (boxes[..., 2] > 0)
        & (boxes[..., 3] > 0))  # (N, K): the boxes NMS sees

  def per_class_nms(b, s, o):
    idx, keep = box_ops.nms_padded(b, s, nms_iou, per_class, valid=o)
    return b[idx], jnp.where(keep, s[idx], -1.0)

  def run(b, s, o):  # (M, K, 4), (M, K), (M, K) -> per class (K, P, ...)
    return jax.vmap(per_class_nms, in_axes=(1, 1, 1))(b, s, o)

  n = probs.shape[0]
  if 0 < candidates < n:
    def few(args):
      b, s, o = args
      # Each class's `candidates` best boxes, back in proposal order.
      _, top = jax.lax.top_k(jnp.where(o, s, -jnp.inf).T, candidates)
      top = jnp.sort(top, axis=1).T  # (M, K)
      pick = lambda x: jnp.take_along_axis(  # pylint: disable=g-long-lambda
          x, top.reshape(top.shape + (1,) * (x.ndim - 2)), axis=0)
      return run(pick(b), pick(s), pick(o))

    fits = ok.sum(axis=0).max() <= candidates
    kept_boxes, kept_scores = jax.lax.cond(
        fits, few, lambda args: run(*args), (boxes, probs, ok))
  else:
    kept_boxes, kept_scores = run(boxes, probs, ok)
  k = kept_scores.shape[0]
  classes = jnp.broadcast_to(jnp.arange(k)[:, None], kept_scores.shape)
  top, idx = jax.lax.top_k(kept_scores.reshape(-1),
                           min(max_detections, kept_scores.size))
  return (kept_boxes.reshape(-1, 4)[idx], top,
          classes.reshape(-1)[idx].astype(jnp.int32))


def image_features(model: Detector, v, image):
  """The trunk's feature map of one uint8 image (a batch of one)."""
  return model.apply(v, preprocess(image)[None], False,
                     method=Detector.features)


def rpn_boxes(model: Detector, v, f, anchors, canvas: int, r, pre_nms: int,
              post_nms: int):
  """The RPN's proposals on feature map `f` (batch of one): (rois (post_nms,
  4) x, y, w, h on the canvas, valid (post_nms,)); `r` is config.rpn."""
  obj, deltas = model.apply(v, f, method=Detector.propose)
  rois, valid, _ = rpn_proposals(
      obj[0], deltas[0], anchors, canvas=canvas, pre_nms=pre_nms,
      post_nms=post_nms, nms_iou=r.nms_iou, min_size=r.min_size)
  return rois, valid


class Predictor:
  """Detections for one image at a time, timed the way they would be served.

  `__call__(image)` returns (boxes, scores, classes) as numpy arrays and the
  seconds spent on proposals and on the network (+ NMS) for that image.
  """

  def __init__(self, model: Detector, variables, config, spec: Spec):
    self.model, self.variables, self.spec = model, variables, spec
    self.config = config
    p, te = config.proposals, config.inference
    self.num_proposals = int(p.test_per_image)
    self.post_kwargs = dict(
        canvas=spec.canvas, score_threshold=te.score_threshold,
        nms_iou=te.nms_iou, per_class=te.per_class,
        max_detections=te.max_detections,
        candidates=int(te.nms_candidates))
    post = functools.partial(postprocess, **self.post_kwargs)
    self.chunk = int(te.rcnn_chunk)

    def head(v, pooled):
      return model.apply(v, pooled, method=Detector.classify)

    if spec.kind == 'rcnn':
      def crops_fn(v, image, rois):
        crops = roi_ops.crop_and_resize(preprocess(image), rois,
                                        (spec.crop, spec.crop))
        pooled = model.apply(v, crops, False, method=Detector.features)
        return head(v, pooled)
      self._crops = jax.jit(crops_fn)
    elif spec.kind == 'fast_rcnn':
      def fast_fn(v, image, rois):
        f = image_features(model, v, image)
        return head(v, pool(f, rois[None], spec))
      self._fast = jax.jit(fast_fn)
    else:
      r = config.rpn
      anchors = jnp.asarray(spec.anchors)

      def faster_fn(v, image):
        f = image_features(model, v, image)
        rois, valid = rpn_boxes(model, v, f, anchors, spec.canvas, r,
                                r.pre_nms_test, r.post_nms_test)
        logits, d = head(v, pool(f, rois[None], spec))
        return logits, d, rois, valid
      self._faster = jax.jit(faster_fn)
    # The detection NMS (per class, then the top detections): its own call,
    # so that its time is reported apart from the network's.
    self._post = jax.jit(post)

  def proposals(self, image):
    """Selective search (or a baseline) on one image, padded to a fixed count."""
    boxes, counts = proposals_lib.compute(
        image[None], self.config.proposals.method, self.num_proposals,
        seed=0)
    valid = np.arange(self.num_proposals) < counts[0]
    return boxes[0], valid

  def __call__(self, image):
    """(boxes, scores, classes, rois, roi_valid, proposal_s, network_s,
    nms_s). Faster R-CNN's proposals (the RPN, its NMS included) are part of
    its network time; nms_s is the detection NMS of every detector."""
    rois, valid, logits, deltas, t_prop, t_net = self.network(image)
    t2 = time.perf_counter()
    b, s, c = jax.block_until_ready(self._post(rois, valid, logits, deltas))
    t3 = time.perf_counter()
    b, s, c = np.asarray(b), np.asarray(s), np.asarray(c)
    keep = s > 0
    return (b[keep], s[keep], c[keep], np.asarray(rois),
            np.asarray(valid), t_prop, t_net, t3 - t2)

  def network(self, image):
    """What the detection NMS starts from: (rois, roi_valid, logits,
    deltas, proposal_s, network_s)."""
    t0 = time.perf_counter()
    if self.spec.kind == 'faster_rcnn':
      logits, deltas, rois, valid = jax.block_until_ready(
          self._faster(self.variables, image))
      t1 = t0
    else:
      rois, valid = self.proposals(image)
      t1 = time.perf_counter()
      if self.spec.kind == 'fast_rcnn':
        logits, deltas = jax.block_until_ready(
            self._fast(self.variables, image, rois))
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
    t2 = time.perf_counter()
    return rois, valid, logits, deltas, t1 - t0, t2 - t1


class RPNProposer:
  """The class-agnostic RPN of a trained Faster R-CNN as a proposal method
  for photographs of any size.

  A photo is letterboxed as the run trained (resized so its longer side is
  the run's canvas, placed top-left on black); the RPN's boxes after NMS
  (every anchor scored, up to `post_nms` kept, best first) are scaled back
  to the photo's pixels and clipped to it. `__call__(photo)` returns
  (boxes (n, 4) x, y, w, h, seconds).
  """

  def __init__(self, model: Detector, variables, config, spec: Spec,
               post_nms: int = 2000):
    if spec.kind != 'faster_rcnn':
      raise ValueError(f'an RPN needs a faster_rcnn run, not {spec.kind}')
    self.canvas, self.variables = spec.canvas, variables
    r, anchors = config.rpn, jnp.asarray(spec.anchors)

    def fn(v, image):
      # Every anchor scored before NMS: a proposal method, not a detector.
      return rpn_boxes(model, v, image_features(model, v, image), anchors,
                       spec.canvas, r, int(anchors.shape[0]), post_nms)
    self._fn = jax.jit(fn)

  def __call__(self, photo: np.ndarray):
    from cnn.data import objects  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    h, w = photo.shape[:2]
    canvas, (nh, nw) = objects.letterbox(photo, self.canvas)
    boxes, valid = jax.block_until_ready(self._fn(self.variables, canvas))
    boxes = np.asarray(boxes)[np.asarray(valid)].astype(np.float64)
    boxes[:, [0, 2]] *= w / nw
    boxes[:, [1, 3]] *= h / nh
    boxes = np.asarray(box_ops.clip(boxes, h, w), np.float32)
    return boxes, time.perf_counter() - t0


def evaluate(model, variables, data, config, spec: Spec) -> dict:
  """mAP@0.5 (VOC all-point AP), proposal recall and time per image."""
  predictor = Predictor(model, variables, config, spec)
  predictor(data.images[0])  # compile outside the timed loop
  detections, truths = [], []
  prop_s = net_s = nms_s = 0.0
  hits = total = num_props = 0
  for i in range(len(data)):
    b, s, c, rois, valid, tp, tn, tm = predictor(data.images[i])
    prop_s += tp
    net_s += tn
    nms_s += tm
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
  res = metrics.evaluate(detections, truths, spec.num_classes,
                                iou_threshold=0.5)
  n = len(data)
  out = {'map': float(res['map']),
         'proposal_seconds': prop_s / n, 'network_seconds': net_s / n,
         'nms_seconds': nms_s / n,
         'seconds_per_image': (prop_s + net_s + nms_s) / n,
         'proposals_per_image': num_props / n,
         'proposal_recall': hits / max(total, 1),
         'detections_per_image': sum(len(d['scores']) for d in detections) / n,
         'examples': float(n)}
  for k, ap in enumerate(res['ap']):
    out[f'ap_{k}'] = float(ap)
  return out
