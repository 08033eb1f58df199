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


def random_resized_crop_flip(rng, images, area=(0.25, 1.0),
                             aspect=(3 / 4, 4 / 3), flip: bool = True):
  """Inception-style crop on the device: a random box of `area` (fractions
  of the image) and aspect ratio in `aspect` (log-uniform), resized back to
  the image's size (bilinear), then a random horizontal flip.

  Szegedy et al. 2015 sample 8-100 % of a full-size ImageNet photo; on
  64x64 images a larger minimum keeps the object (Tiny ImageNet preset:
  25 %). One crop per image, all in one jitted op.
  """
  n, h, w, c = images.shape
  a_rng, r_rng, y_rng, x_rng, flip_rng = jax.random.split(rng, 5)
  frac = jax.random.uniform(a_rng, (n,), minval=area[0], maxval=area[1])
  log_r = jax.random.uniform(r_rng, (n,), minval=jnp.log(aspect[0]),
                             maxval=jnp.log(aspect[1]))
  ratio = jnp.exp(log_r)  # width / height
  cw = jnp.clip(jnp.sqrt(frac * ratio) * w, 1.0, w)
  ch = jnp.clip(jnp.sqrt(frac / ratio) * h, 1.0, h)
  y0 = jax.random.uniform(y_rng, (n,)) * (h - ch)
  x0 = jax.random.uniform(x_rng, (n,)) * (w - cw)

  def crop(img, y0, x0, ch, cw):
    # Output pixel = input pixel * scale + translation.
    scale = jnp.stack([h / ch, w / cw])
    return jax.image.scale_and_translate(
        img, (h, w, c), (0, 1), scale, -jnp.stack([y0, x0]) * scale,
        'linear', antialias=False)
  images = jax.vmap(crop)(images, y0, x0, ch, cw).astype(images.dtype)
  if flip:
    do_flip = jax.random.bernoulli(flip_rng, 0.5, (n, 1, 1, 1))
    images = jnp.where(do_flip, images[:, :, ::-1, :], images)
  return images
