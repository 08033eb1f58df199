"""What a trained classifier learned (Zeiler & Fergus 2014), as pictures.

`write_all` (`python -m experiments.visualize`) draws a classification run's
first-layer filters, per stage the 9 held-out images that excite a unit most
cropped to its receptive field (their section 4), and occlusion maps
(section 4.2). Stages are the ResNets' `Stage` modules (`stage1`..), else
the max-pools (VGG, AlexNet, LeNet, OverFeat), else every conv layer.

A receptive field is computed, not assumed: the bounding box of the input
pixels where the gradient of that one unit is non-zero, united over random
inputs (a ReLU or max-pool passes gradient only where active, so one input
can show too little); exact for linear stacks, clipped to the image since
padding has no pixels.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn.errors import ConfigError
from cnn.models.common import MaxPool
from cnn.models.resnet import Stage
from cnn.tools import plotting

plt = plotting.plt  # Agg: set up by cnn.tools.plotting before pyplot.


def _padded(x, batch: int):
  """`x` with its last example repeated up to `batch` (one compilation)."""
  return np.concatenate([x, np.repeat(x[-1:], batch - len(x), 0)])


# --- The net's layers --------------------------------------------------------

def layer_calls(model: nn.Module, variables: dict,
                image_shape: Sequence[int]) -> list[tuple[str, nn.Module]]:
  """(path, module) of every module call of one forward pass, in call order.

  Traced under `jax.eval_shape`: nothing is computed.
  """
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      path = '/'.join(context.module.path)
      if path not in [p for p, _ in calls]:
        calls.append((path, context.module))
    return next_fun(*args, **kwargs)

  def forward(v, x):
    with nn.intercept_methods(interceptor):
      return model.apply(v, x, train=False)

  jax.eval_shape(forward, variables,
                 jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  return [(p, m) for p, m in calls if p]  # '' is the model itself


def stage_paths(calls: list[tuple[str, nn.Module]]) -> list[str]:
  """The stages to show: ResNet stages, else max-pools, else convs."""
  for kind in (Stage, MaxPool, nn.Conv):
    paths = [p for p, m in calls if isinstance(m, kind)]
    if paths:
      return paths
  raise ConfigError('the model has no stage, pooling or conv layer to show')


def first_conv_kernel(variables: dict, calls) -> tuple[np.ndarray, str]:
  """The first conv layer's kernel (H, W, C_in, K) and its path."""
  path = next((p for p, m in calls if isinstance(m, nn.Conv)), None)
  if path is None:
    raise ConfigError('the model has no conv layer')
  node = variables['params']
  for key in path.split('/'):
    node = node[key]
  return np.asarray(node['kernel'], np.float32), path


def stage_features(model: nn.Module, stages: Sequence[str]) -> Callable:
  """`(variables, x) -> (probabilities, {stage: output map})` on normalised
  input."""
  wanted = set(stages)

  def features(variables, x):
    logits, state = model.apply(
        variables, x, train=False, mutable=['intermediates'],
        capture_intermediates=lambda m, name: (
            name == '__call__' and '/'.join(m.path) in wanted))
    maps = {}
    for stage in stages:
      node = state['intermediates']
      for key in stage.split('/'):
        node = node[key]
      maps[stage] = node['__call__'][0].astype(jnp.float32)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), maps
  return features


# --- Receptive fields --------------------------------------------------------

def receptive_fields(features: Callable, variables, units: Sequence[tuple],
                     image_shape: Sequence[int], *, repeats: int = 8,
                     chunk: int = 64, seed: int = 0) -> np.ndarray:
  """The input box each unit sees, from the support of its gradient.

  Args:
    features: `(variables, x (B, H, W, C)) -> {name: (B, h, w, c) map}` (an
      example's outputs must depend on that example only, as at inference).
    variables: its first argument (passed, not closed over: a jitted
      closure would embed the weights as constants).
    units: (name, y, x, channel) of each unit.
    image_shape: (H, W, C) of the input.
    repeats: random inputs per unit; the supports are united.
    chunk: examples per gradient call (one compilation for all).
    seed: of the random inputs (uniform in [-0.5, 0.5), like normalised
      images).

  Returns:
    (len(units), 4) int array of half-open boxes (y0, y1, x0, x1), clipped
    to the image; the whole image for a unit with no gradient anywhere.
  """
  units = list(units)
  h, w = image_shape[:2]
  if not units:
    return np.zeros((0, 4), np.int64)
  names = sorted({u[0] for u in units})
  shapes = jax.eval_shape(
      features, variables,
      jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))

  @jax.jit
  def grad(variables, x, which, ys, xs, cs):
    def total(x):
      maps = features(variables, x)
      rows = jnp.arange(x.shape[0])
      out = 0.0
      for i, name in enumerate(names):
        _, mh, mw, mc = shapes[name].shape
        picked = maps[name][rows, jnp.minimum(ys, mh - 1),
                            jnp.minimum(xs, mw - 1), jnp.minimum(cs, mc - 1)]
        out = out + jnp.sum(jnp.where(which == i, picked, 0.0))
      return out
    return jnp.any(jax.grad(total)(x) != 0, axis=-1)

  rng = np.random.default_rng(seed)
  rows = np.repeat(np.arange(len(units)), repeats)
  table = np.asarray([(names.index(u[0]),) + tuple(u[1:]) for u in units],
                     np.int32)[rows]
  support = np.zeros((len(units), h, w), bool)
  for start in range(0, len(rows), chunk):
    part = table[start:start + chunk]
    n = len(part)
    part = _padded(part, chunk)
    x = rng.uniform(-0.5, 0.5, (chunk, *image_shape)).astype(np.float32)
    got = np.asarray(grad(variables, x, *part.T))[:n]
    np.logical_or.at(support, rows[start:start + n], got)
  boxes = np.zeros((len(units), 4), np.int64)
  for i, s in enumerate(support):
    ys, xs = np.flatnonzero(s.any(1)), np.flatnonzero(s.any(0))
    boxes[i] = ((ys[0], ys[-1] + 1, xs[0], xs[-1] + 1) if ys.size
                else (0, h, 0, w))
  return boxes


# --- Top activations ---------------------------------------------------------

def spatial_max(maps):
  """(N, h, w, C) -> the maximum per image and channel (N, C) and where it
  is, (N, C) flat indices y * w + x (the first position on ties)."""
  n, h, w, c = maps.shape
  flat = maps.reshape(n, h * w, c)
  return flat.max(axis=1), flat.argmax(axis=1)


def pick_channels(values: np.ndarray, count: int) -> np.ndarray:
  """The `count` channels with the highest mean of `values` (N, C) over
  images, highest first (the lower channel on ties)."""
  mean = np.asarray(values, np.float64).mean(axis=0)
  return np.argsort(-mean, kind='stable')[:count]


def top_k_images(values: np.ndarray, k: int = 9) -> np.ndarray:
  """(min(k, N), C) image indices per channel by decreasing `values` (N, C)
  (each image at most once per channel; the lower index on ties)."""
  return np.argsort(-np.asarray(values), axis=0, kind='stable')[:k]


# --- Occlusion ---------------------------------------------------------------

def occlusion_starts(size: int, patch: int, stride: int) -> np.ndarray:
  """Square offsets along one side, the last flush with the border."""
  starts = list(range(0, max(size - patch, 0) + 1, stride))
  if starts[-1] != max(size - patch, 0):
    starts.append(size - patch)
  return np.asarray(starts)


def occlusion_map(prob_fn: Callable, image: np.ndarray, label: int,
                  patch: int, stride: int, fill: float = 0.0,
                  batch: int = 64):
  """The true class's probability with a square over each position.

  Args:
    prob_fn: `x (B, H, W, C) -> (B, K)` probabilities, B = `batch`.
    image: one normalised image (H, W, C).
    label: its true class.
    patch: side of the square; stride: its step.
    fill: the square's value (0 in normalised units: the training mean).
    batch: examples per `prob_fn` call (the last call is padded).

  Returns:
    (map (len(ys), len(xs)), ys, xs): map[i, j] is the probability with
    the square's top-left corner at (ys[i], xs[j]).
  """
  image = np.asarray(image, np.float32)
  ys = occlusion_starts(image.shape[0], patch, stride)
  xs = occlusion_starts(image.shape[1], patch, stride)
  copies = np.repeat(image[None], len(ys) * len(xs), axis=0)
  for i, (y, x) in enumerate((y, x) for y in ys for x in xs):
    copies[i, y:y + patch, x:x + patch] = fill
  probs = []
  for start in range(0, len(copies), batch):
    part = copies[start:start + batch]
    n = len(part)
    part = _padded(part, batch)
    probs.append(np.asarray(prob_fn(part))[:n, label])
  return np.concatenate(probs).reshape(len(ys), len(xs)), ys, xs


# --- Pictures ----------------------------------------------------------------

def _show(ax, image):
  image = np.asarray(image)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap='gray', vmin=0, vmax=255,
              interpolation='nearest')
  else:
    ax.imshow(image, interpolation='nearest')
  ax.set_xticks([])
  ax.set_yticks([])


def top9_figure(rows: list[list[tuple[np.ndarray, str]]], title: str
                ) -> plt.Figure:
  """One row per unit of (crop, caption) pairs, up to 9 per row."""
  cols = max(len(r) for r in rows)
  fig, axes = plt.subplots(len(rows), cols, squeeze=False,
                           figsize=(cols * 1.1, len(rows) * 1.25 + 0.5))
  for r, row in enumerate(rows):
    for c, ax in enumerate(axes[r]):
      if c >= len(row):
        ax.set_axis_off()
        continue
      crop, caption = row[c]
      _show(ax, crop)
      ax.set_title(caption, fontsize=6)
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  return fig


def occlusion_figure(items: list[tuple], patch: int) -> plt.Figure:
  """Per image, its occlusion map as a heat-map beside it.

  Args:
    items: (uint8 image, map, ys, xs, title) per image, as `occlusion_map`
      returns them; each map cell is drawn at the centre of its square, on
      the image's axes, so that a dip sits where the square hid the object.
    patch: side of the square.
  """
  fig, axes = plt.subplots(len(items), 2, squeeze=False,
                           figsize=(5.0, len(items) * 2.3 + 0.4))
  for (image, prob, ys, xs, title), (left, right) in zip(items, axes):
    _show(left, image)
    left.set_title(title, fontsize=7)
    h, w = image.shape[:2]
    half = patch / 2
    dy = (ys[-1] - ys[0]) / max(len(ys) - 1, 1) / 2 or half
    dx = (xs[-1] - xs[0]) / max(len(xs) - 1, 1) / 2 or half
    # The map's own range: a net unsure of the image still shows where a
    # square moves it (the colour bar gives the values).
    shown = right.imshow(
        prob, cmap='jet', interpolation='nearest',
        extent=(xs[0] + half - dx, xs[-1] + half + dx,
                ys[-1] + half + dy, ys[0] + half - dy))
    right.set_xlim(0, w)
    right.set_ylim(h, 0)
    right.set_xticks([])
    right.set_yticks([])
    right.set_title(f'p(true class), {patch}px square', fontsize=7)
    fig.colorbar(shown, ax=right, fraction=0.046, pad=0.04)
  fig.tight_layout()
  return fig


# --- A run folder ------------------------------------------------------------

def held_out(split_data, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` uint8 images and labels of a held-out split."""
  if hasattr(split_data, 'images'):  # in memory (ArrayData)
    return split_data.images[:count], split_data.labels[:count]
  images, labels, have = [], [], 0
  for batch in split_data:  # streaming: padded batches with a mask
    keep = np.asarray(batch['mask']) > 0
    images.append(np.asarray(batch['image'])[keep])
    labels.append(np.asarray(batch['label'])[keep])
    have += int(keep.sum())
    if have >= count:
      break
  return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def _class_names(config) -> list[str] | None:
  from cnn.data import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    names = input_pipeline.class_names(config.dataset, config.data_dir)
  except Exception:  # pylint: disable=broad-except
    return None  # no names in the dataset's metadata: numbers instead
  classes = tuple(config.classes or ())
  return [names[int(c)] for c in classes] if classes else names


def _load(workdir: str, checkpoint: str, split: str):
  from cnn import runs  # pylint: disable=g-import-not-at-top
  config = runs.load_config(workdir)
  if config.task != 'classification':
    raise ConfigError(f"{workdir} is a {config.task} run; visualize shows "
                      'classification runs only')
  run, state, step = runs.restore_run(workdir, checkpoint)
  if split not in run.data.evals:
    raise ConfigError(f"split '{split}' is not held out in this run; choose "
                      f'one of {sorted(run.data.evals)}')
  return run, state, step


def confident_examples(p_true: np.ndarray, labels: np.ndarray,
                       k: int) -> list[int]:
  """Indices of the `k` examples with the highest probability of their true
  class, at most one per class (Zeiler & Fergus occlude images the net gets
  right, so the map shows what it relies on)."""
  picked, seen = [], set()
  for i in np.argsort(-p_true, kind='stable'):
    if int(labels[i]) not in seen:
      picked.append(int(i))
      seen.add(int(labels[i]))
      if len(picked) == k:
        break
  return picked


def _top_patches(forward, variables, pixels, normalise, stages, map_shapes,
                 units: int, batch: int) -> tuple[dict, np.ndarray]:
  """({stage: [(channel, [(image, y, x, activation)] * 9)] * units}, the
  class probabilities of every image)."""
  maxima = {s: ([], []) for s in stages}
  probs = []
  for start in range(0, len(pixels), batch):
    part = normalise(pixels[start:start + batch])
    p, got = jax.device_get(forward(variables, _padded(part, batch)))
    probs.append(np.asarray(p)[:len(part)])
    for s, (v, where) in got.items():
      maxima[s][0].append(v[:len(part)])
      maxima[s][1].append(where[:len(part)])
  picks = {}
  for s in stages:
    values, where = (np.concatenate(a) for a in maxima[s])
    channels = pick_channels(values, units)
    top = top_k_images(values[:, channels], 9)
    map_w = map_shapes[s].shape[2]
    picks[s] = [(int(c), [(int(i), *divmod(int(where[i, c]), map_w),
                           float(values[i, c])) for i in top[:, j]])
                for j, c in enumerate(channels)]
  return picks, np.concatenate(probs)


def write_all(workdir: str, checkpoint: str | int = 'latest',
              split: str = 'test', out: str | None = None, units: int = 4,
              images: int = 2000, occlusion: int = 4, dpi: int = 100,
              batch: int = 64) -> list[str]:
  """Writes filters.png, top9_<stage>.png and occlusion.png for a run.

  Args:
    workdir: a classification run folder.
    checkpoint: 'latest', 'best' or a step.
    split: the held-out split the images come from.
    out: output folder (default: workdir/visualize).
    units: channels per stage (those with the highest mean spatial max).
    images: held-out images searched for the top 9 (the first ones).
    occlusion: images with an occlusion map (0: none): of the searched
      images, those whose true class the net is surest of, one per class.
    dpi: resolution of the PNGs.
    batch: images per forward pass.

  Returns:
    The paths written.
  """
  from cnn.data import augment  # pylint: disable=g-import-not-at-top
  for name, value, least in (('units', units, 1), ('images', images, 1),
                             ('occlusion', occlusion, 0)):
    if value < least:
      raise ConfigError(f'--{name}={value} must be at least {least}')
  run, state, step = _load(workdir, checkpoint, split)
  out = out or os.path.join(workdir, 'visualize')
  variables = state.variables
  pixels, labels = held_out(run.data.evals[split], images)
  size = int(run.config.image_size or 0)
  if size and pixels.shape[1:3] != (size, size):
    # A run that resizes its inputs (transfer to another input size) sees
    # them at that size: so do its filters, patches and occlusions here.
    n, _, _, c = pixels.shape
    pixels = np.clip(np.round(np.asarray(jax.image.resize(
        pixels.astype(np.float32), (n, size, size, c), 'bilinear'))), 0,
                     255).astype(np.uint8)
  shape = tuple(pixels.shape[1:])
  mean = np.asarray(run.data.mean, np.float32)
  normalise = lambda x: np.asarray(augment.normalize(x, mean))
  calls = layer_calls(run.model, variables, shape)
  stages = stage_paths(calls)
  features = stage_features(run.model, stages)
  maps_of = lambda v, x: features(v, x)[1]
  map_shapes = jax.eval_shape(
      maps_of, variables, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  model_name = run.config.model
  written = []

  kernel, conv_path = first_conv_kernel(variables, calls)
  written.append(plotting.save(plotting.filters_figure(
      kernel, f'{model_name} step {step}: {conv_path} filters'),
      os.path.join(out, 'filters.png'), dpi))

  @jax.jit
  def forward(v, x):  # one compilation for the top 9 and the occlusions
    probs, maps = features(v, x)
    return probs, {s: spatial_max(m) for s, m in maps.items()}

  picks, probs = _top_patches(forward, variables, pixels, normalise, stages,
                              map_shapes, units, batch)
  wanted = sorted({(s, y, x, c) for s in stages for c, tops in picks[s]
                   for _, y, x, _ in tops})
  boxes = dict(zip(wanted, receptive_fields(maps_of, variables, wanted, shape,
                                            chunk=batch)))
  for s in stages:
    rows, sides = [], set()
    for c, tops in picks[s]:
      row = []
      for i, y, x, value in tops:
        y0, y1, x0, x1 = boxes[(s, y, x, c)]
        sides.add((y1 - y0, x1 - x0))
        row.append((pixels[i, y0:y1, x0:x1], f'ch{c} {value:.2f}'))
      rows.append(row)
    most = max(sides)
    title = (f'{model_name} step {step}, {s}: top {len(rows[0])} of '
             f'{len(pixels)} {split} images per channel, cropped to the '
             f'receptive field (up to {most[0]}x{most[1]})')
    written.append(plotting.save(
        top9_figure(rows, title),
        os.path.join(out, f"top9_{s.replace('/', '_')}.png"), dpi))

  if occlusion:
    names = _class_names(run.config)
    patch, stride = max(1, round(shape[0] / 4)), max(1, round(shape[0] / 8))
    prob_fn = lambda x: forward(variables, x)[0]
    items = []
    p_true = probs[np.arange(len(probs)), np.asarray(labels[:len(probs)])]
    for i in confident_examples(p_true, labels, occlusion):
      image, label = normalise(pixels[i]), int(labels[i])
      p0 = float(p_true[i])
      prob, ys, xs = occlusion_map(prob_fn, image, label, patch, stride,
                                   batch=batch)
      # The first of a WordNet class's synonyms ('monarch, monarch butterfly,
      # ...') fits a title.
      cls = (names[label].split(',')[0] if names and label < len(names)
             else f'class {label}')
      items.append((pixels[i], prob, ys, xs, f'{cls}: p={p0:.2f} unoccluded'))
    written.append(plotting.save(occlusion_figure(items, patch),
                                 os.path.join(out, 'occlusion.png'), dpi))
  return written
