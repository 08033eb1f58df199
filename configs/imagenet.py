r"""ImageNet (ILSVRC-2012) with the lecture's ResNet recipe.

Batch 256, SGD momentum 0.9, lr 0.1 divided by 10 when the held-out error
plateaus, weight decay a field (He et al.: 1e-4; the lecture slide: 1e-5), no
dropout; random-resized 224 crops and flips streamed through tf.data.

  python -m experiments.train --config=configs/imagenet.py:resnet50 \
    --workdir=runs/in50 --config.data_dir=/data/tfds

TFDS `imagenet2012` needs the manual download (`tfds build imagenet2012
--manual_dir=DIR`). Not run here. The paper's figures for ResNet-50 after
up to 600k iterations: top-1 error 22.85 % with 10-crop testing (He et al.
2015, Table 3); 24.7 % with a single centre 224 crop, as the authors'
released model reads (github.com/KaimingHe/deep-residual-networks).
Far beyond a CPU; this config is for GPU/TPU hosts.
"""
from configs import cifar10
from configs import common

ARG = common.Grammar(words=(common.Word('model', default='resnet50'),),
                     default='resnet50')


def get_config(arg: str = 'resnet50'):
  """`MODEL` (a registry model for 224x224 images)."""
  c = cifar10.get_config(ARG.parse(arg)['model'])
  c.dataset = 'imagenet2012'
  c.test_split = 'validation'
  c.in_memory = 'no'  # 1.28M images: streamed through tf.data.
  c.image_size = 224
  c.augment = 'none'  # Crops and flips happen in the tf.data pipeline.
  c.batch_size = 256
  c.eval_batch_size = 250
  c.num_train_steps = 600_000
  c.learning_rate = 0.1
  c.lr_schedule = 'plateau'
  # ImageNet has no labelled test set: the validation split is what the
  # paper's plateau rule watches.
  c.plateau.monitor = 'test'
  c.plateau.patience = 2
  c.plateau.threshold = 1e-3
  c.plateau.min_lr = 1e-5
  c.weight_decay = 1e-4  # The lecture slide: 1e-5.
  c.eval_every_steps = 5000  # ~1 epoch of 1.28M images at batch 256.
  c.checkpoint_every_steps = 5000
  c.log_every_steps = 100
  return c
