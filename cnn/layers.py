"""Layers and the arithmetic of conv/pool layers.

Local response normalization is here because AlexNet and VGG-A-LRN use it.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


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
