"""Building blocks shared by the model zoo.

Pooling and LRN are wrapped as tiny parameter-free modules rather than called
as functions so that they get names in the module tree: `cnn.tools.summary` then
sees them as layers of their own (one row each, with their output shape and
cost), the way the lecture walks through a network by hand.
"""
from __future__ import annotations

from typing import Any, Sequence

import functools

import flax.linen as nn
import jax.numpy as jnp

from jax import lax

from cnn.ops import conv as conv_ops

# He et al. 2015 (Delving deep into rectifiers): keeps the activation variance
# constant through ReLU layers, which is what lets plain 20-56 layer nets train
# at all in the plain-vs-ResNet study.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')

# `nn.Conv` with the library's convolution: XLA's forward pass and input
# gradient, the weight gradient chosen per shape by measurement on CPU
# (`cnn.ops.conv`). Parameters and their names are `nn.Conv`'s.
Conv = functools.partial(nn.Conv,
                         conv_general_dilated=conv_ops.conv_general_dilated)

Dtype = Any
Padding = str | Sequence[tuple[int, int]]



def local_response_norm(x, size: int = 5, k: float = 2.0, alpha: float = 1e-4,
                        beta: float = 0.75):
  """Across-channel LRN of Krizhevsky et al. 2012 (section 3.3), NHWC input.

  b = a / (k + alpha * sum_{j in window} a_j^2) ** beta, the window being
  `size` adjacent channels centred on each channel (the paper's n=5, k=2,
  alpha=1e-4, beta=0.75). The paper's alpha multiplies the raw sum, not the
  mean, so it is not divided by `size`.
  """
  sq = jnp.square(x)
  half = size // 2
  summed = lax.reduce_window(sq, 0.0, lax.add, (1, 1, 1, size), (1, 1, 1, 1),
                             ((0, 0), (0, 0), (0, 0), (half, size - 1 - half)))
  return x / jnp.power(k + alpha * summed, beta)


class MaxPool(nn.Module):
  """Max pooling over a square window.

  Attributes:
    window: side of the pooling window.
    stride: step between windows.
    padding: 'VALID', 'SAME' or explicit ((top, bottom), (left, right)) pads;
      padded positions never win (they are -inf).
  """
  window: int = 2
  stride: int = 2
  padding: Padding = 'VALID'

  @nn.compact
  def __call__(self, x):
    return nn.max_pool(x, (self.window, self.window),
                       strides=(self.stride, self.stride),
                       padding=self.padding)


class GlobalAvgPool(nn.Module):
  """Mean over the spatial axes: (B, H, W, C) -> (B, C)."""

  @nn.compact
  def __call__(self, x):
    return jnp.mean(x, axis=(1, 2))


class LRN(nn.Module):
  """Across-channel local response normalization (AlexNet, VGG-A-LRN).

  Attributes:
    size: number of adjacent channels summed over (the paper's n).
    k, alpha, beta: the paper's constants.
  """
  size: int = 5
  k: float = 2.0
  alpha: float = 1e-4
  beta: float = 0.75

  @nn.compact
  def __call__(self, x):
    return local_response_norm(x, self.size, self.k, self.alpha, self.beta)


def flatten(x):
  """(B, ...) -> (B, prod(...)) for the first fully connected layer."""
  return x.reshape((x.shape[0], -1))


def fc_classifier(x, widths: dict, num_classes: int, *, dropout_rate: float,
                  dtype, train: bool):
  """Flatten -> (Dense + ReLU + dropout) per `widths` -> Dense `head`.

  Called inside a parent's `@nn.compact` method, so the layers are the
  parent's own children (`fc6`, `drop6`, ..., `head`): transfer learning and
  the FC-to-conv conversion address them by those names.

  Args:
    x: the last feature map (B, H, W, C).
    widths: layer name -> width, in order, e.g. {'fc6': 4096, 'fc7': 4096}.
    num_classes: outputs of `head`.
    dropout_rate: dropout after each hidden FC layer, in training only.
    dtype: compute dtype.
    train: training mode (dropout on).
  """
  x = flatten(x)
  for name, width in widths.items():
    x = nn.relu(nn.Dense(width, dtype=dtype, name=name)(x))
    x = nn.Dropout(dropout_rate, deterministic=not train,
                   name=name.replace('fc', 'drop'))(x)
  x = nn.Dense(num_classes, dtype=dtype, name='head')(x)
  return jnp.asarray(x, jnp.float32)
