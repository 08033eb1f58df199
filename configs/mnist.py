r"""MNIST (or Fashion-MNIST) with LeNet-5: a quick sanity run.

  python -m experiments.train --config=configs/mnist.py:lenet5 \
    --workdir=runs/mnist [--config.dataset=fashion_mnist]

Needs the TFDS `mnist` data in data_dir ($TFDS_DATA_DIR, else the prepared
copy in ../shared/data/tfds: configs/common.py), downloaded there on first
use where there is network. Expected: 1.05 ± 0.04 % test error after 3
epochs (1,400 steps of 128; measured, three seeds, mean ± std:
results/mnist_lenet5/README.md), 3 min 35 s for the three runs on a 2-core
CPU; LeCun et al. 1998 report 0.95 % after 20 epochs. The three seeds:

  python -m experiments.sweep --config=configs/mnist.py:lenet5 \
    --workdir=runs/mnist_lenet5
"""
from cnn.errors import ConfigError
from configs import cifar10
from configs import common

ARG = common.Grammar(words=(common.Word('model', default='lenet5'),),
                     options={'seeds': 3}, default='lenet5')


def _parse(arg: str | None) -> tuple[str, int]:
  a = ARG.parse(arg)
  if a['seeds'] < 1:
    raise ConfigError(f"seeds={a['seeds']} must be at least 1: write "
                      f'{ARG.usage()}, e.g. lenet5,seeds=3')
  return a['model'], a['seeds']


def get_config(arg: str = 'lenet5'):
  """`MODEL[,seeds=N]`. Held-out metric: top-1 `error` on `test` (10,000
  digits)."""
  c = cifar10.get_config(_parse(arg)[0])
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


def sweep(arg: str = 'lenet5') -> list[tuple[str, dict]]:
  """Seeds 0..N-1 of one model (`MODEL[,seeds=N]`, 3 by default)."""
  model, seeds = _parse(arg)
  return [(f'{model}_s{seed}', {'seed': seed}) for seed in range(seeds)]
