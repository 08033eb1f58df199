"""The moving average of the weights (config.ema_decay): its update rule, its
evaluation as a model of its own, exact resume, and the run that has none."""
import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from cnn import runs
from cnn.errors import ConfigError
from cnn.training import state as state_lib
from cnn.training import step as step_lib
from tests.conftest import metric_rows, small_config


def _quadratic_step(ema_decay):
  """SGD at lr 0.1 on sum(w^2) from w = 1 (each step: w <- 0.8 w), with a
  counter in batch_stats that the average must copy, not average."""
  def loss_fn(params, model_state, batch, rng):
    del batch, rng
    loss = jnp.sum(params['w'] ** 2)
    return loss, ({}, {'count': model_state['count'] + 1,
                       'mean': model_state['mean'] + 1.0})
  init = lambda rng: {'params': {'w': jnp.ones(3)},
                      'batch_stats': {'count': jnp.zeros((), jnp.int32),
                                      'mean': jnp.zeros(())}}
  state = state_lib.create(init, optax.identity(), 0, ema=ema_decay > 0)
  train_step = step_lib.make_train_step(loss_fn, optax.identity(),
                                        lambda s: 0.1, ema_decay=ema_decay)
  return state, train_step


def test_the_average_follows_d_times_itself_plus_1_minus_d_times_the_weights():
  state, train_step = _quadratic_step(0.9)
  # It starts at the initial variables, a copy of them.
  np.testing.assert_array_equal(state.ema['params']['w'], np.ones(3))
  ema = 1.0
  for k in range(1, 4):
    state, _ = train_step(state, {})
    w = 0.8 ** k
    ema = 0.9 * ema + 0.1 * w
    np.testing.assert_allclose(state.params['w'], np.full(3, w), rtol=1e-6)
    np.testing.assert_allclose(state.ema['params']['w'], np.full(3, ema),
                               rtol=1e-6)
  # BatchNorm-like statistics are averaged too; integer counters copied.
  assert int(state.ema['batch_stats']['count']) == 3
  np.testing.assert_allclose(state.ema['batch_stats']['mean'],
                             0.1 * (0.9 * (0.9 * 1 + 2) + 3), rtol=1e-6)


def test_no_average_without_ema_decay():
  state, train_step = _quadratic_step(0.0)
  state, _ = train_step(state, {})
  assert state_lib.average(state) is None
  assert type(state) is state_lib.TrainState  # as checkpoints always were


def _run(config, workdir):
  with tfds.testing.mock_data(num_examples=24):
    return runs.train_and_evaluate(config, str(workdir))


def test_the_average_is_evaluated_resumed_exactly_and_restored(tmp_path):
  straight, parts = tmp_path / 'straight', tmp_path / 'parts'
  final = _run(small_config('lenet5', steps=4, ema_decay=0.5), straight)
  rows = metric_rows(straight)
  evals = {(r['step'], r['split']) for r in rows if r['split'] != 'train'}
  assert evals == {(2, 'test'), (2, 'test_ema'), (4, 'test'), (4, 'test_ema')}
  assert json.load(open(straight / 'config.json'))['ema_decay'] == 0.5
  # Stopped at step 2 and resumed: the same averages, bit for bit.
  _run(small_config('lenet5', steps=2, ema_decay=0.5), parts)
  _run(small_config('lenet5', steps=4, ema_decay=0.5), parts)
  assert metric_rows(parts) == rows
  # The checkpoint restores it: --ema evaluates it as logged.
  with tfds.testing.mock_data(num_examples=24):
    r = runs.evaluate_checkpoint(str(straight), 'test', ema=True)
    assert r['loss'] == pytest.approx(final['test_ema']['loss'], rel=1e-6)
    raw = runs.evaluate_checkpoint(str(straight), 'test')
    assert raw['loss'] == pytest.approx(final['test']['loss'], rel=1e-6)
    assert raw['loss'] != pytest.approx(r['loss'], rel=1e-6)


def test_a_run_without_an_average_refuses_ema_in_one_line(tmp_path):
  _run(small_config('lenet5', steps=2), tmp_path)
  assert {r['split'] for r in metric_rows(tmp_path)} == {'train', 'test'}
  with tfds.testing.mock_data(num_examples=24):
    with pytest.raises(ConfigError, match=r'no moving average.*ema_decay=0'):
      runs.evaluate_checkpoint(str(tmp_path), 'test', ema=True)


@pytest.mark.parametrize('decay', [-0.1, 1.0])
def test_an_ema_decay_outside_0_1_is_one_line(tmp_path, decay):
  with pytest.raises(ConfigError, match=r'ema_decay=.* must be in \[0, 1\)'):
    _run(small_config('lenet5', steps=2, ema_decay=decay), tmp_path)
  assert not (tmp_path / 'metrics.jsonl').exists()
