r"""R-CNN, Fast R-CNN and Faster R-CNN on synthetic multi-object canvases.

The argument is the detector, optionally followed by `,local` for a few
steps on a few canvases (a quick check):

  python -m experiments.train --config=configs/detection.py:rcnn \
    --workdir=runs/det_rcnn
  python -m experiments.train --config=configs/detection.py:fast_rcnn \
    --workdir=runs/det_fast_rcnn
  python -m experiments.train --config=configs/detection.py:faster_rcnn \
    --workdir=runs/det_faster_rcnn
  python -m experiments.detection_table --workdirs=runs/det_rcnn,\
runs/det_fast_rcnn,runs/det_faster_rcnn --picture=runs/detections.png

Data: 1-4 CIFAR-10 images (24-64 px, aspect 3:4..4:3, pairwise IoU <= 0.1)
pasted on 128x128 noise canvases (`cnn.data.synthetic_detection`), 10 classes.
The three share the trunk (3 stages of 2 x conv3x3-BN-ReLU + max-pool, 16/
32/64 channels, stride 8) and the head (2 FC-256, 11-way softmax, class-
specific box deltas): R-CNN warps each proposal to 32x32 pixels, Fast R-CNN
RoI-pools it to the same 4x4 grid of the stride-8 feature map. R-CNN and
Fast R-CNN train and test on selective-search proposals (OpenCV, fast mode;
the training canvases' proposals are computed once and cached in
runs/detection_cache, shared by the two); Faster R-CNN's RPN has 9 anchors
per position (sizes 24/40/64, ratios 1:2, 1:1, 2:1).

`KIND,raccoon` detects raccoons in real photographs (TFDS `raccoon`, 160
train / 40 test photos letterboxed to 256 px, ~2,000 selective-search
proposals per image); `KIND,coco128` trains on the first 96 of coco128's
128 photos (80 COCO classes) and tests on the last 32, for pictures and an
mAP on real COCO scenes (far too few photos to learn 80 classes);
`--config.dataset=NAME` any TFDS dataset with objects/bbox + objects/label
the same way (coco/2017).

The study of the three detectors from scratch and from a pretrained trunk,
two seeds each (12 members; `sweep` below), on raccoons:

  python -m experiments.train --config=configs/tiny_imagenet.py:det_trunk,cpu \
    --workdir=runs/tin_det_trunk
  python -m experiments.sweep --config=configs/detection.py:fast_rcnn,raccoon \
    --workdir=runs/raccoon_study

`--config.dataset=voc --config.data_dir=DIR --config.train_split=
train+validation` trains on Pascal VOC 2007 (20 classes, "difficult" boxes
ignored) where TFDS `voc/2007` is prepared under DIR (it is not here).

Expected (measured on a 2-core CPU, 2,000 steps, 14-32 min each:
results/detection/README.md, table.md and table_pretrained.md): mAP@0.5
0.472 / 0.415 / 0.379 (R-CNN / Fast / Faster) from scratch, 0.719 / 0.649 /
0.659 with --config.init_from=runs/det_trunk (a det_trunk CIFAR
classifier, see below), on the 500 test canvases; 112 / 85 / 9 ms per test
image side by side (selective search is ~74 ms of the first two).
"""
from ml_collections import config_dict

from cnn.tasks.detection.inference import NMS_CANDIDATES
from cnn.tasks.detection.model import KINDS
from configs import common

# Presets of real photographs (`KIND,raccoon`, `KIND,coco128`).
PHOTOS = ('raccoon', 'coco128')
ARG = common.Grammar(
    words=(common.Word('kind', KINDS, default='fast_rcnn'),
           common.Word('photos', PHOTOS), common.Word('local', ('local',))),
    default='fast_rcnn')


def get_config(arg: str = 'fast_rcnn') -> config_dict.ConfigDict:
  """`KIND[,raccoon|coco128][,local]` (see the module docstring)."""
  a = ARG.parse(arg)
  kind, photo, local = a['kind'], a['photos'], bool(a['local'])
  c = config_dict.ConfigDict()
  c.task = 'detection'
  c.kind = kind

  c.dataset = 'synthetic'  # or 'voc': TFDS voc/2007 resized to the canvas
  c.source = 'cifar10_jpeg'
  c.data_dir = common.data_dir_field(common.data_dir())
  c.train_split = 'train'
  c.test_split = 'test'
  c.train_examples = 5000  # canvases
  c.test_examples = 500
  # Held out (mAP@0.5 on `val`, the checkpoint-picking split): canvases of
  # the val_examples source images after the first train_examples (none
  # for voc).
  c.val_examples = 100
  c.canvas = 128
  c.min_objects, c.max_objects = 1, 4
  c.min_size, c.max_size = 24, 64
  c.max_iou = 0.1
  c.background = 'noise'
  c.flip = True
  # Photographs (raccoon, coco128, voc): boxes kept per photo, 0: every box.
  c.max_objects_per_photo = 0

  c.detector = config_dict.ConfigDict()
  c.detector.widths = (16, 32, 64)
  c.detector.convs_per_stage = 2
  c.detector.head_widths = (256, 256)
  c.detector.roi_size = 4  # R-CNN crop = roi_size * stride = 32 px
  c.detector.anchor_sizes = (24, 40, 64)
  c.detector.anchor_ratios = (0.5, 1.0, 2.0)
  c.detector.rpn_width = 64

  c.proposals = config_dict.ConfigDict()
  c.proposals.method = 'selective_search_fast'
  c.proposals.train_per_image = 300
  c.proposals.test_per_image = 300
  c.proposals.cache_dir = 'runs/detection_cache'
  c.proposals.processes = 2

  c.roi = config_dict.ConfigDict()  # Fast R-CNN's RoI sampling
  c.roi.rois_per_image = 32
  c.roi.fg_fraction = 0.25
  c.roi.fg_iou = 0.5
  # Background regions: IoU in [bg_iou, fg_iou). The papers use 0.1 (a
  # crude hard-negative mining on VOC); here pure-background proposals are
  # most of what the detector sees at test time, so it learns them too.
  c.roi.bg_iou = 0.0
  c.roi.box_weight = 1.0

  c.rpn = config_dict.ConfigDict()
  c.rpn.anchors_per_image = 128
  c.rpn.pos_fraction = 0.5
  c.rpn.pos_iou = 0.7
  c.rpn.neg_iou = 0.3
  c.rpn.box_weight = 1.0
  c.rpn.pre_nms_train = 600
  c.rpn.post_nms_train = 128
  c.rpn.pre_nms_test = 600
  c.rpn.post_nms_test = 100
  c.rpn.nms_iou = 0.7
  c.rpn.min_size = 4.0

  c.inference = config_dict.ConfigDict()  # scores, per-class NMS
  c.inference.score_threshold = 0.05
  c.inference.nms_iou = 0.3
  c.inference.per_class = 20
  c.inference.max_detections = 50
  c.inference.rcnn_chunk = 64  # R-CNN: proposals per network call
  # Per-class NMS on each class's best 256 boxes when they hold all boxes
  # above score_threshold (the same detections; 0: always on all boxes).
  c.inference.nms_candidates = NMS_CANDIDATES

  # init_from: a `det_trunk` CIFAR classification run whose trunk and FC
  # layers the detector starts from (the lecture's "pretrain on
  # classification"):
  #   python -m experiments.train --config=configs/cifar10.py:det_trunk \
  #     --workdir=runs/det_trunk --config.num_train_steps=4000
  # or, for the photographs, on Tiny ImageNet resized to 32x32:
  #   python -m experiments.train --config=configs/tiny_imagenet.py:det_trunk,cpu \
  #     --workdir=runs/tin_det_trunk
  common.add_training_fields(
      c, batch_size=8, num_train_steps=2000, learning_rate=0.02,
      weight_decay=5e-4, lr_schedule='cosine', warmup_steps=200,
      warmup='linear', decay_bn_and_bias=False, eval_every_steps=1000,
      checkpoint_every_steps=500, log_every_steps=50)
  if photo:
    # Real photographs (coco128 changes some below): the 160 / 40 raccoon
    # photos, letterboxed to 256 px (longer side 256, aspect kept), one
    # class; the last 20 training photos are the held-out `val`. About
    # 2,000 selective-search proposals per test image, as in the R-CNN
    # paper; anchors for objects that fill much of the photo.
    c.dataset, c.source = 'raccoon', ''
    c.canvas = 256
    c.train_examples, c.val_examples, c.test_examples = 140, 20, 0
    c.detector.anchor_sizes = (48, 96, 192)
    c.proposals.train_per_image = 2000
    c.proposals.test_per_image = 2000
    c.proposals.cache_dir = ''  # inside the workdir
    c.num_train_steps = 1000
    c.warmup_steps = 100
    c.eval_every_steps = c.checkpoint_every_steps = 250
  if photo == 'coco128':
    # COCO's 80 classes in 128 crowded photos (one `validation` split): the
    # first 96 train, the last 32 test, no val. Far too few to learn 80
    # classes; this gives the study's pictures and an honest mAP on real
    # COCO photos, not a COCO detector.
    c.dataset = 'coco128'
    c.train_split, c.test_split = 'validation', 'validation[96:]'
    c.train_examples, c.val_examples, c.test_examples = 96, 0, 0
    c.detector.anchor_sizes = (24, 64, 160)
  if local and photo:
    c.train_examples, c.val_examples, c.test_examples = 8, 2, 2
    c.num_train_steps, c.batch_size, c.warmup_steps = 4, 2, 0
    c.log_every_steps, c.eval_every_steps = 2, 4
    c.checkpoint_every_steps = 2
    c.proposals.train_per_image = c.proposals.test_per_image = 200
  elif local:
    c.train_examples = 64
    c.test_examples = 8
    c.val_examples = 4
    c.num_train_steps = 6
    c.batch_size = 4
    c.warmup_steps = 0
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.checkpoint_every_steps = 2
    c.proposals.cache_dir = ''  # inside the workdir
    c.proposals.train_per_image = 100
    c.proposals.test_per_image = 100
  return c


# Where the study's pretrained members start from: the det_trunk runs of
# the commands in the docstring (Tiny ImageNet for photographs, CIFAR-10
# for the synthetic canvases).
PRETRAINED = {'photos': 'runs/tin_det_trunk', '': 'runs/det_trunk'}


def sweep(arg: str = 'fast_rcnn,raccoon') -> list[tuple[str, dict]]:
  """Every detector x (from scratch, from the pretrained det_trunk) x seeds
  0 and 1, on the data of `arg` (its detector is replaced by each member's;
  `,raccoon` or the synthetic canvases). The members share one cache of
  training proposals per seed (the cache key names the dataset, split,
  count, proposals per image and seed), so selective search runs once per
  seed, not once per member."""
  c = get_config(arg)  # the argument's one-line error, if any
  source = PRETRAINED['' if c.dataset == 'synthetic' else 'photos']
  members = []
  for kind in KINDS:
    for init in ('scratch', 'pretrained'):
      for seed in (0, 1):
        members.append((f'{kind}_{init}_s{seed}', {
            'kind': kind, 'seed': seed,
            'init_from': source if init == 'pretrained' else '',
            'proposals.cache_dir': 'runs/detection_cache'}))
  return members
