r"""One net, several learning-rate schedules: fixed steps vs reduce-on-plateau.

The lecture's "divide the learning rate by 10 when the error plateaus" against
He et al.'s fixed milestones (1/2 and 3/4 of training), all on ResNet-20 with
the section 4.2 recipe otherwise. Every member holds out the last 5k training
images (the paper's 45k/5k split) so that the plateau members watch a
validation error, never the test set; the step member uses the same split so
that all train on the same 45k images. Members:

  step                  lr 0.1, /10 at 1/2 and 3/4 of training
  plateau_f{F}_p{P}     lr 0.1, times F after P evaluations without a
                        0.1 %-point gain in validation error (PyTorch's
                        ReduceLROnPlateau, min lr 1e-4)

for F in the factors and P in the patiences of the preset. The argument is
`PRESET[,seeds=N]`:

  paper  64k iterations, eval every 1k; factors 0.1/0.5, patiences 3/6.
  cpu    1200 iterations, eval every 100; factors 0.1/0.5, patiences 1/2.
         Not run here yet; about 1-2 hours on 2 idle CPU cores by
         estimate (5 members of ResNet-20, 1,200 steps each at the
         170-224 training images/s measured for ResNet-20 in
         results/resnet20_fast/ and results/speed/, plus evaluations).
  local  ResNet-8, 4 steps of batch 8, for tests.

  python -m experiments.sweep --config=configs/lr_schedules.py:cpu \
    --workdir=runs/lr_schedules_cpu --config.dataset=cifar10_jpeg \
    --config.data_dir=../shared/data/tfds
  python -m experiments.plot --workdir=runs/lr_schedules_cpu

`lr_<member>.png` then shows where each plateau member cut its rate.
"""
from ml_collections import config_dict

from cnn.tools import sweeps
from configs import cifar10
from configs import common

PRESETS = {
    'paper': dict(steps=64_000, eval_every=1_000, factors=(0.1, 0.5),
                  patiences=(3, 6)),
    'cpu': dict(steps=1_200, eval_every=100, factors=(0.1, 0.5),
                patiences=(1, 2)),
    'local': dict(steps=4, eval_every=1, factors=(0.1,), patiences=(0, 1)),
}
OPTIONS = {'seeds': 1}
ARG = common.Grammar(words=(common.Word('preset', tuple(PRESETS), 'cpu'),),
                     options=OPTIONS, default='cpu')


def get_config(arg: str = 'cpu') -> config_dict.ConfigDict:
  """The step-schedule member (ResNet-20, seed 0) of a preset."""
  preset = ARG.parse(arg)['preset']
  p = PRESETS[preset]
  c = cifar10.get_config('cifar_resnet20')
  c.val_examples = 5000
  steps = p['steps']
  c.num_train_steps = steps
  c.lr_milestones = ()
  c.lr_milestone_fractions = (0.5, 0.75)
  c.eval_every_steps = p['eval_every']
  c.checkpoint_every_steps = p['eval_every']
  c.log_every_steps = max(1, p['eval_every'] // 5)
  c.plateau.monitor = 'val'
  c.plateau.threshold = 1e-3
  c.plateau.threshold_mode = 'abs'
  if preset == 'local':
    c.model = 'cifar_resnet8'
    c.val_examples = 8
    c.batch_size = 8
    c.eval_batch_size = 16
    c.tensorboard = False
  return c


def sweep(arg: str = 'cpu') -> list[tuple[str, dict]]:
  """The step member, then plateau members over factor x patience."""
  opts = ARG.parse(arg)
  preset = opts['preset']
  p = PRESETS[preset]
  out = []
  for seed in range(opts['seeds']):
    out.append((f'step_s{seed}', {'lr_schedule': 'step', 'seed': seed}))
    for axes in sweeps.product(factor=p['factors'], patience=p['patiences']):
      out.append((f'plateau_f{axes["factor"]}_p{axes["patience"]}_s{seed}',
                  {'lr_schedule': 'plateau', 'lr_factor': axes['factor'],
                   'plateau.patience': axes['patience'], 'seed': seed}))
  return out
