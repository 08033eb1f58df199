"""CIFAR-10 plain nets and ResNets of He et al. 2015, section 4.2.

depth = 6n + 2: a 3x3 conv, then three stages of n basic blocks (2n conv
layers each) on 32x32, 16x16 and 8x8 maps with 16, 32 and 64 filters, global
average pooling and a 10-way fully connected layer. The only difference
between `cifar_plain{d}` and `cifar_resnet{d}` is the `residual` field.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.common import Conv, Dtype, GlobalAvgPool, he_normal
from cnn.models.resnet import PAD3, ModuleDef, Stage

EXAMPLE_DEPTHS = (20, 32, 44, 56, 110)


def blocks_per_stage(depth: int, family: str = 'cifar_resnet') -> int:
  """n for depth = 6n + 2.

  Args:
    depth: total weighted layers.
    family: name prefix used in the error message.

  Raises:
    ValueError: depth is not of the form 6n + 2 with n >= 1.
  """
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(
        f'depth {depth} is not of the form 6n+2: use {family}{{6n+2}}, '
        f'e.g. {", ".join(map(str, EXAMPLE_DEPTHS))}')
  return (depth - 2) // 6


class CifarResNet(nn.Module):
  """CIFAR ResNet (`residual=True`) or plain net (`residual=False`).

  Submodules: `stem` (conv + BN), `stage1`..`stage3`, `pool`, `head`.

  Attributes:
    depth: 6n + 2 weighted layers (20, 32, 44, 56, 110, 1202 in the paper).
    widths: filters per stage.
    residual: add identity shortcuts.
    shortcut: 'A' (the paper's CIFAR choice: identity, with stride-2
      subsampling and zero-padded channels where the shape changes, so the
      ResNet has exactly the plain net's parameters) or 'B' (1x1 conv + BN
      projection where the shape changes).
    num_classes: outputs of `head`.
    dtype: compute dtype; parameters stay float32.
  """
  depth: int = 20
  widths: Sequence[int] = (16, 32, 64)
  residual: bool = True
  shortcut: str = 'A'
  num_classes: int = 10
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    n = blocks_per_stage(self.depth)
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=he_normal)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    x = Stem(self.widths[0], conv, norm, name='stem')(x)
    for i, width in enumerate(self.widths):
      x = Stage('basic', n, width, conv, norm, strides=1 if i == 0 else 2,
                residual=self.residual, shortcut=self.shortcut,
                name=f'stage{i + 1}')(x)
    x = GlobalAvgPool(name='pool')(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)


class Stem(nn.Module):
  """3x3 conv + BN + ReLU at full resolution."""
  features: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = self.conv(self.features, (3, 3), padding=PAD3, name='conv')(x)
    return nn.relu(self.norm(name='bn')(x))
