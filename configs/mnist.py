r"""MNIST (or Fashion-MNIST) with LeNet-5: a quick sanity run.

  python -m experiments.train --config=configs/mnist.py:lenet5 \
    --workdir=runs/mnist [--config.dataset=fashion_mnist]

Needs the TFDS `mnist` data (downloaded on first use where there is network,
or a prepared copy via --config.data_dir). Expected: about 0.9 % test error
after 3 epochs (1,400 steps of 128), a few minutes on a 2-core CPU.
"""
from configs import cifar10


def get_config(arg: str = 'lenet5'):
  c = cifar10.get_config(arg or 'lenet5')
  c.dataset = 'mnist'
  c.augment = 'none'  # Flipping digits would change their meaning.
  c.mean_subtraction = 'per_channel'
  c.num_train_steps = 1400
  c.learning_rate = 0.05
  c.lr_schedule = 'cosine'
  c.weight_decay = 5e-4
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  c.log_every_steps = 100
  return c
