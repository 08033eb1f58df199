"""Region-based detection: the task of `configs/detection.py`.

The lecture's path to detecting an unknown number of objects, as three
detectors that share every part except where the regions are cut out:

  * R-CNN (Girshick et al. 2014): selective-search proposals, each warped to
    a fixed `crop` x `crop` image (`cnn.ops.roi.crop_and_resize`) and run
    through the whole CNN; one conv pass per proposal.
  * Fast R-CNN (Girshick 2015): one conv pass over the image, each proposal
    cut from the last feature map by RoI max pooling (`cnn.ops.roi`) to the
    same `roi_size` x `roi_size` grid that the R-CNN crop produces, so the
    head (FC layers, class scores, class-specific box deltas) is the same.
  * Faster R-CNN (Ren et al. 2015): a Region Proposal Network on the last
    feature map (objectness + box deltas per anchor) replaces selective
    search; its proposals feed the Fast R-CNN head. Approximate joint
    training: one loss, the proposals are a stop_gradient input to the head.

Trunk: `widths` stages of `convs_per_stage` 3x3 conv + BatchNorm + ReLU and a
2x2 max-pool, so the feature stride is 2 ** len(widths); the R-CNN crop side
is roi_size * stride, which makes R-CNN's trunk output on a crop exactly the
RoI-pooled grid of Fast R-CNN.

Training samples `rois_per_image` regions per image (Fast R-CNN section 2.3):
up to `fg_fraction` foreground (IoU >= fg_iou with a ground-truth box; the
ground-truth boxes themselves are candidates), the rest background (IoU in
[bg_iou, fg_iou)); loss = cross-entropy over K + 1 classes + smooth-L1 on the
normalised deltas of the true class. Everything, including RoI sampling and
the RPN's NMS, runs inside one jitted step with static shapes.

Test time per image is measured as it would be served: proposals computed on
the image (selective search for R-CNN and Fast R-CNN, the RPN for Faster),
the network, then per-class NMS; mAP@0.5 by `cnn.tasks.detection.metrics` (VOC).

Held-out metric: `map` (mAP@0.5, VOC all-point AP; higher is better) on
`val` (canvases drawn from the `val_examples` source images that follow the
first `train_examples` of the training split, so no object is shared with
the training canvases) and on `test`.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from cnn.data import input_pipeline
from cnn.data import synthetic_detection as synth
from cnn.errors import CheckpointError, ConfigError
from cnn.tasks import base
from cnn.tasks.detection import inference
from cnn.tasks.detection import proposals as proposals_lib
from cnn.tasks.detection.losses import make_loss_fn
from cnn.tasks.detection.model import KINDS, make_model
from cnn.training import checkpointing
from cnn.training import transfer

PROPOSAL_METHODS = ('selective_search_fast', 'selective_search_quality',
                    'sliding', 'random')
# Besides these, any TFDS dataset with objects/bbox + objects/label
# (raccoon, coco128, coco/2017): real photographs, letterboxed.
DATASETS = ('synthetic', 'voc')


def photos(config, split: str, limit: int) -> synth.DetectionData:
  """Real photographs as canvas x canvas letterboxes.

  Each photo is resized (aspect kept) so its longer side is the canvas and
  placed at the top-left of a black canvas x canvas image; its boxes are
  scaled with it (`cnn.data.objects`). A photo without boxes is a negative
  example (all objects masked). Objects beyond `max_objects_per_photo` of
  a photo are dropped (0: keep all).
  """
  from cnn.data import objects  # pylint: disable=g-import-not-at-top
  side = int(config.canvas)
  data = objects.load_objects(config.dataset, split, config.data_dir,
                              shorter_side=side, max_side=side,
                              limit=limit or None)
  cap = int(config.max_objects_per_photo)
  b = data.batch(np.arange(len(data.images)), shape=(side, side),
                 multiple=1, max_boxes=cap or max(data.max_boxes, 1))
  classes = np.where(b['gt_valid'], b['gt_classes'], -1).astype(np.int32)
  return synth.DetectionData(
      b['images'], np.where(b['gt_valid'][..., None], b['gt_boxes'], 0.0
                            ).astype(np.float32), classes,
      b['gt_valid'].sum(axis=1).astype(np.int32), None,
      b['gt_difficult'] & b['gt_valid'])


def canvases(config, split: str, limit: int) -> synth.DetectionData:
  """The config's images of one split: synthetic canvases (one per source
  image of the first `limit` (0: all) images of the split), VOC 2007
  images resized to the canvas, or real photographs letterboxed into it."""
  if config.dataset == 'voc':
    return synth.load_voc(split, config.data_dir, config.canvas,
                          limit or None)
  if config.dataset != 'synthetic':
    return photos(config, split, limit)
  return synth.load(
      config.source, split, config.data_dir, limit=limit or None,
      canvas=config.canvas, seed=config.seed, min_objects=config.min_objects,
      max_objects=config.max_objects, min_size=config.min_size,
      max_size=config.max_size, max_iou=config.max_iou,
      background=config.background).materialize()


def num_classes(config) -> int:
  if config.dataset == 'voc':
    return 20
  if config.dataset != 'synthetic':
    from cnn.data import objects  # pylint: disable=g-import-not-at-top
    return len(objects.class_names(config.dataset, config.data_dir))
  return input_pipeline.dataset_info(config.source, config.data_dir)[0]


class TrainCanvases:
  """Training canvases and, for R-CNN / Fast R-CNN, the cached
  selective-search proposals of each; `batch(indices)` for the loop."""

  def __init__(self, config, workdir: str, images: synth.DetectionData):
    self.data = images
    self.proposals = self.counts = None
    if config.kind != 'faster_rcnn':
      p = config.proposals
      cache_dir = p.cache_dir or os.path.join(workdir, 'proposals')
      os.makedirs(cache_dir, exist_ok=True)
      name = config.source if config.dataset == 'synthetic' else (
          f'{config.dataset}{config.canvas}'.replace('/', '_'))
      cache = os.path.join(
          cache_dir, f'{p.method}_{name}_{config.train_split}_'
          f'{len(images)}_{p.train_per_image}_s{config.seed}.npz')
      if not os.path.exists(cache):
        print(f'proposals: {p.method} on {len(images)} training canvases '
              f'(cached in {cache})', flush=True)
      self.proposals, self.counts = proposals_lib.compute(
          images.images, p.method, int(p.train_per_image),
          seed=config.seed, processes=int(p.processes), cache=cache)

  def __len__(self) -> int:
    return len(self.data)

  def batch(self, indices) -> dict:
    t = self.data
    classes = t.classes[indices]
    if t.difficult is not None:  # not trained on, as in Fast R-CNN
      classes = np.where(t.difficult[indices], -1, classes)
    out = {'images': t.images[indices], 'gt_boxes': t.boxes[indices],
           'gt_classes': classes}
    if self.proposals is not None:
      out['proposals'] = self.proposals[indices]
      p = self.proposals.shape[1]
      out['proposal_valid'] = np.arange(p)[None] < self.counts[indices][:, None]
    return out


class DetectionData:
  """Train canvases (with proposals), `val` and `test` canvases."""

  def __init__(self, config, workdir: str, train: bool):
    self.num_classes = num_classes(config)
    self.train = None
    if train:
      self.train = TrainCanvases(
          config, workdir,
          canvases(config, config.train_split, config.train_examples))
    self.evals = {}
    n_val, n_train = int(config.val_examples), int(config.train_examples)
    if n_val and config.dataset != 'voc':
      if not n_train or '[' in config.train_split:
        raise ConfigError(
            f'val_examples={n_val} canvases are drawn from the source images '
            f"right after the first train_examples of '{config.train_split}'"
            ': set train_examples > 0 on a whole split, or val_examples=0')
      # The next n_val source images: disjoint from the training canvases'.
      self.evals['val'] = canvases(
          config, f'{config.train_split}[{n_train}:{n_train + n_val}]', 0)
    self.evals['test'] = canvases(config, config.test_split,
                                  config.test_examples)


PRETRAINED_MODEL = 'det_trunk'


def load_pretrained(spec: str, params, batch_stats):
  """The trunk and FC layers of a `det_trunk` classification run.

  The classifier's `trunk/*` (weights and BatchNorm statistics) and `fc/fc*`
  go to the detector's `trunk/*` and `head/fc/*`; its class `head` is left
  out (the detector has K + 1 classes and box deltas), as is the RPN.

  Returns:
    (params, batch_stats, message), the fresh trees with those parts
    replaced.

  Raises:
    CheckpointError: no such run, another model, or a name or shape mismatch
      (all listed; nothing is loaded).
  """
  directory, which = transfer.parse_init_from(spec)
  ckpt = checkpointing.Checkpointer(directory, read_only=True,
                                    init_from=spec)
  try:
    step = ckpt.resolve(which)
    model = ckpt.read_meta(step).get('model')
    if model != PRETRAINED_MODEL:
      raise CheckpointError(
          f"init_from='{spec}' holds a '{model}' checkpoint; detectors start "
          f"from a '{PRETRAINED_MODEL}' classifier: python -m "
          'experiments.train --config=configs/cifar10.py:det_trunk ...')
    saved = transfer._restore_raw(ckpt, step)  # pylint: disable=protected-access
  finally:
    ckpt.close()
  prefix = {'trunk': '', 'fc': 'head/'}
  got_p = {prefix[p.split('/')[0]] + p: v
           for p, v in transfer.flat_paths(saved['params']).items()
           if p.split('/')[0] in prefix}
  got_s = {p: v for p, v in transfer.flat_paths(saved['batch_stats']).items()
           if p.startswith('trunk/')}
  want_p = {p: v for p, v in transfer.flat_paths(params).items()
            if p.startswith('trunk/') or p.startswith('head/fc/')}
  want_s = transfer.flat_paths(batch_stats)
  lines = (transfer.mismatches(got_p, want_p, 'params')
           + transfer.mismatches(got_s, want_s, 'batch_stats'))
  if lines:
    raise CheckpointError(
        f"init_from='{spec}' (step {step}) does not fit this detector: "
        f'{len(lines)} mismatches, nothing loaded; pretrain det_trunk with '
        'the same widths\n  ' + '\n  '.join(lines))
  take = lambda got: lambda p, fresh: (
      np.asarray(got[p], np.asarray(fresh).dtype) if p in got else fresh)
  params = transfer._map_paths(take(got_p), params)  # pylint: disable=protected-access
  stats = transfer._map_paths(take(got_s), batch_stats)  # pylint: disable=protected-access
  message = (f'init_from: loaded {len(got_p)} parameter arrays and '
             f'{len(got_s)} BatchNorm statistics (trunk, fc layers) from step '
             f'{step} of {directory}')
  return params, stats, message


class DetectionTask(base.Task):
  """Boxes and classes of every object; held-out metric: mAP@0.5."""
  metric = 'map'
  metric_mode = 'max'
  eval_keys = ('map', 'proposal_recall', 'seconds_per_image')
  # XLA's defaults: this step was measured (and its tables made) with the
  # fusion pass on; the CPU option that turns it off was measured on ResNets.
  compiler_options = None

  def __init__(self, config):
    super().__init__(config)
    self.spec = None

  @property
  def log_keys(self):
    keys = ('loss', 'cls_loss', 'box_loss', 'roi_accuracy')
    return keys + (('rpn_cls_loss',) if self.config.kind == 'faster_rcnn'
                   else ())

  def validate(self) -> None:
    c = self.config
    if c.kind not in KINDS:
      raise base.unknown_value('kind', c.kind, KINDS)
    if c.dataset not in DATASETS:
      from cnn.data import objects  # pylint: disable=g-import-not-at-top
      # A missing dataset or one without objects: one line from the reader.
      objects.class_names(c.dataset, c.data_dir)
    if c.proposals.method not in PROPOSAL_METHODS:
      raise base.unknown_value('proposals.method', c.proposals.method,
                               PROPOSAL_METHODS)
    t = c.roi
    if not 0 < t.fg_fraction <= 1:
      raise ConfigError(f'roi.fg_fraction={t.fg_fraction} must be in (0, 1]')
    if not 0 <= t.bg_iou < t.fg_iou <= 1:
      raise ConfigError(f'need 0 <= roi.bg_iou ({t.bg_iou}) < roi.fg_iou '
                        f'({t.fg_iou}) <= 1')

  def load_data(self, workdir: str, train: bool = True):
    return DetectionData(self.config, workdir, train)

  def make_model(self, data):
    model, self.spec = make_model(self.config, data.num_classes)
    return model

  def init_variables(self, model, data, rng) -> dict:
    del data
    side = self.spec.crop if self.spec.kind == 'rcnn' else self.spec.canvas
    x = jnp.zeros((1, side, side, 3), jnp.float32)
    return jax.jit(lambda r: model.init(r, x))(rng)

  def data_name(self) -> str:
    return base.canvases_name(self.config)

  def meta(self) -> dict:
    c = self.config
    dataset = {'voc': 'voc/2007',
               'synthetic': f'synthetic_detection/{c.source}'}.get(
                   c.dataset, f'{c.dataset}/letterbox{c.canvas}')
    return {'model': f'detector/{c.kind}', 'dataset': dataset}

  def load_init_from(self, spec: str, params, batch_stats):
    return load_pretrained(spec, params, batch_stats)

  def loss_fn(self, model, data):
    return make_loss_fn(model, self.config, self.spec)

  def evaluate(self, model, variables, data, split, *, final, shard) -> dict:
    del final, shard  # One image at a time, as served.
    return inference.evaluate(model, variables, data.evals[split],
                              self.config, self.spec)

  def picture(self, model, variables, data, path: str) -> None:
    from cnn.tasks.detection import pictures  # pylint: disable=g-import-not-at-top
    pictures.draw(self.config, model, variables, self.spec, data.evals['test'],
                path)
