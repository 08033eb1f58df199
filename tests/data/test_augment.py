"""On-device augmentation: pad-and-crop, flip."""
import jax
import numpy as np

from cnn.data import augment


def test_random_crop_flip_shapes_and_content():
  rng = jax.random.PRNGKey(0)
  x = jax.random.normal(rng, (64, 8, 8, 3))
  y = augment.random_crop_flip(jax.random.PRNGKey(1), x, pad=4)
  assert y.shape == x.shape
  # Each output is a shifted (and maybe flipped) copy, zero where padded.
  assert not np.allclose(y, x)
  # Without padding and flipping nothing changes.
  np.testing.assert_array_equal(
      augment.random_crop_flip(rng, x, pad=0, flip=False), x)
  # Flip only: every image is itself or its mirror.
  z = np.asarray(augment.random_crop_flip(jax.random.PRNGKey(2), x, pad=0))
  xs = np.asarray(x)
  same = np.all(z == xs, axis=(1, 2, 3))
  mirrored = np.all(z == xs[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored) and same.any() and mirrored.any()
