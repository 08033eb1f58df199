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


def test_random_resized_crop_is_a_zoomed_window():
  x = jax.numpy.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
  # The whole image at aspect 1 is the image itself.
  np.testing.assert_allclose(augment.random_resized_crop_flip(
      jax.random.PRNGKey(0), x, area=(1.0, 1.0), aspect=(1.0, 1.0),
      flip=False), x, atol=1e-4)
  # A quarter of the area is a 4x4 window blown up 2x: neighbouring output
  # pixels step by half an input pixel (x steps 3 per pixel, y 24).
  y = np.asarray(augment.random_resized_crop_flip(
      jax.random.PRNGKey(1), x, area=(0.25, 0.25), aspect=(1.0, 1.0),
      flip=False))
  assert y.shape == x.shape
  np.testing.assert_allclose(np.diff(y[:, 2:6, 2:6], axis=2), 1.5, atol=1e-3)
  np.testing.assert_allclose(np.diff(y[:, 2:6, 2:6], axis=1), 12.0,
                             atol=1e-3)
  assert y.min() >= x.min() and y.max() <= x.max()
  # Crops differ between images and seeds.
  z = np.asarray(augment.random_resized_crop_flip(
      jax.random.PRNGKey(2), x, area=(0.25, 0.25), aspect=(1.0, 1.0),
      flip=False))
  assert not np.allclose(y, z)
