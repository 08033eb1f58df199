"""The detectors' network: one trunk, a RoI head and (Faster R-CNN) an RPN.

Trunk: `widths` stages of `convs_per_stage` 3x3 conv + BatchNorm + ReLU and a
2x2 max-pool (`cnn.models.detnet.Trunk`), so the feature stride is
2 ** len(widths); the R-CNN crop side is roi_size * stride, which makes
R-CNN's trunk output on a crop exactly the RoI-pooled grid of Fast R-CNN.
The head (FC layers, K + 1 class scores, class-specific box deltas) is the
same for all three detectors.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn.data import augment
from cnn.errors import ConfigError
from cnn.models.common import Dtype
from cnn.models.detnet import FCLayers
from cnn.models.detnet import Trunk
from cnn.ops import boxes as box_ops
from cnn.ops import roi as roi_ops

KINDS = ('rcnn', 'fast_rcnn', 'faster_rcnn')
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


preprocess = augment.standardize_canvas


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


def flip_boxes(boxes, flip, canvas):
  """Mirrors boxes (B, N, 4) of the images where `flip` (B,)."""
  new_x = canvas - boxes[..., 0] - boxes[..., 2]
  return boxes.at[..., 0].set(jnp.where(flip[:, None], new_x, boxes[..., 0]))


def pool(f, rois, spec: Spec):
  """RoI max pooling of (B, R) regions from the feature maps f."""
  pooled = jax.vmap(lambda fi, ri: roi_ops.roi_max_pool(
      fi, ri, (spec.roi_size, spec.roi_size), 1.0 / spec.stride))(f, rois)
  return pooled.reshape((-1,) + pooled.shape[2:])
