"""Tiny ImageNet on the real prepared copy: the reader with boxes, class
names, and the classification and localization presets end to end."""
import json
import os

import numpy as np
import pytest

from cnn.data import input_pipeline as ip
from cnn.errors import ConfigError
from cnn import runs
from configs import localization as loc_configs
from configs import tiny_imagenet
from tests.conftest import SHARED_TFDS, requires_shared

DATA = str(SHARED_TFDS)
pytestmark = requires_shared('tiny_imagenet')


def test_reader_takes_the_boxes_along_and_names_the_classes():
  assert ip.has_boxes('tiny_imagenet', DATA)
  assert not ip.has_boxes('mnist', DATA)
  val = ip.load_arrays('tiny_imagenet', 'validation', DATA, boxes=True)
  assert val.images.shape == (10_000, 64, 64, 3)
  assert np.bincount(val.labels).tolist() == [50] * 200
  ymin, xmin, ymax, xmax = val.boxes.T
  assert val.boxes.min() >= 0.0 and val.boxes.max() <= 1.0
  assert np.all(ymax > ymin) and np.all(xmax > xmin)
  # Boxes sit on the 64-pixel grid (the annotations are pixel corners).
  np.testing.assert_allclose(val.boxes * 64, np.round(val.boxes * 64),
                             atol=1e-4)
  # Subsets keep each image's own box.
  part = ip.first_per_class(val, 2)
  assert len(part) == 400
  idx = np.flatnonzero(val.labels == part.labels[0])[0]
  np.testing.assert_array_equal(part.boxes[0], val.boxes[idx])
  names = ip.class_names('tiny_imagenet', DATA)
  assert len(names) == 200 and names[0] == 'Egyptian cat'
  # Without boxes the classification reader is unchanged.
  assert ip.load_arrays('tiny_imagenet', 'validation[:3]', DATA).boxes is None


def test_classification_preset_trains_and_reports_top5(tmp_path):
  c = tiny_imagenet.get_config('resnet18_64,local')
  assert c.model_kwargs.to_dict() == {'num_filters': 16, 'stem_strides': 2}
  runs.train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  test = [r for r in rows if r['split'] == 'test']
  assert [r['step'] for r in test] == [2, 4]
  for r in test:
    assert r['top5_error'] <= r['error'] <= 1.0
    assert r['top5_error'] < 1.0 or r['error'] == 1.0
  # The full and cpu presets: one epoch of their batch per evaluation.
  full = tiny_imagenet.get_config('vgg_64')
  assert (full.batch_size, full.eval_every_steps) == (256, 196)
  assert full.num_train_steps == 60 * 196 and full.learning_rate == 0.2
  cpu = tiny_imagenet.get_config('plain18_64,cpu')
  assert cpu.num_train_steps == 12 * 391 and cpu.learning_rate == 0.1
  with pytest.raises(ValueError, match='unknown preset'):
    tiny_imagenet.get_config('resnet18_64,gpu')


def test_det_trunk_pretrained_at_32x32_fits_the_raccoon_detector(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from cnn.tasks.detection import model as model_lib  # pylint: disable=g-import-not-at-top
  from cnn.tasks.detection import task as det_task  # pylint: disable=g-import-not-at-top
  from configs import detection  # pylint: disable=g-import-not-at-top
  c = tiny_imagenet.get_config('det_trunk,local')
  assert c.image_size == 32 and not c.model_kwargs.to_dict()
  assert tiny_imagenet.get_config('resnet18_64,cpu').image_size == 0
  runs.train_and_evaluate(c, str(tmp_path / 'pre'))
  d = detection.get_config('fast_rcnn,raccoon')
  model, spec = model_lib.make_model(d, 1)
  task = det_task.DetectionTask(d)
  task.spec = spec
  fresh = task.init_variables(model, None, jax.random.PRNGKey(0))
  _, _, message = det_task.load_pretrained(
      str(tmp_path / 'pre'), fresh['params'], fresh['batch_stats'])
  # 6 conv kernels, 6 BN (scale, bias), fc1 and fc2 (kernel, bias).
  assert 'loaded 22 parameter arrays and 12 BatchNorm statistics' in message


def test_localization_on_real_boxes_end_to_end(tmp_path):
  c = loc_configs.get_config('local,tiny_imagenet')
  c.test_examples = 50
  c.train_examples = 128
  c.scales = (1.0, 1.25)
  run = str(tmp_path / 'run')
  final = runs.train_and_evaluate(c, run)['test']
  for k in ('loc_error', 'loc_error_top5', 'dense_loc_error',
            'dense_loc_error_top5', 'mean_box_loc_error', 'oracle_loc_error',
            'top5_error'):
    assert 0.0 <= final[k] <= 1.0, k
  assert final['loc_error_top5'] <= final['loc_error']
  assert final['dense_loc_error_top5'] <= final['dense_loc_error']
  # The class and the box must both be right: never below either error.
  assert final['loc_error'] >= max(final['error'],
                                   final['oracle_loc_error']) - 1e-9
  picture = tmp_path / 'p.png'
  runs.evaluate_checkpoint(run, picture=str(picture))
  assert picture.stat().st_size > 5000


def test_localization_needs_images_of_the_canvas_size(tmp_path):
  c = loc_configs.get_config('local,tiny_imagenet')
  c.canvas, c.train_examples, c.test_examples = 32, 8, 8
  with pytest.raises(ConfigError, match='canvas=64'):
    runs.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
