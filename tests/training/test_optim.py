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
