"""VGG nets A-E of Simonyan & Zisserman 2014 (Table 1).

Every conv is 3x3, stride 1, pad 1 (except the 1x1 convs of configuration C),
every pool 2x2/2; five pools take 224 to 7, so FC6 sees 7 x 7 x 512. FC6's
input size follows from the input shape, so the nets run on other sizes too
(32x32 gives 1 x 1 x 512).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.common import (LRN, Conv, Dtype, MaxPool, fc_classifier,
                               he_normal)
from cnn.models.resnet import ModuleDef

# Stage -> convs as (filters, kernel side). The tuple-of-tuples form keeps the
# table next to the paper's Table 1 column by column.
def _convs(*widths, k=3):
  return tuple((w, k) for w in widths)


CONFIGS = {
    'A': (_convs(64), _convs(128), _convs(256, 256), _convs(512, 512),
          _convs(512, 512)),
    'B': (_convs(64, 64), _convs(128, 128), _convs(256, 256),
          _convs(512, 512), _convs(512, 512)),
    'C': (_convs(64, 64), _convs(128, 128),
          _convs(256, 256) + _convs(256, k=1),
          _convs(512, 512) + _convs(512, k=1),
          _convs(512, 512) + _convs(512, k=1)),
    'D': (_convs(64, 64), _convs(128, 128), _convs(256, 256, 256),
          _convs(512, 512, 512), _convs(512, 512, 512)),
    'E': (_convs(64, 64), _convs(128, 128), _convs(256, 256, 256, 256),
          _convs(512, 512, 512, 512), _convs(512, 512, 512, 512)),
    # Five pools like the real nets but narrow: runs on 32x32 in tests.
    'tiny': (_convs(8), _convs(16), _convs(16), _convs(32), _convs(32)),
    # VGG-style for 64x64 (Tiny ImageNet): B's first four stages, four
    # pools, 4 x 4 x 512 into fc6.
    '64': (_convs(64, 64), _convs(128, 128), _convs(256, 256),
           _convs(512, 512)),
}


class VGGFeatures(nn.Module):
  """The conv/pool part: `conv{s}_{i}` (+ `bn{s}_{i}`) and `pool{s}`.

  Attributes:
    stages: per stage, its convs as (filters, kernel side).
    conv: conv module factory.
    norm: BatchNorm factory, or None for the paper's nets (no BN).
    lrn: LRN after conv1_1 (configuration A-LRN).
  """
  stages: Sequence[Sequence[tuple[int, int]]]
  conv: ModuleDef
  norm: Optional[ModuleDef] = None
  lrn: bool = False

  @nn.compact
  def __call__(self, x):
    for s, convs in enumerate(self.stages, start=1):
      for i, (width, k) in enumerate(convs, start=1):
        pad = (k - 1) // 2
        x = self.conv(width, (k, k), padding=((pad, pad), (pad, pad)),
                      name=f'conv{s}_{i}')(x)
        if self.norm is not None:
          x = self.norm(name=f'bn{s}_{i}')(x)
        x = nn.relu(x)
        if self.lrn and s == 1 and i == 1:
          x = LRN(name='lrn')(x)
      x = MaxPool(2, 2, name=f'pool{s}')(x)
    return x


class VGG(nn.Module):
  """VGG net: `features`, then `fc6`, `fc7` (with dropout) and `head` (FC8).

  Attributes:
    stages: conv table, one of `CONFIGS` (default D, i.e. VGG-16).
    lrn: LRN after the first conv (A-LRN).
    batch_norm: BN after every conv (not in the paper; convs then drop bias).
    fc_width: width of fc6 and fc7.
    width_multiplier: every conv's width times this (rounded; narrow nets
      for a CPU budget).
    dropout_rate: dropout after fc6 and fc7 in training.
    num_classes: outputs of `head`.
    dtype: compute dtype; parameters stay float32.
  """
  stages: Sequence[Sequence[tuple[int, int]]] = CONFIGS['D']
  lrn: bool = False
  batch_norm: bool = False
  fc_width: int = 4096
  width_multiplier: float = 1.0
  dropout_rate: float = 0.5
  num_classes: int = 1000
  dtype: Dtype = jnp.float32

  @property
  def conv_stages(self):
    """`stages` with every width times `width_multiplier`."""
    if self.width_multiplier == 1.0:
      return self.stages
    return tuple(tuple((max(1, round(w * self.width_multiplier)), k)
                       for w, k in convs) for convs in self.stages)

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(Conv, use_bias=not self.batch_norm,
                             dtype=self.dtype, kernel_init=he_normal)
    norm = None
    if self.batch_norm:
      norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                               momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    x = VGGFeatures(self.conv_stages, conv, norm, self.lrn,
                    name='features')(x)
    return fc_classifier(
        x, {'fc6': self.fc_width, 'fc7': self.fc_width}, self.num_classes,
        dropout_rate=self.dropout_rate, dtype=self.dtype, train=train)
