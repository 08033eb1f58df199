"""Transfer learning: init_from with head replacement, frozen groups, clear
mismatch errors, exact resume of a fine-tuning run, class subsets."""
import json
import logging
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn.training import checkpointing
from cnn.data import input_pipeline
from cnn import models
from cnn.training import optim
from cnn import runs
from cnn.training import transfer
from cnn.errors import CheckpointError, ConfigError
from tests.conftest import classifier_step, metric_rows, small_config

NEW = (5, 6, 7, 8, 9)


def run(config, workdir, num_examples=40):
  with tfds.testing.mock_data(num_examples=num_examples):
    return runs.train_and_evaluate(config, str(workdir))


def saved(workdir, step=None):
  """params and batch_stats of a run's checkpoint, flat by path."""
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    read_only=True)
  try:
    raw = transfer._restore_raw(ckpt, step or ckpt.latest_step())  # pylint: disable=protected-access
  finally:
    ckpt.close()
  return (transfer.flat_paths(raw['params']),
          transfer.flat_paths(raw['batch_stats']))


def records(workdir):
  return metric_rows(workdir)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  wd = tmp_path_factory.mktemp('pre')
  run(small_config(steps=2, tensorboard=False), wd)
  return wd


def test_frozen_stage_is_bit_identical_with_no_optimizer_state():
  model = models.get_model('cifar_resnet8', num_classes=10)
  _, state = classifier_step(model, optim.make_optimizer(small_config()),
                             lambda s: np.float32(0.1))
  masks = transfer.freeze_masks('stem,re:^stage1/', state.params,
                                state.batch_stats)
  tx = transfer.freeze_optimizer(optim.make_optimizer(small_config()),
                                 masks[0])
  state = state.replace(opt_state=tx.init(state.params))
  # Momentum buffers exist for the trainable leaves only.
  n_train = sum(not f for f in transfer.flat_paths(masks[0]).values())
  assert len(jax.tree.leaves(state.opt_state)) == n_train
  train_step, _ = classifier_step(
      transfer.FrozenBatchNorm(model, transfer.frozen_modules(masks[1])), tx,
      lambda s: np.float32(0.1), frozen=masks)
  before = jax.device_get((transfer.flat_paths(state.params),
                           transfer.flat_paths(state.batch_stats)))
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, 8).astype(np.int32)}
  for _ in range(2):
    state, _ = train_step(state, batch)
  after = jax.device_get((transfer.flat_paths(state.params),
                          transfer.flat_paths(state.batch_stats)))
  for old, new in zip(before, after):
    for path in old:
      frozen = path.split('/')[0] in ('stem', 'stage1')
      same = np.array_equal(old[path], new[path])
      assert same == frozen, path
  assert len(jax.tree.leaves(state.opt_state)) == n_train


def test_freeze_specs_and_their_errors():
  model = models.get_model('cifar_resnet8', num_classes=5)
  v = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32),
      train=False))
  p, s = transfer.freeze_masks('trunk', v['params'], v['batch_stats'])
  flat = transfer.flat_paths(p)
  assert flat['head/kernel'] is False and flat['stem/conv/kernel'] is True
  assert all(transfer.flat_paths(s).values())
  p, s = transfer.freeze_masks('re:^stage2/.*/bn1/', v['params'],
                               v['batch_stats'])
  assert transfer.frozen_modules(s) == {'stage2/block0/bn1'}
  with pytest.raises(ConfigError, match='stage4.*trunk, head, stage1.*stem or re:'):
    transfer.freeze_masks('stage4', v['params'], v['batch_stats'])
  with pytest.raises(ConfigError, match='matches no parameter'):
    transfer.freeze_masks('re:^nothing', v['params'], v['batch_stats'])
  with pytest.raises(ConfigError, match='nothing would train'):
    transfer.freeze_masks('trunk,head', v['params'], v['batch_stats'])


def test_new_head_frozen_trunk_and_exact_resume(pretrained, tmp_path,
                                                caplog):
  c = small_config(steps=4, init_from=f'{pretrained}:2', freeze='trunk',
                   classes=NEW, tensorboard=False)
  straight = tmp_path / 'straight'
  with caplog.at_level(logging.WARNING):
    final = run(c, straight)
  # Reading the pretrained state folder raises no orbax warning.
  assert 'Metadata file does not exist' not in caplog.text
  pre_p, pre_s = saved(pretrained)
  got_p, got_s = saved(straight)
  # The head was replaced: 5 classes now; the trunk is the pretrained one,
  # bit for bit after 4 steps, and so are its BatchNorm statistics.
  assert pre_p['head/kernel'].shape == (64, 10)
  assert got_p['head/kernel'].shape == (64, 5)
  assert got_p['head/bias'].shape == (5,)
  for path, value in pre_p.items():
    if not path.startswith('head/'):
      assert np.array_equal(value, got_p[path]), path
  for path, value in pre_s.items():
    assert np.array_equal(value, got_s[path]), path
  assert not np.array_equal(got_p['head/kernel'],
                            saved(straight, 2)[0]['head/kernel'])

  # k steps, stop, resume to 2k == 2k straight; the resumed run restores
  # its own checkpoint, not init_from (which then points nowhere).
  parts = tmp_path / 'parts'
  run(small_config(steps=2, init_from=f'{pretrained}:2', freeze='trunk',
                   classes=NEW, tensorboard=False), parts)
  c.init_from = str(tmp_path / 'gone')
  assert run(c, parts) == final
  assert records(parts) == records(straight)
  # The record still says where the run's weights came from.
  with open(parts / 'config.json') as f:
    assert json.load(f)['init_from'] == f'{pretrained}:2'



def test_mismatches_are_listed_and_nothing_loads(pretrained, tmp_path):
  wd = tmp_path / 'ft'
  with pytest.raises(CheckpointError,
                     match="model 'cifar_resnet8'.*trains 'cifar_plain8'"):
    run(small_config(model='cifar_plain8', init_from=str(pretrained)), wd)
  assert not (wd / 'config.json').exists()
  assert not os.listdir(wd / 'checkpoints')

  def load(spec, **model_kwargs):
    model = models.get_model('cifar_resnet8', num_classes=10, **model_kwargs)
    v = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32),
        train=False))
    return transfer.load_pretrained(spec, 'cifar_resnet8', v['params'],
                                    v['batch_stats'])

  with pytest.raises(CheckpointError) as e:
    load(str(pretrained), shortcut='B')
  lines = str(e.value).splitlines()
  assert 'mismatches, nothing loaded' in lines[0]
  # One line per missing leaf: the projection conv and BN of stages 2, 3.
  assert len(lines) == 1 + 2 * (1 + 2 + 2)
  assert any(l.strip().startswith('params/stage2/block0/proj_conv/kernel: '
                                  'missing in the checkpoint')
             for l in lines)
  with pytest.raises(CheckpointError) as e:
    load(str(pretrained), widths=(16, 32, 32))
  lines = str(e.value).splitlines()[1:]
  assert 'params/head/kernel' not in str(e.value)  # The head is replaced.
  assert ('params/stage3/block0/conv1/kernel: checkpoint shape [3, 3, 32, '
          '64], model shape [3, 3, 32, 32]') in [l.strip() for l in lines]
  with pytest.raises(CheckpointError, match='available steps: \\[2\\]'):
    load(f'{pretrained}:7')
  with pytest.raises(CheckpointError, match='is not a folder'):
    load(str(tmp_path / 'nowhere'))


def test_class_subset_loader_on_mock_data():
  c = small_config(classes=(7, 2), train_examples_per_class=3)
  with tfds.testing.mock_data(num_examples=60):
    full = input_pipeline.load_arrays('cifar10', 'train', None)
    data = input_pipeline.get_datasets(c)
  assert data.num_classes == 2
  expect = np.concatenate([np.flatnonzero(full.labels == k)[:3]
                           for k in (7, 2)])
  expect.sort()
  np.testing.assert_array_equal(data.train.images, full.images[expect])
  np.testing.assert_array_equal(
      data.train.labels, np.where(full.labels[expect] == 7, 0, 1))
  assert set(np.unique(data.evals['test'].labels)) <= {0, 1}
  with pytest.raises(Exception, match='distinct labels in 0..9'):
    input_pipeline.select_classes(full, (3, 3), 10)


def test_frozen_batchnorm_trains_on_running_averages():
  """A frozen trunk computes in training exactly what it computes in eval."""
  model = models.get_model('cifar_resnet8', num_classes=5)
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  v = model.init(jax.random.PRNGKey(0), x, train=False)
  # Running statistics unlike the batch's, so that the two modes differ.
  v = {'params': v['params'],
       'batch_stats': jax.tree.map(lambda s: s + 0.5, v['batch_stats'])}
  _, stats_mask = transfer.freeze_masks('trunk', v['params'],
                                        v['batch_stats'])
  frozen = transfer.FrozenBatchNorm(model,
                                    transfer.frozen_modules(stats_mask))
  want = model.apply(v, x, train=False)
  got, new = frozen.apply(v, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert jax.tree.all(jax.tree.map(np.array_equal, new['batch_stats'],
                                   v['batch_stats']))
  plain, _ = model.apply(v, x, train=True, mutable=['batch_stats'])
  assert not np.allclose(plain, want, atol=1e-3)
