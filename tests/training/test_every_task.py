"""What the one loop owns holds for every task: the plateau schedule, best
checkpoints by the task's held-out metric, the NaN guard, evaluation of any
checkpoint (experiments.evaluate), and data parallelism."""
import os
import textwrap

import pytest
import tensorflow_datasets as tfds

from cnn.errors import NonFiniteLossError
from cnn import runs
from cnn.training import checkpointing, metric_writers
from tests.conftest import run_script
from tests.tasks.test_detection import tiny_config
from tests.tasks.test_localization import recipe_config


def localization_config(**kw):
  return recipe_config('joint', num_train_steps=6, dense_eval=False, **kw)


def detection_config(**kw):
  c = tiny_config('faster_rcnn', **kw)
  c.num_train_steps = 6
  c.log_every_steps = 2
  return c


CONFIGS = {'localization': localization_config,
           'detection': detection_config}
# The held-out split whose metric drives the plateau and the best checkpoint.
MONITOR = {'localization': 'test', 'detection': 'val'}


def train(config, workdir):
  with tfds.testing.mock_data(num_examples=16):
    return runs.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def plateau_run(request, tmp_path_factory):
  """6 steps, evaluated every 2, on a plateau schedule that must cut the rate
  at the second evaluation: no metric improves by a whole 1.0."""
  task = request.param
  c = CONFIGS[task](lr_schedule='plateau', keep_checkpoints=1,
                    eval_every_steps=2, checkpoint_every_steps=2)
  c.plateau.monitor = MONITOR[task]
  c.plateau.patience, c.plateau.threshold = 0, 1.0
  c.lr_factor, c.plateau.min_lr = 0.1, 0.0
  c.warmup_steps = 0
  work = tmp_path_factory.mktemp(task)
  train(c, work)
  return task, c, work


def test_plateau_lowers_the_learning_rate(plateau_run):
  _, c, work = plateau_run
  lrs = {r['step']: r['learning_rate'] for r in
         metric_writers.read_metrics(str(work)) if r['split'] == 'train'}
  base = c.learning_rate
  assert lrs[2] == pytest.approx(base) and lrs[4] == pytest.approx(base)
  assert lrs[6] == pytest.approx(base * 0.1)


def test_best_checkpoint_is_kept_by_the_tasks_metric(plateau_run):
  task, _, work = plateau_run
  metric, better = {'localization': ('loc_error', min),
                    'detection': ('map', max)}[task]
  held_out = {r['step']: r[metric] for r in
              metric_writers.read_metrics(str(work))
              if r['split'] == MONITOR[task]}
  assert sorted(held_out) == [2, 4, 6]
  ckpt = checkpointing.Checkpointer(str(work / 'checkpoints'), read_only=True)
  best = ckpt.best_step()
  steps = ckpt.steps()
  ckpt.close()
  assert best is not None and held_out[best] == better(held_out.values())
  assert 6 in steps and best in steps  # keep_checkpoints=1: last + best


def test_evaluate_any_checkpoint_of_each_task(plateau_run, tmp_path):
  """What experiments.evaluate runs: the best checkpoint's test metrics and
  a picture of its predictions."""
  task, _, work = plateau_run
  png = str(tmp_path / 'p.png')
  with tfds.testing.mock_data(num_examples=16):
    r = runs.evaluate_checkpoint(str(work), 'test', 'best', picture=png)
    last = runs.evaluate_checkpoint(str(work), 'test', 'latest')
  key = {'localization': 'loc_error', 'detection': 'map'}[task]
  assert r['task'] == task and 0.0 <= r[key] <= 1.0
  assert last['step'] == 6 and 0.0 <= last[key] <= 1.0
  assert os.path.getsize(png) > 1000
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('task', sorted(CONFIGS))
def test_nan_guard_stops_each_task_and_keeps_the_last_good_checkpoint(
    task, tmp_path):
  # Two sane steps (checkpoint 2), then a rate of 1e28.
  c = CONFIGS[task](lr_schedule='step', lr_milestones=(2,), lr_factor=1e30,
                    checkpoint_every_steps=2, eval_every_steps=6)
  c.warmup_steps = 0
  with pytest.raises(NonFiniteLossError, match='step 2') as e:
    train(c, tmp_path)
  assert '\n' not in str(e.value)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']


_SHARDED = textwrap.dedent('''
    import json
    import jax, numpy as np
    import tensorflow_datasets as tfds
    from cnn.tasks.detection import losses, model as model_lib
    from cnn.training import optim, sharding, state as state_lib
    from cnn.training import step as step_lib
    from tests.tasks.test_detection import tiny_config

    c = tiny_config('faster_rcnn')
    model, spec = model_lib.make_model(c, 10)
    tx, schedule = optim.make_optimizer(c), optim.make_schedule(c)
    step = step_lib.make_train_step(losses.make_loss_fn(model, c, spec), tx,
                                    schedule)
    fresh = lambda: state_lib.create(
        lambda r: model.init(r, np.zeros((1, 64, 64, 3), np.float32)), tx, 0)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 32, (4, 3, 2)).astype(np.float32)
    wh = rng.uniform(12, 30, (4, 3, 2)).astype(np.float32)
    batch = {'images': rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8),
             'gt_boxes': np.concatenate([xy, wh], -1),
             'gt_classes': np.array([[1, 2, -1], [3, -1, -1], [4, 5, 6],
                                     [7, -1, -1]], np.int32)}
    dev0 = jax.devices()[0]
    single, m1 = step(jax.device_put(fresh(), dev0),
                      jax.device_put(batch, dev0))
    single, m1 = step(single, jax.device_put(batch, dev0))
    mesh = sharding.make_mesh()
    sharded, m2 = step(sharding.replicate(fresh(), mesh),
                       sharding.shard_batch(batch, mesh))
    sharded, m2 = step(sharded, sharding.shard_batch(batch, mesh))
    diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                            for x, y in zip(jax.tree.leaves(a),
                                            jax.tree.leaves(b)))
    print(json.dumps({
        'devices': len(mesh.devices.reshape(-1)),
        'loss': [float(m1['loss']), float(m2['loss'])],
        'rpn': [float(m1['rpn_cls_loss']), float(m2['rpn_cls_loss'])],
        'params': diff(single.params, sharded.params),
        'stats': diff(single.batch_stats, sharded.batch_stats)}))
''')


def test_detection_step_sharded_over_two_devices_equals_one_device():
  r = run_script(_SHARDED, devices=2)
  assert r['devices'] == 2
  assert r['loss'][0] == pytest.approx(r['loss'][1], rel=1e-5)
  assert r['rpn'][0] == pytest.approx(r['rpn'][1], rel=1e-5)
  assert r['params'] < 1e-5 and r['stats'] < 1e-5
