"""Adding a task touches no loop: per-pixel segmentation of the synthetic
localization canvases (object pixels get their class + 1, the rest 0),
registered from here and trained by the one loop."""
import types

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
from ml_collections import config_dict

from cnn import tasks
from cnn.data import synthetic_localization as synth
from cnn.tasks import base
from cnn.tasks.localization.task import Canvases
from cnn import runs
from cnn.training import checkpointing, metric_writers
from configs import common


class Segmenter(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Conv(11, (1, 1))(x)  # background + 10 classes, every pixel


def targets(batch):
  """(B, S, S) labels: class + 1 inside the object's box, 0 outside."""
  s = batch['image'].shape[1]
  x, y, w, h = (batch['box'][:, k, None, None] for k in range(4))
  ys, xs = jnp.arange(s)[None, :, None], jnp.arange(s)[None, None, :]
  inside = (xs >= x) & (xs < x + w) & (ys >= y) & (ys < y + h)
  return jnp.where(inside, batch['label'][:, None, None] + 1, 0)


class SegmentationTask(base.Task):
  metric, metric_mode, eval_keys = 'pixel_error', 'min', ('pixel_error',)

  def load_data(self, workdir, train=True):
    load = lambda split: synth.load('cifar10', split, None, canvas=32,
                                    limit=16)
    test = load('test').materialize()
    return types.SimpleNamespace(
        train=Canvases(load('train')),
        evals={'test': {'image': test.images, 'label': test.labels,
                        'box': test.boxes}})

  def make_model(self, data):
    return Segmenter()

  def init_variables(self, model, data, rng):
    return model.init(rng, jnp.zeros((1, 32, 32, 3)))

  def loss_fn(self, model, data):
    def loss_fn(params, model_state, batch, rng):
      logits = model.apply({'params': params}, batch['image'] / 255.0)
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, targets(batch)).mean()
      return loss, ({'pixel_error': jnp.mean(
          jnp.argmax(logits, -1) != targets(batch))}, model_state)
    return loss_fn

  def evaluate(self, model, variables, data, split, *, final, shard):
    batch = data.evals[split]
    logits = model.apply(variables, batch['image'] / 255.0)
    wrong = np.asarray(jnp.argmax(logits, -1) != targets(batch))
    return {'pixel_error': float(wrong.mean()), 'examples': len(wrong)}


def test_a_new_task_trains_on_the_one_loop(tmp_path):
  tasks.register('segmentation', SegmentationTask)
  c = common.add_training_fields(
      config_dict.ConfigDict({'task': 'segmentation', 'model': 'seg',
                                   'dataset': 'canvases', 'data_dir': ''}),
      batch_size=4, num_train_steps=4, learning_rate=0.1, weight_decay=0.0,
      eval_every_steps=2, checkpoint_every_steps=2, log_every_steps=1,
      keep_checkpoints=1)
  c.tensorboard = False
  with tfds.testing.mock_data(num_examples=16):
    final = runs.train_and_evaluate(c, str(tmp_path))
  recs = metric_writers.read_metrics(str(tmp_path))
  assert [r['step'] for r in recs if r['split'] == 'train'] == [1, 2, 3, 4]
  held_out = [r['pixel_error'] for r in recs if r['split'] == 'test']
  assert len(held_out) == 2 and held_out[-1] == final['test']['pixel_error']
  # The loop's checkpoints: the last one plus the best by pixel_error.
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'),
                                    read_only=True)
  assert ckpt.latest_step() == 4
  assert ckpt.best_step() == (2, 4)[int(np.argmin(held_out))]
  ckpt.close()
