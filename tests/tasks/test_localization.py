"""Synthetic localization data, the two-headed net, freezing, dense
evaluation and the three-step recipe end to end on tfds mock data."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn.data import input_pipeline
from cnn.data import synthetic_localization as synth
from cnn.tasks.localization import dense
from cnn.tasks.localization import model as model_lib
from cnn.tasks.localization.task import LocalizationTask
from cnn import runs
from cnn.training import optim
from cnn.training import step as step_lib
from cnn.training import transfer
from cnn.errors import ConfigError, DataError
from cnn.ops import boxes as box_ops
from configs import localization as loc_configs


def source(n=6, seed=0):
  rng = np.random.default_rng(seed)
  return input_pipeline.ArrayData(
      rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
      rng.integers(0, 10, n).astype(np.int32))


def test_synthetic_canvases_are_seeded_and_boxes_are_where_the_image_went():
  src = source()
  a = synth.SyntheticLocalization(src, canvas=64, seed=3).materialize()
  b = synth.SyntheticLocalization(src, canvas=64, seed=3).render(range(6))
  c = synth.SyntheticLocalization(src, canvas=64, seed=4).materialize()
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.boxes, b.boxes)
  assert not np.array_equal(a.boxes, c.boxes)
  np.testing.assert_array_equal(a.labels, src.labels)
  assert a.images.shape == (6, 64, 64, 3) and a.images.dtype == np.uint8
  for img, box, orig in zip(a.images, a.boxes, src.images):
    x, y, w, h = box.astype(int)
    assert 24 <= (w + h) / 2 <= 56 and x + w <= 64 and y + h <= 64
    pasted = synth.resize(orig, h, w)
    np.testing.assert_allclose(img[y:y + h, x:x + w], pasted, atol=0.51)
    outside = np.ones((64, 64), bool)
    outside[y:y + h, x:x + w] = False
    # A textured background, not a flat colour an edge detector would solve.
    assert img[outside].std() > 10
  big = synth.SyntheticLocalization(src, canvas=100, seed=3).materialize()
  assert big.images.shape[1:3] == (100, 100)
  assert big.boxes[:, 2:].max() <= 100


def test_load_any_split_and_limit_keeps_the_first_canvases():
  with tfds.testing.mock_data(num_examples=12):
    full = synth.load('cifar10', 'train', None, seed=1)
    part = synth.load('cifar10', 'train', None, seed=1, limit=5)
    test = synth.load('cifar10', 'test', None, seed=1)
  assert len(full) == 12 and len(part) == 5
  np.testing.assert_array_equal(full.boxes[:5], part.boxes)
  np.testing.assert_array_equal(full.render([0, 4]).images,
                                part.render([0, 4]).images)
  assert not np.array_equal(full.boxes, test.boxes)  # the split is mixed in


def test_voc_missing_is_one_clear_error(tmp_path):
  with pytest.raises(DataError, match=r"'voc/2007'.*not readable.*tfds build"):
    synth.load_voc('train', str(tmp_path), 64)


def small_net(attach='conv'):
  c = loc_configs.get_config('local')
  c.attach = attach
  c.box_widths = (16,)
  c.model_kwargs = {'widths': (8, 8, 8), 'fc_widths': (16, 16)}
  model, stride = model_lib.make_model(c, 10)
  params = LocalizationTask(c).init_variables(
      model, None, jax.random.PRNGKey(0))['params']
  return c, model, stride, params


@pytest.mark.parametrize('attach', ['conv', 'fc'])
def test_two_heads_and_where_the_box_head_attaches(attach):
  _, model, stride, params = small_net(attach)
  assert stride == 8 and model.window == 5
  x = jnp.zeros((2, 64, 64, 3))
  logits, codes = model.apply({'params': params}, x, train=False)
  assert logits.shape == (2, 1, 1, 10) and codes.shape == (2, 1, 1, 4)
  first = params['box_fc1']['kernel'].shape
  # After the convs: an F x F conv over the trunk (an FC layer); after fc1:
  # a 1x1 conv over its 16 channels.
  assert first == ((5, 5, 8, 16) if attach == 'conv' else (1, 1, 16, 16))
  logits, codes = model.apply({'params': params}, jnp.zeros((1, 80, 96, 3)),
                              train=False)
  assert logits.shape[1:3] == codes.shape[1:3] == (3, 5)


def test_dense_boxes_map_back_to_image_coordinates():
  _, model, stride, params = small_net()
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (1, 80, 72, 3), dtype=np.uint8)
  probs, bxs = dense.dense_maps(model, params, image, 1.0, 64, stride)
  assert probs.shape == (1, 3 * 2, 10)
  grid = [(i, j) for i in range(3) for j in range(2)]
  crops = np.concatenate([image[:, i * 8:i * 8 + 64, j * 8:j * 8 + 64]
                          for i, j in grid])
  logits, box = dense.predict(model, params, crops)
  for n, (i, j) in enumerate(grid):
    np.testing.assert_allclose(box[n] + [j * 8, i * 8, 0, 0], bxs[0, n],
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(jax.nn.softmax(logits[n]), probs[0, n],
                               atol=1e-5)
  # Scaling the image by 2 halves the boxes back into its coordinates.
  big = np.asarray(jax.image.resize(image.astype(np.float32), (1, 160, 144, 3),
                                    'bilinear'))
  _, at2 = dense.dense_maps(model, params, image, 2.0, 64, stride)
  _, direct = dense.dense_maps(model, params, np.round(big), 1.0, 64, stride)
  assert at2.shape == direct.shape
  np.testing.assert_allclose(at2 * 2, direct, atol=0.6)
  # One scale of one window: the dense result is the single-window one.
  classes, final = dense.dense_predict(model, params, image[:, :64, :64],
                                     window=64, stride=stride, scales=(1.0,))
  logits, box = dense.predict(model, params, image[:, :64, :64])
  assert classes[0] == np.argmax(logits[0])
  np.testing.assert_allclose(final[0], box[0], atol=1e-3)


def test_freezing_trains_only_the_stage_parameters():
  c, model, _, params = small_net()
  c.weight_decay = 1e-3  # frozen weights must not even decay
  batch = synth.SyntheticLocalization(source(8), canvas=64).materialize()
  from cnn.training import state as state_lib  # pylint: disable=g-import-not-at-top
  for stage, moved in (('regress', {'box_fc1', 'box_head'}),
                       ('classify', {'features', 'fc1', 'fc2', 'head'}),
                       ('joint', set(params))):
    c.stage = stage
    task = LocalizationTask(c)
    tx, frozen = optim.make_optimizer(c), None
    if task.freeze_spec():  # what the loop does with the stage's spec
      frozen = transfer.freeze_masks(task.freeze_spec(), params, {})
      tx = transfer.freeze_optimizer(tx, frozen[0])
    state = state_lib.create(lambda r: {'params': params}, tx, 0)
    step = step_lib.make_train_step(task.loss_fn(model, None), tx,
                                    lambda s: jnp.float32(0.01),
                                    frozen=frozen)
    new, metrics = step(jax.tree.map(jnp.copy, state),
                        {'image': batch.images, 'label': batch.labels,
                         'box': batch.boxes})
    assert np.isfinite(float(metrics['loss']))
    changed = {k for k in params if not all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)), params[k], new.params[k])))}
    assert changed == moved, stage


def test_box_metrics_and_mean_box_baseline():
  true = np.array([[0, 0, 10, 10], [10, 10, 10, 10]], float)
  m = dense.box_metrics(true, true)
  assert m == {'mean_iou': 1.0, 'iou50': 1.0, 'oracle_loc_error': 0.0}
  mean = np.broadcast_to(true.mean(0), true.shape)
  m = dense.box_metrics(mean, true, 'mean_box_')
  expected = float(box_ops.iou(np.array([5., 5, 10, 10]), true[0]))
  assert m['mean_box_mean_iou'] == pytest.approx(expected)  # 25/175
  assert m['mean_box_iou50'] == 0.0


def test_localization_error_needs_the_class_and_iou_at_least_half():
  true = np.array([[0, 0, 10, 10]] * 4, float)
  # IoU exactly 0.5: a box of twice the area containing the true one.
  half = np.array([0, 0, 20, 10], float)
  assert float(box_ops.iou(half, true[0])) == pytest.approx(0.5)
  below = np.array([0, 0, 20.5, 10], float)
  pred = np.stack([half, half, below, true[0]])
  m = dense.box_metrics(pred, true, '', pred_classes=[3, 1, 3, 3],
                        true_classes=[3, 3, 3, 3])
  # right: (class ok, IoU 0.5) and (class ok, IoU 1); wrong: another class
  # at IoU 0.5, the right class at IoU < 0.5.
  assert m['loc_error'] == pytest.approx(0.5)
  assert m['iou50'] == pytest.approx(0.75)
  assert m['oracle_loc_error'] == pytest.approx(0.25)
  assert 'loc_error_top5' not in m  # one guess only


def test_top5_localization_error_any_guess_with_class_and_box():
  true_box = np.array([[0, 0, 10, 10]] * 4, float)
  half = [0, 0, 20, 10]  # IoU exactly 0.5
  below = [0, 0, 20.5, 10]  # IoU just under 0.5
  far = [30, 30, 10, 10]  # IoU 0
  true_cls = np.array([7, 7, 7, 7])
  classes = np.array([[1, 2, 3, 4, 7],    # 5th guess right, at IoU 0.5
                      [1, 2, 3, 4, 5],    # class not in the top 5
                      [7, 2, 3, 4, 5],    # top-1 class, its box too small
                      [2, 7, 3, 4, 5]])   # 2nd guess right, its own box
  boxes = np.array([[far] * 4 + [half],
                    [half] * 5,
                    [below] + [half] * 4,  # class 2's box fits, not 7's
                    [half, true_box[0].tolist(), far, far, far]], float)
  assert dense.localization_error(classes, boxes, true_cls,
                                  true_box) == pytest.approx(0.5)
  # Top-1 alone: only row 2 has the class first, and its box misses.
  assert dense.localization_error(classes[:, 0], boxes[:, 0], true_cls,
                                  true_box) == 1.0
  m = dense.box_metrics(boxes, true_box, 'd_', classes, true_cls)
  assert m['d_loc_error_top5'] == pytest.approx(0.5)
  assert m['d_loc_error'] == 1.0
  # One class-agnostic box for all five guesses (the single window).
  agnostic = np.array([half, half, below, half], float)
  assert dense.localization_error(classes, agnostic, true_cls,
                                  true_box) == pytest.approx(0.5)  # rows 0, 3


def test_config_errors(tmp_path):
  with tfds.testing.mock_data(num_examples=4):
    c = loc_configs.get_config('joint')
    c.dataset, c.data_dir = 'cifar10', None
    with pytest.raises(ConfigError, match="cifar10' has no 'bbox'"):
      LocalizationTask(c).validate()
  c = loc_configs.get_config('joint')
  c.dataset, c.data_dir = 'no_such_set', str(tmp_path)
  with pytest.raises(DataError, match='no_such_set'):
    LocalizationTask(c).validate()
  with pytest.raises(DataError, match="'cifar10' has no 'bbox'"):
    with tfds.testing.mock_data(num_examples=4):
      input_pipeline.load_arrays('cifar10', 'train', None, boxes=True)
  c = loc_configs.get_config('regress')
  with pytest.raises(ConfigError, match='init_from'):
    LocalizationTask(c).validate()
  c = loc_configs.get_config('joint')
  c.scales = (0.5, 1.0)
  with pytest.raises(ConfigError, match='>= 1'):
    LocalizationTask(c).validate()
  with pytest.raises(ValueError, match='unknown preset'):
    loc_configs.get_config('nope')
  c = loc_configs.get_config('joint')
  c.model = 'cifar_resnet8'
  with pytest.raises(ConfigError, match='no fully connected head'):
    model_lib.make_model(c, 10)


def recipe_config(stage, **kw):
  c = loc_configs.get_config(stage)
  c.source, c.data_dir = 'cifar10', None
  c.model_kwargs = {'widths': (8, 8, 8), 'fc_widths': (16, 16)}
  c.box_widths = (16,)
  c.batch_size, c.eval_batch_size = 8, 8
  c.train_examples, c.test_examples = 16, 8
  c.num_train_steps = 0 if stage == 'both' else 2
  c.log_every_steps = 1
  c.eval_every_steps = c.checkpoint_every_steps = 2
  c.scales = (1.0,)
  c.dense_eval = stage != 'classify'
  c.tensorboard = False
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def test_three_step_recipe_end_to_end(tmp_path):
  work = {s: str(tmp_path / s) for s in ('classify', 'regress', 'both')}
  with tfds.testing.mock_data(num_examples=16):
    runs.train_and_evaluate(recipe_config('classify'), work['classify'])
    res = runs.train_and_evaluate(
        recipe_config('regress', init_from=work['classify']),
        work['regress'])['test']
    both = runs.train_and_evaluate(
        recipe_config('both', init_from=work['regress']), work['both'])['test']
    p1 = runs.restore_run(work['classify'])[1].params
    p2 = runs.restore_run(work['regress'])[1].params
  for key in ('error', 'mean_iou', 'iou50', 'loc_error', 'dense_error',
              'dense_mean_iou', 'dense_iou50', 'dense_loc_error',
              'mean_box_mean_iou', 'mean_box_iou50'):
    assert 0.0 <= res[key] <= 1.0, key
  # Stage 3 evaluates stage 2's weights unchanged.
  for key in ('error', 'mean_iou', 'dense_mean_iou'):
    assert both[key] == pytest.approx(res[key])
  with open(os.path.join(work['regress'], 'metrics.jsonl')) as f:
    recs = [json.loads(line) for line in f]
  assert {(r['step'], r['split']) for r in recs} >= {(1, 'train'),
                                                     (2, 'train'), (2, 'test')}
  train_rec = [r for r in recs if r['split'] == 'train'][0]
  assert {'loss', 'box_loss', 'class_loss', 'iou', 'error'} <= set(train_rec)
  # Stage 2 kept stage 1's trunk and class head: only box_* moved.
  for k in p1:
    same = all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)), p1[k], p2[k])))
    assert same == (not k.startswith('box_')), k
