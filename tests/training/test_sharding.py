"""Data parallelism: a train step sharded over 4 CPU devices equals the
single-device step.

The device count is fixed when JAX starts, so the check runs in a subprocess
with `--xla_force_host_platform_device_count=4`; it prints one JSON line that
the tests below read.
"""
import textwrap

import numpy as np
import pytest

from tests.conftest import once_per_session, run_script

_SCRIPT = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from configs import cifar10
    from cnn.tools import benchmarking
    from cnn import models
    from cnn.training import optim
    from cnn.training import sharding
    from cnn.tasks.classification import task as classification
    from cnn.training import state as state_lib
    from cnn.training import step as step_lib
    from cnn.errors import ConfigError

    c = cifar10.get_config('cifar_resnet8')
    model = models.get_model('cifar_resnet8', num_classes=10)
    tx, schedule = optim.make_optimizer(c), optim.make_schedule(c)
    rng = np.random.default_rng(0)
    mean = rng.uniform(0.3, 0.6, (32, 32, 3)).astype(np.float32)
    train_step = step_lib.make_train_step(
        classification.make_loss_fn(model, mean), tx, schedule)
    batch = benchmarking.synthetic_batch(8, (32, 32, 3), 10, seed=1)

    def fresh_state():
      return state_lib.create(
          lambda r: classification.init_variables(model, (32, 32, 3), r),
          tx, 0)

    dev0 = jax.devices()[0]
    init_params = jax.device_get(fresh_state().params)
    single, m1 = train_step(jax.device_put(fresh_state(), dev0),
                             jax.device_put(batch, dev0))

    mesh = sharding.make_mesh()
    sharded_batch = sharding.shard_batch(batch, mesh)
    sharded, m4 = train_step(sharding.replicate(fresh_state(), mesh),
                              sharded_batch)

    def max_diff(a, b):
      return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    try:
      sharding.check_batch_size(6, mesh)
      error = None
    except ConfigError as e:
      error = str(e)
    print(json.dumps({
        'devices': jax.device_count(),
        'batch_shards': sorted(s.data.shape[0] for s in
                               sharded_batch['image'].addressable_shards),
        'loss_single': float(m1['loss']), 'loss_sharded': float(m4['loss']),
        'error_single': float(m1['error']),
        'error_sharded': float(m4['error']),
        'params_moved': max_diff(single.params, init_params),
        'params_diff': max_diff(single.params, sharded.params),
        'stats_diff': max_diff(single.batch_stats, sharded.batch_stats),
        'momentum_diff': max_diff(single.opt_state, sharded.opt_state),
        'step': [int(single.step), int(sharded.step)],
        'bad_batch_error': error}))
''')


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  return once_per_session(tmp_path_factory, 'sharding_4_devices',
                          lambda: run_script(_SCRIPT, devices=4))


def test_batch_is_split_over_four_devices(result):
  assert result['devices'] == 4
  assert result['batch_shards'] == [2, 2, 2, 2]


def test_sharded_step_equals_single_device_step(result):
  # The step really moved the weights (else equal params prove nothing).
  assert result['params_moved'] > 1e-3
  assert result['step'] == [1, 1]
  np.testing.assert_allclose(result['loss_sharded'], result['loss_single'],
                             rtol=1e-5)
  assert result['error_sharded'] == result['error_single']
  # Global BatchNorm statistics: per-device statistics over 2 examples would
  # differ from the batch-of-8 ones by O(1), not by float round-off.
  assert result['stats_diff'] < 1e-5
  assert result['params_diff'] < 1e-5
  assert result['momentum_diff'] < 1e-5


def test_indivisible_batch_is_a_clear_error(result):
  msg = result['bad_batch_error']
  assert msg is not None
  assert 'batch_size=6' in msg and '4 devices' in msg
  assert 'multiple of 4' in msg
