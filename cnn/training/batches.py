"""The order of training batches: the loop's determinism contract.

The training batch of step `s` is a pure function of (seed, s): the stream is
the concatenation of per-epoch permutations drawn from
`np.random.default_rng((seed, epoch))`, so a run resumed at any step sees
exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import numpy as np

from cnn.errors import DataError


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng((seed, epoch)).permutation(n)


class TrainBatches:
  """Deterministic training batches: `batch(step)` depends on (seed, step) only.

  Batches run across epoch boundaries, so every batch is full and every
  example is seen once per epoch.
  """

  def __init__(self, data, batch_size: int, seed: int):
    """`data` needs a length for `indices` and `batch(indices)` for
    `batch` (an ArrayData, detection canvases, ...)."""
    if batch_size > len(data):
      raise DataError(f'batch_size={batch_size} exceeds the {len(data)} '
                      'training examples; lower --config.batch_size')
    self.data = data
    self.batch_size = batch_size
    self.seed = seed
    self._perm_cache: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perm_cache:
      # Two epochs are live at an epoch boundary; older ones are dropped.
      for old in [e for e in self._perm_cache if e < epoch - 1]:
        del self._perm_cache[old]
      self._perm_cache[epoch] = epoch_permutation(self.seed, epoch,
                                                  len(self.data))
    return self._perm_cache[epoch]

  def indices(self, step: int) -> np.ndarray:
    n, bs = len(self.data), self.batch_size
    epoch, offset = divmod(step * bs, n)
    idx = self._perm(epoch)[offset:offset + bs]
    if len(idx) < bs:  # The batch runs into the next epoch (bs <= n).
      idx = np.concatenate([idx, self._perm(epoch + 1)[:bs - len(idx)]])
    return idx

  def batch(self, step: int) -> dict:
    return self.data.batch(self.indices(step))

  def epoch_of(self, step: int) -> float:
    return step * self.batch_size / len(self.data)
