"""AlexNet (Krizhevsky, Sutskever & Hinton 2012), single-tower by default.

227 x 227 x 3 -> conv1 11x11/4 (55 x 55 x 96) -> pool 3/2 -> LRN -> conv2 5x5
pad 2 -> pool -> LRN -> conv3, conv4, conv5 3x3 pad 1 -> pool (6 x 6 x 256)
-> fc6 4096 -> fc7 4096 -> head (fc8). Pooling comes before LRN as in the
Caffe reference model (the paper normalizes first); the order barely matters
and pooling first normalizes 4x fewer activations.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.common import (LRN, Conv, Dtype, MaxPool, fc_classifier,
                               he_normal)
from cnn.models.resnet import ModuleDef


class AlexNetFeatures(nn.Module):
  """conv1..conv5 with pool1, lrn1, pool2, lrn2, pool5.

  Attributes:
    widths: filters of conv1..conv5.
    conv: conv module factory.
    groups: 2 splits conv2, conv4 and conv5 into the paper's two towers
      (each half sees only its own tower's maps); conv3 stays dense, as the
      paper's conv3 reads both GPUs.
    lrn: use the LRN layers.
  """
  widths: Sequence[int]
  conv: ModuleDef
  groups: int = 1
  lrn: bool = True

  @nn.compact
  def __call__(self, x):
    w, g = self.widths, self.groups
    x = nn.relu(self.conv(w[0], (11, 11), strides=4, padding='VALID',
                          name='conv1')(x))
    x = MaxPool(3, 2, name='pool1')(x)
    if self.lrn:
      x = LRN(name='lrn1')(x)
    x = nn.relu(self.conv(w[1], (5, 5), padding=((2, 2), (2, 2)),
                          feature_group_count=g, name='conv2')(x))
    x = MaxPool(3, 2, name='pool2')(x)
    if self.lrn:
      x = LRN(name='lrn2')(x)
    pad1 = ((1, 1), (1, 1))
    x = nn.relu(self.conv(w[2], (3, 3), padding=pad1, name='conv3')(x))
    x = nn.relu(self.conv(w[3], (3, 3), padding=pad1, feature_group_count=g,
                          name='conv4')(x))
    x = nn.relu(self.conv(w[4], (3, 3), padding=pad1, feature_group_count=g,
                          name='conv5')(x))
    return MaxPool(3, 2, name='pool5')(x)


class AlexNet(nn.Module):
  """AlexNet: `features`, `fc6`, `fc7` (with dropout), `head` (fc8).

  Attributes:
    widths: filters of conv1..conv5.
    fc_width: width of fc6 and fc7.
    groups: 1 (single tower) or 2 (the paper's two-GPU grouping).
    lrn: use local response normalization.
    dropout_rate: dropout after fc6 and fc7 in training.
    num_classes: outputs of `head`.
    dtype: compute dtype; parameters stay float32.
  """
  widths: Sequence[int] = (96, 256, 384, 384, 256)
  fc_width: int = 4096
  groups: int = 1
  lrn: bool = True
  dropout_rate: float = 0.5
  num_classes: int = 1000
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(Conv, dtype=self.dtype, kernel_init=he_normal)
    x = AlexNetFeatures(self.widths, conv, self.groups, self.lrn,
                        name='features')(x)
    return fc_classifier(
        x, {'fc6': self.fc_width, 'fc7': self.fc_width}, self.num_classes,
        dropout_rate=self.dropout_rate, dtype=self.dtype, train=train)
