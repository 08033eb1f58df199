"""Residual and plain networks of He et al. 2015 for ImageNet.

The blocks and the `Stage` container are shared with the CIFAR nets
(`cnn.models.cifar`): a block is residual or plain by one boolean field, so
that the plain-vs-ResNet comparison differs in nothing but the shortcuts.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.common import Conv, Dtype, GlobalAvgPool, MaxPool, he_normal

ModuleDef = Any

# Explicit symmetric padding instead of 'SAME': for a stride-2 3x3 conv on an
# even-sized map 'SAME' pads (0, 1), which centres the outputs on odd pixels,
# while the option-A shortcut subsamples even pixels (x[:, ::2, ::2]); with
# (1, 1) both see the same positions (and it matches the reference Torch nets).
PAD3 = ((1, 1), (1, 1))


def _shortcut(x, y_shape, strides: int, shortcut: str, conv: ModuleDef,
              norm: ModuleDef):
  """The identity path of a block, adapted to the shape of its output.

  Args:
    x: block input, (B, H, W, C_in).
    y_shape: shape of the residual branch's output, (B, H', W', C_out).
    strides: the block's spatial stride.
    shortcut: 'A' (parameter-free: subsample and zero-pad channels) or 'B'
      (1x1 conv + BN projection), used only where the shape changes.
    conv: conv module factory.
    norm: BatchNorm module factory.

  Returns:
    The shortcut tensor, shaped like the residual branch.
  """
  out_ch = y_shape[-1]
  if strides == 1 and x.shape[-1] == out_ch:
    return x
  if shortcut == 'A':
    if strides != 1:
      x = x[:, ::strides, ::strides, :]
    extra = out_ch - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
  if shortcut == 'B':
    x = conv(out_ch, (1, 1), strides=strides, padding='VALID',
             name='proj_conv')(x)
    return norm(name='proj_bn')(x)
  raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")


class BasicBlock(nn.Module):
  """Two 3x3 convs (He et al. 2015, Fig. 2 left), BN after each.

  Attributes:
    features: output channels.
    strides: stride of the first conv (2 where a stage goes down).
    conv: conv module factory (no bias; BN follows).
    norm: BatchNorm module factory.
    residual: add the shortcut (False gives the plain counterpart).
    shortcut: 'A' or 'B', see `_shortcut`.
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  residual: bool = True
  shortcut: str = 'B'
  act: Callable = nn.relu

  expansion = 1  # output channels per unit of `features` (not a field)

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (3, 3), strides=self.strides, padding=PAD3,
                  name='conv1')(x)
    y = self.act(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), padding=PAD3, name='conv2')(y)
    y = self.norm(name='bn2')(y)
    if self.residual:
      y = y + _shortcut(x, y.shape, self.strides, self.shortcut, self.conv,
                        self.norm)
    return self.act(y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (x4) block (He et al. 2015, Fig. 5 right).

  The stride sits on the 3x3 conv (as in the Torch/torchvision nets), which
  keeps the 1x1 reduce from discarding three quarters of the input.

  Attributes: as `BasicBlock`; `features` is the bottleneck width and the
  block outputs 4 * features channels.
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  residual: bool = True
  shortcut: str = 'B'
  act: Callable = nn.relu

  expansion = 4

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (1, 1), padding='VALID', name='conv1')(x)
    y = self.act(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), strides=self.strides, padding=PAD3,
                  name='conv2')(y)
    y = self.act(self.norm(name='bn2')(y))
    y = self.conv(self.features * self.expansion, (1, 1), padding='VALID',
                  name='conv3')(y)
    y = self.norm(name='bn3')(y)
    if self.residual:
      y = y + _shortcut(x, y.shape, self.strides, self.shortcut, self.conv,
                        self.norm)
    return self.act(y)


BLOCKS = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}


class Stage(nn.Module):
  """`num_blocks` blocks at one resolution; the first one may go down.

  A module of its own so that the parameter tree reads `stage2/block0/conv1`
  and a whole stage can be frozen or inspected by one key.

  Attributes:
    block: 'basic' or 'bottleneck'.
    num_blocks: blocks in the stage.
    features: block width.
    strides: stride of the first block.
    conv, norm: module factories passed to every block.
    residual, shortcut: see `BasicBlock`.
  """
  block: str
  num_blocks: int
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  residual: bool = True
  shortcut: str = 'B'

  @nn.compact
  def __call__(self, x):
    block_cls = BLOCKS[self.block]
    for i in range(self.num_blocks):
      x = block_cls(self.features, self.conv, self.norm,
                    strides=self.strides if i == 0 else 1,
                    residual=self.residual, shortcut=self.shortcut,
                    name=f'block{i}')(x)
    return x


class ImageNetStem(nn.Module):
  """7x7/2 conv 64 + BN + ReLU + 3x3/2 max pool: 224 -> 56."""
  features: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = self.conv(self.features, (7, 7), strides=2, padding=((3, 3), (3, 3)),
                  name='conv')(x)
    x = nn.relu(self.norm(name='bn')(x))
    return MaxPool(3, 2, padding=PAD3, name='pool')(x)


class SmallStem(nn.Module):
  """3x3 conv (stride 1 or 2) + BN + ReLU, no pool: for 32-64 px inputs.

  Tiny ImageNet's 64x64 images through the ImageNet stem would leave a 2x2
  map at stage 4; with this stem at stride 1 stage 4 sees 8x8 (as a CIFAR
  ResNet-18 sees 4x4 at 32x32), at stride 2 it sees 4x4 for a quarter of
  the compute.
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    x = self.conv(self.features, (3, 3), strides=self.strides, padding=PAD3,
                  name='conv')(x)
    return nn.relu(self.norm(name='bn')(x))


STEMS = ('imagenet', '3x3')


def check_block(block: str) -> None:
  """Raises ValueError unless `block` names a block type."""
  if block not in BLOCKS:
    raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {block!r}")


class ResNet(nn.Module):
  """ImageNet ResNet / plain net (He et al. 2015, Table 1).

  Submodules: `stem`, `stage1`..`stageN`, `pool`, `head`.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-34/50.
    block: 'basic' (ResNet-18/34) or 'bottleneck' (50/101/152).
    num_filters: width of the stem and of stage 1; doubles every stage.
    residual: False gives the plain net of the same depth.
    shortcut: 'B' (projection only where the shape changes; the paper's
      ImageNet default) or 'A' (zero-padding).
    num_classes: outputs of `head`.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max pool, 224 -> 56) or '3x3' (one
      3x3 conv of stride `stem_strides`, no pool: `SmallStem`, for 64x64).
    stem_strides: stride of the '3x3' stem (1 or 2).
    dtype: compute dtype; parameters stay float32.
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = 'basic'
  num_filters: int = 64
  residual: bool = True
  shortcut: str = 'B'
  num_classes: int = 1000
  stem: str = 'imagenet'
  stem_strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    check_block(self.block)
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=he_normal)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    if self.stem == 'imagenet':
      x = ImageNetStem(self.num_filters, conv, norm, name='stem')(x)
    elif self.stem == '3x3':
      x = SmallStem(self.num_filters, conv, norm, self.stem_strides,
                    name='stem')(x)
    else:
      raise ValueError(f'stem must be one of {STEMS}, got {self.stem!r}')
    for i, n in enumerate(self.stage_sizes):
      x = Stage(self.block, n, self.num_filters * 2**i, conv, norm,
                strides=1 if i == 0 else 2, residual=self.residual,
                shortcut=self.shortcut, name=f'stage{i + 1}')(x)
    x = GlobalAvgPool(name='pool')(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)
