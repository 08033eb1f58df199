r"""Tiny ImageNet classification: 200 ImageNet classes at 64x64.

The argument is `MODEL[,PRESET]`:
  MODEL   resnet18_64 (ResNet-18, stem one 3x3 conv of stride 1 and no max
          pool, so stage 4 sees 8x8; 11,271,432 parameters), plain18_64 (its
          plain twin: the same layers without shortcuts) or vgg_64 (VGG-B's
          first four stages with BN after every conv, 4x4x512 into two FC
          layers of 1024; 14,331,528 parameters). Any registry model that
          takes 64x64 input works. det_trunk (the detectors' trunk and FC
          layers, `cnn.models.detnet`) trains on the images resized to
          32x32, the size of R-CNN's warps and of Fast R-CNN's 4x4 RoI grid,
          so a detector starts from it (`configs/detection.py`, init_from).
  (none)  the full recipe, for a GPU: batch 256, 60 epochs, lr 0.2 (0.1 per
          128 images, Goyal et al. 2017) with a 2-epoch linear warm-up and a
          cosine decay, Nesterov momentum, weight decay 5e-4 on kernels only,
          label smoothing 0.1, random resized crops (25-100 % of the image,
          aspect 3/4-4/3) and flips made on the device. Not measured here.
  cpu     the same recipe at a 2-core CPU's budget (measured on two
          2-core CPUs, partly shared: resnet18_64 62.8 min, plain18_64
          42.0 min, vgg_64 90.9 min): the nets at a quarter of their width (ResNets:
          16-32-64-128 and the 3x3 stem at stride 2, so stage 1 runs at
          32x32; VGG: widths x 0.25, FC 256, no dropout), batch 128 and 12
          epochs (4,692 steps). Measured top-1 / top-5 error: resnet18_64
          68.54 / 41.76 %, plain18_64 74.57 / 47.82 %, vgg_64 68.81 / 41.88 %
          (results/tiny_imagenet/).
  local   a few steps of the cpu preset on a tiny subset (tests).

Data: the prepared `tiny_imagenet` in data_dir ($TFDS_DATA_DIR, else
../shared/data/tfds: configs/common.py), 250 training images per class, the
10,000 validation images held out as `test`; the boxes come along for
localization. It sits in memory as uint8 (614 MB), so the batch of step s is
a function of (seed, s) and a resumed run sees the same batches. With the
official zip (500 per class) build the same dataset with
`cnn/data/tiny_imagenet_builder.py` and point data_dir at it.

  python -m experiments.train --config=configs/tiny_imagenet.py:resnet18_64,cpu \
    --workdir=runs/tin_r18_cpu

Held-out metrics: top-1 `error` and `top5_error` on `test` (the validation
split); the best checkpoint is the lowest top-1 error.
"""
from ml_collections import config_dict

from configs import common

PRESETS = ('', 'cpu', 'local')
ARG = common.Grammar(
    words=(common.Word('model', default='resnet18_64'),
           common.Word('preset', PRESETS[1:])),
    default='resnet18_64,cpu')
TRAIN_IMAGES = 50_000  # the prepared copy: 250 per class


def _narrow(model: str) -> dict:
  """The cpu preset's quarter-width version of a registry model."""
  if model.startswith(('resnet', 'plain')):
    return {'num_filters': 16, 'stem_strides': 2}
  if model.startswith('vgg'):
    # No dropout: 12 epochs at quarter width underfit, and with VGG's 0.5
    # after fc6 and fc7 the net had barely left chance after 2 epochs
    # (98.91 % top-1 error, plain18_64 94.19 %; results/tiny_imagenet/).
    return {'width_multiplier': 0.25, 'fc_width': 256, 'dropout_rate': 0.0}
  return {}  # det_trunk: already the detectors' size


def get_config(arg: str = 'resnet18_64,cpu') -> config_dict.ConfigDict:
  """`MODEL[,cpu|local]` (see the module docstring)."""
  a = ARG.parse(arg)
  model, preset = a['model'], a['preset']
  full = not preset
  batch = 256 if full else 128
  epoch = -(-TRAIN_IMAGES // batch)  # 391 steps of 128, 196 of 256
  epochs = 60 if full else 12
  c = common.classification(
      model, 'tiny_imagenet', common.data_dir(), batch_size=batch,
      num_train_steps=epochs * epoch, learning_rate=0.1 * batch / 128,
      weight_decay=5e-4, lr_schedule='cosine', warmup='linear',
      warmup_steps=2 * epoch, warmup_lr=0.01, decay_bn_and_bias=False,
      plateau_monitor='test', eval_every_steps=epoch,
      checkpoint_every_steps=epoch, log_every_steps=23)
  c.model_kwargs = config_dict.ConfigDict(_narrow(model) if preset else {})
  c.test_split = 'validation'
  c.augment = 'rrc_flip'
  c.pad = 0
  c.mean_subtraction = 'per_channel'
  c.label_smoothing = 0.1
  # det_trunk: resized on the device to the detectors' 32x32 (the FC layers
  # then see the 4x4 map of a RoI); 0 keeps the 64x64 images.
  c.image_size = 32 if model == 'det_trunk' else 0
  c.nesterov = True
  if preset == 'local':
    c.train_split, c.test_split = 'train[:512]', 'validation[:250]'
    c.num_train_steps, c.warmup_steps = 4, 2
    c.batch_size, c.eval_batch_size = 16, 250
    c.eval_every_steps = c.checkpoint_every_steps = 2
    c.log_every_steps = 1
  return c
