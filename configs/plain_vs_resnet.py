r"""He et al. 2015, Figure 6 / Table 6: plain nets vs ResNets on CIFAR-10.

Members are {plain, resnet} x depths x seeds, all with the recipe of
section 4.2 (configs/cifar10.py: batch 128, SGD momentum 0.9, weight decay
1e-4, lr 0.1 divided by 10 at 1/2 and 3/4 of training, pad-4 crop + flip,
per-pixel mean). Names: `plain20_s0`, `resnet56_s1`, ...

The argument is `PRESET[,seeds=N][,depths=A-B-...]` (seeds and depths
default to the preset's):

  paper  64k iterations, eval every 1k; plain 20/32/44/56, ResNet
         20/32/44/56/110 (ResNet-110 warms up at lr 0.01 for 400 iterations,
         as in the paper); one seed. Hours per member on a GPU.
  fig6   the paper's recipe compressed to 20 epochs (7,820 iterations; lr
         /10 at 3,910 and 5,865), eval on all 10,000 test images every
         epoch (391 iterations); plain and ResNet 20/32/44/56, one seed.
         Sized so that a 56-layer member fits one 2.5-hour run on a fast
         CPU; the 20-layer members took 1.5-1.8 h on a 2-core AVX2 EPYC
         (results/plain_vs_resnet_fig6/ says what each member took where).
  cpu    600 iterations (lr /10 at 300 and 450, i.e. 1.5 epochs), eval
         every 100; depths 8 and 20, seeds 0 and 1. About 45-50 min on 2
         CPU cores. It shows the degradation problem as it looks early in
         training: plain-20 trains worse than plain-8 while ResNet-20 trains
         better than ResNet-8. It cannot show the final accuracies (1.5
         epochs, not 164), nor deeper ResNets overtaking shallower ones: at
         600 iterations ResNet-56 is still in its slower start
         (`cpu,depths=8-20-56,seeds=1` adds depth 56, +54 min measured).
  local  8-layer nets, 4 steps of batch 8: a smoke test of the machinery.

Run the sweep, then draw Figure 6 and Table 6:

  python -m experiments.sweep --config=configs/plain_vs_resnet.py:cpu \
    --workdir=runs/plain_vs_resnet_cpu --config.dataset=cifar10_jpeg \
    --config.data_dir=../shared/data/tfds
  python -m experiments.plot --workdir=runs/plain_vs_resnet_cpu

Expected with `cpu` (measured here, mean of 2 seeds; see
results/plain_vs_resnet_cpu/): final training error plain-8 43.8 %,
plain-20 49.7 %, ResNet-8 44.9 %, ResNet-20 42.3 %; test error 42.5 / 48.0 /
43.5 / 40.6 %. Paper, 64k iterations: ResNet test error 8.75 / 7.51 / 7.17 /
6.97 / 6.43 % for depth 20 / 32 / 44 / 56 / 110; plain nets' training and
test error rise with depth. One member alone, e.g.:

  python -m experiments.train --config=configs/plain_vs_resnet.py:cpu \
    --config.model=cifar_plain20 --config.seed=1 --workdir=runs/p20 ...
"""
from ml_collections import config_dict

from configs import cifar10
from configs import common

PRESETS = {
    'paper': dict(steps=64_000, eval_every=1_000, plain=(20, 32, 44, 56),
                  resnet=(20, 32, 44, 56, 110), seeds=1),
    'fig6': dict(steps=20 * 391, eval_every=391, plain=(20, 32, 44, 56),
                 resnet=(20, 32, 44, 56), seeds=1),
    'cpu': dict(steps=600, eval_every=100, plain=(8, 20), resnet=(8, 20),
                seeds=2),
    'local': dict(steps=4, eval_every=2, plain=(8,), resnet=(8,), seeds=1),
}
OPTIONS = {'seeds': 0, 'depths': ()}  # 0 and (): the preset's.
KINDS = {'plain': 'cifar_plain', 'resnet': 'cifar_resnet'}
ARG = common.Grammar(words=(common.Word('preset', tuple(PRESETS), 'cpu'),),
                     options=OPTIONS, default='cpu')


def get_config(arg: str = 'cpu') -> config_dict.ConfigDict:
  """The recipe of one member (ResNet-20, seed 0) for a preset."""
  preset = ARG.parse(arg)['preset']
  p = PRESETS[preset]
  c = cifar10.get_config('cifar_resnet20')
  steps = p['steps']
  c.num_train_steps = steps
  # Section 4.2's 32k/48k of 64k: the same fractions of any length (also
  # of an overridden --config.num_train_steps).
  c.lr_milestones = ()
  c.lr_milestone_fractions = (0.5, 0.75)
  c.eval_every_steps = p['eval_every']
  c.checkpoint_every_steps = p['eval_every']
  # About five train-log points per evaluation, on a divisor of the eval
  # interval (the loop logs at the gcd of the two: 391 // 5 = 78 would log
  # every step, a host sync each step; 23 divides 391).
  every = p['eval_every']
  c.log_every_steps = max(d for d in range(1, max(every // 5, 1) + 1)
                          if every % d == 0)
  if preset == 'local':
    c.model = 'cifar_resnet8'
    c.batch_size = 8
    c.eval_batch_size = 16
    c.tensorboard = False
  return c


def sweep(arg: str = 'cpu') -> list[tuple[str, dict]]:
  """Members as (name, overrides): depth-major so pairs finish together."""
  opts = ARG.parse(arg)
  preset = opts['preset']
  p = PRESETS[preset]
  depths = opts['depths'] or sorted(set(p['plain']) | set(p['resnet']))
  out = []
  for depth in depths:
    for kind, prefix in KINDS.items():
      if not opts['depths'] and depth not in p[kind]:
        continue
      for seed in range(opts['seeds'] or p['seeds']):
        overrides = {'model': f'{prefix}{depth}', 'seed': seed}
        if kind == 'resnet' and depth >= 110:
          # Paper: 0.1 is slightly too large to start converging at 110
          # layers; 0.01 until training error < 80 % (~400 iterations).
          overrides.update(warmup_steps=min(400, p['steps'] // 10),
                           warmup_lr=0.01)
        out.append((f'{kind}{depth}_s{seed}', overrides))
  return out
