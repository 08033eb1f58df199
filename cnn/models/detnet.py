"""The small VGG-style trunk of the detectors, and its CIFAR classifier.

`Trunk` is what R-CNN, Fast R-CNN and Faster R-CNN share (`cnn.tasks.detection`):
stages of (3x3 conv, BatchNorm, ReLU) x n and a 2x2 max-pool, stride
2 ** len(widths). `TrunkClassifier` (registry name `det_trunk`) is that trunk
on a 32x32 CIFAR image (a 4x4 map for three stages), flattened, FC layers and
a `head`: the lecture's "pretrain on classification" step, whose trunk and
FC layers a detector can start from (`configs/detection.py`, `init_from`).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.common import Conv, Dtype, he_normal


class Trunk(nn.Module):
  """VGG-style conv trunk: stages of (3x3 conv, BN, ReLU) x n, 2x2 max-pool."""
  widths: Sequence[int] = (16, 32, 64)
  convs_per_stage: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    for s, width in enumerate(self.widths):
      for k in range(self.convs_per_stage):
        x = Conv(width, (3, 3), padding='SAME', use_bias=False,
                 kernel_init=he_normal, dtype=self.dtype,
                 name=f'conv{s + 1}_{k + 1}')(x)
        x = nn.relu(norm(name=f'bn{s + 1}_{k + 1}')(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    return x


class FCLayers(nn.Module):
  """Flatten, then Dense + ReLU per width (`fc1`, `fc2`, ...)."""
  widths: Sequence[int] = (256, 256)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Dense(width, kernel_init=he_normal, dtype=self.dtype,
                           name=f'fc{i + 1}')(x))
    return x


class TrunkClassifier(nn.Module):
  """`Trunk` -> `FCLayers` (named `fc`) -> Dense `head`."""
  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)
  convs_per_stage: int = 2
  fc_widths: Sequence[int] = (256, 256)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = Trunk(tuple(self.widths), self.convs_per_stage, self.dtype,
              name='trunk')(x, train=train)
    x = FCLayers(tuple(self.fc_widths), self.dtype, name='fc')(x)
    return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype,
                                name='head')(x), jnp.float32)
