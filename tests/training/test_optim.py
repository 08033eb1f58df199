"""Schedules at their boundaries, the plateau rule, the weight-decay mask."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn.training import optim
from cnn.errors import ConfigError
from tests.conftest import small_config


def lr_at(config, step):
  return float(optim.make_schedule(config)(jnp.asarray(step)))


def test_step_schedule_divides_by_10_at_milestones():
  c = small_config(lr_schedule='step', lr_milestones=(32000, 48000),
                   learning_rate=0.1, lr_factor=0.1)
  assert lr_at(c, 0) == pytest.approx(0.1)
  assert lr_at(c, 31999) == pytest.approx(0.1)
  assert lr_at(c, 32000) == pytest.approx(0.01)
  assert lr_at(c, 47999) == pytest.approx(0.01)
  assert lr_at(c, 48000) == pytest.approx(0.001)
  assert lr_at(c, 63999) == pytest.approx(0.001)


def test_cosine_and_warmup():
  c = small_config(lr_schedule='cosine', num_train_steps=100)
  assert lr_at(c, 0) == pytest.approx(0.1)
  assert lr_at(c, 50) == pytest.approx(0.05, rel=1e-5)
  assert lr_at(c, 100) == pytest.approx(0.0, abs=1e-8)
  # He et al.: 0.01 until ~400 iterations for ResNet-110, then 0.1.
  c = small_config(lr_schedule='step', warmup_steps=400, warmup_lr=0.01)
  assert lr_at(c, 0) == pytest.approx(0.01)
  assert lr_at(c, 399) == pytest.approx(0.01)
  assert lr_at(c, 400) == pytest.approx(0.1)
  c.warmup = 'linear'
  assert lr_at(c, 200) == pytest.approx(0.055)


def test_unknown_schedule_is_a_config_error():
  c = small_config(lr_schedule='exponential')
  with pytest.raises(ConfigError, match='lr_schedule'):
    optim.make_schedule(c)


def run_plateau(config, metrics):
  state = optim.PlateauState.create()
  scales = []
  for m in metrics:
    state = optim.plateau_update(state, m, config)
    scales.append(float(state.scale))
  return scales


def test_plateau_cuts_after_patience_then_cools_down():
  c = small_config(lr_schedule='plateau', lr_factor=0.1)
  c.plateau.patience = 2
  c.plateau.threshold = 0.01
  c.plateau.threshold_mode = 'abs'
  c.plateau.cooldown = 1
  c.plateau.min_lr = 1e-4
  # 0.5 improves; 0.495 does not beat 0.5 by 0.01: bad evals 1, 2, 3 -> cut
  # at the third (patience 2 exceeded).
  scales = run_plateau(c, [0.5, 0.495, 0.5, 0.5])
  assert scales == pytest.approx([1, 1, 1, 0.1])
  # Cooldown: the next evaluation is not counted; then 3 bad ones cut again.
  scales = run_plateau(c, [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
  assert scales == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01])
  # An improvement resets the count.
  scales = run_plateau(c, [0.5, 0.5, 0.5, 0.4, 0.5, 0.5])
  assert scales == pytest.approx([1] * 6)


def test_plateau_respects_min_lr():
  c = small_config(lr_schedule='plateau', learning_rate=0.1, lr_factor=0.1)
  c.plateau.patience = 0
  c.plateau.cooldown = 0
  c.plateau.min_lr = 0.005
  scales = run_plateau(c, [0.5, 0.5, 0.5, 0.5])
  assert scales == pytest.approx([1, 0.1, 0.05, 0.05])


def test_decay_mask_kernels_only_option():
  params = {'conv': {'kernel': jnp.ones((3, 3, 1, 2))},
            'bn': {'scale': jnp.ones(2), 'bias': jnp.zeros(2)},
            'head': {'kernel': jnp.ones((2, 3)), 'bias': jnp.zeros(3)}}
  all_ = optim.decay_mask(params, decay_bn_and_bias=True)
  assert all(jax.tree.leaves(all_))
  kern = optim.decay_mask(params, decay_bn_and_bias=False)
  assert kern['conv']['kernel'] and kern['head']['kernel']
  assert not kern['bn']['scale'] and not kern['bn']['bias']
  assert not kern['head']['bias']


def test_optimizer_matches_pytorch_sgd_update():
  """Two steps of momentum SGD with coupled L2 decay, by hand."""
  c = small_config(weight_decay=0.01, momentum=0.9, decay_bn_and_bias=False)
  tx = optim.make_optimizer(c)
  p = {'w': {'kernel': jnp.array([1.0, -2.0])}, 'b': {'bias': jnp.array([0.5])}}
  g = {'w': {'kernel': jnp.array([0.1, 0.2])}, 'b': {'bias': jnp.array([0.3])}}
  s = tx.init(p)
  lr = 0.1
  buf_w, buf_b = np.zeros(2), np.zeros(1)
  w, b = np.array([1.0, -2.0]), np.array([0.5])
  for _ in range(2):
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, jax.tree.map(lambda x: -lr * x, u))
    buf_w = 0.9 * buf_w + (np.array([0.1, 0.2]) + 0.01 * w)
    buf_b = 0.9 * buf_b + np.array([0.3])  # No decay on the bias.
    w, b = w - lr * buf_w, b - lr * buf_b
  np.testing.assert_allclose(p['w']['kernel'], w, rtol=1e-6)
  np.testing.assert_allclose(p['b']['bias'], b, rtol=1e-6)


def test_warmups_that_do_not_fit_the_run_are_refused():
  """Issue 36, silent 4: a warm-up as long as the run (faster_rcnn's 200
  steps in a 10-step run), or one that outlasts the first lr cut (the
  110-layer member's 400 steps in a 600-step run), is one line naming the
  fields; an evaluation-only run keeps its config's warm-up."""
  from configs import detection, plain_vs_resnet  # pylint: disable=g-import-not-at-top
  from cnn.tools import sweeps  # pylint: disable=g-import-not-at-top
  c = detection.get_config('faster_rcnn')
  optim.validate(c)
  c.num_train_steps = 10
  with pytest.raises(ConfigError) as e:
    optim.validate(c)
  assert str(e.value).startswith(
      'warmup_steps=200 does not fit num_train_steps=10')
  c.num_train_steps = 0  # evaluate only
  optim.validate(c)
  base = plain_vs_resnet.get_config('paper')
  base.num_train_steps = 600
  c = sweeps.apply_overrides(
      base, dict(plain_vs_resnet.sweep('paper,depths=110'))['resnet110_s0'])
  with pytest.raises(ConfigError) as e:
    optim.validate(c)
  assert '\n' not in str(e.value) and str(e.value).startswith(
      'warmup_steps=400 outlasts the first lr milestone (step 300 of '
      'num_train_steps=600)')
  c.warmup_steps = 300
  optim.validate(c)


def test_milestones_beyond_the_run_are_said_at_its_start():
  """Issue 36, silent 4: cifar10.py's milestones at 32k and 48k in a short
  run never fire; the run says so before it trains."""
  c = small_config(steps=300)
  [note] = optim.schedule_notes(c)
  assert note.startswith('lr_milestones 32000, 48000 lie at or beyond '
                         'num_train_steps=300')
  c.num_train_steps = 40_000
  assert '48000' in optim.schedule_notes(c)[0]
  assert '32000' not in optim.schedule_notes(c)[0]
  c.num_train_steps = 64_000
  assert not optim.schedule_notes(c)
  c.lr_milestones, c.lr_milestone_fractions = (), (0.5, 0.75)
  c.num_train_steps = 300
  assert not optim.schedule_notes(c)


def test_every_config_and_preset_validates():
  """The configs of configs/, each preset and sweep member at its defaults,
  pass the optimizer's checks (the warm-up ones included)."""
  from configs import (cifar10, detection, localization, lr_schedules,  # pylint: disable=g-import-not-at-top
                       mnist, plain_vs_resnet, tiny_imagenet)
  from cnn.tools import sweeps  # pylint: disable=g-import-not-at-top
  configs = [cifar10.get_config(a) for a in (
      'cifar_resnet20', 'cifar_resnet110', 'cifar_resnet20,fast',
      'cifar_resnet8,fast_local')]
  configs.append(mnist.get_config())
  configs += [localization.get_config(a + data) for a in localization.PRESETS
              for data in ('', ',tiny_imagenet')]
  configs += [tiny_imagenet.get_config(f'{m},{p}'.rstrip(','))
              for m in ('resnet18_64', 'det_trunk')
              for p in tiny_imagenet.PRESETS]
  configs += [detection.get_config(kind + data + local)
              for kind in detection.KINDS
              for data in ('',) + tuple(',' + p for p in detection.PHOTOS)
              for local in ('', ',local')]
  for module, args in ((plain_vs_resnet, plain_vs_resnet.PRESETS),
                       (lr_schedules, lr_schedules.PRESETS),
                       (detection, ('fast_rcnn,raccoon', 'fast_rcnn')),
                       (mnist, ('lenet5',))):
    for arg in args:
      base = module.get_config(arg)
      configs += [sweeps.apply_overrides(base, o)
                  for _, o in module.sweep(arg)]
  for c in configs:
    optim.validate(c)
