"""A LeNet-5-style net for 28 x 28 x 1 inputs (MNIST).

conv1 6 5x5 pad 2 (28 x 28 x 6) -> pool 2 -> conv2 16 5x5 (10 x 10 x 16) ->
pool 2 (5 x 5 x 16) -> fc1 120 -> fc2 84 -> head. ReLU and max pooling stand
in for LeCun's scaled tanh and trainable subsampling; conv2 reads all six
conv1 maps (LeCun et al. 1998's C3 uses a sparse connection table), and the
head is a dense layer for softmax cross-entropy (theirs: Euclidean RBF
units). So it has LeNet-5's layout, not its exact layers.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.common import Conv, Dtype, MaxPool, flatten, he_normal


class LeNet5(nn.Module):
  """Submodules `conv1`, `pool1`, `conv2`, `pool2`, `fc1`, `fc2`, `head`.

  Attributes:
    num_classes: outputs of `head`.
    dtype: compute dtype; parameters stay float32.
  """
  num_classes: int = 10
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train  # no BN or dropout; the keyword keeps the zoo's one interface
    conv = functools.partial(Conv, dtype=self.dtype, kernel_init=he_normal)
    x = nn.relu(conv(6, (5, 5), padding=((2, 2), (2, 2)), name='conv1')(x))
    x = MaxPool(2, 2, name='pool1')(x)
    x = nn.relu(conv(16, (5, 5), padding='VALID', name='conv2')(x))
    x = MaxPool(2, 2, name='pool2')(x)
    x = flatten(x)
    x = nn.relu(nn.Dense(120, dtype=self.dtype, name='fc1')(x))
    x = nn.relu(nn.Dense(84, dtype=self.dtype, name='fc2')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)
