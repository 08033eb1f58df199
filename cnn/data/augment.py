"""On-device preprocessing, called inside the jitted train/eval steps."""
import jax
import jax.numpy as jnp


# Synthetic canvases (localization, detection) are mostly background noise
# around mid-grey: a fixed scaling instead of a dataset mean.
CANVAS_MEAN, CANVAS_STD = 0.5, 0.25


def standardize_canvas(images):
  """uint8 canvases -> float32 ((x / 255) - 0.5) / 0.25."""
  return (jnp.asarray(images, jnp.float32) / 255.0 - CANVAS_MEAN) / CANVAS_STD


def normalize(images, mean, dtype=jnp.float32):
  """uint8 -> float in [0, 1] minus the training mean."""
  return (images.astype(jnp.float32) / 255.0 - mean).astype(dtype)


def random_crop_flip(rng, images, pad: int, flip: bool = True):
  """Pads by `pad` zeros, takes a random crop of the original size, flips.

  He et al. 2015 section 4.2: "4 pixels are padded on each side, and a 32x32
  crop is randomly sampled from the padded image or its horizontal flip".
  Applied after mean subtraction, so the zero padding is the mean colour.
  """
  n, h, w, _ = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  if pad:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * pad + 1)

    def crop(img, off):
      return jax.lax.dynamic_slice(img, (off[0], off[1], 0),
                                   (h, w, img.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    do_flip = jax.random.bernoulli(flip_rng, 0.5, (n, 1, 1, 1))
    images = jnp.where(do_flip, images[:, :, ::-1, :], images)
  return images
