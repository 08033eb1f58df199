r"""Trains and evaluates a classification + localization model.

  python -m experiments.localize --config=configs/localization.py:classify \
    --workdir=runs/loc_classify [--config.FIELD=VALUE ...] [--picture=PNG]

Prints the test metrics: classification error, mean IoU, IoU >= 0.5 rate,
single-window and multi-scale dense, beside the mean-box baseline. With
--picture, draws test images with the class-score map of the dense pass
overlaid and the predicted (dense) and true boxes.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'configs/localization.py:STAGE', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (resumed).')
_PICTURE = flags.DEFINE_string('picture', None, 'Write a PNG of predictions.')
_SCALE = flags.DEFINE_float('picture_scale', 1.5,
                            'Scale whose score map the picture overlays.')
flags.mark_flags_as_required(['config', 'workdir'])

_ROWS = (('error', 'dense_error'), ('mean_iou', 'dense_mean_iou'),
         ('iou50', 'dense_iou50'))


def _table(res: dict) -> str:
  lines = ['| metric | single window | dense multi-scale | mean-box baseline |',
           '|---|---|---|---|']
  for single, dense in _ROWS:
    base = res.get('mean_box_' + single, None)
    lines.append(f'| {single} | {res[single]:.4f} | '
                 f'{res.get(dense, float("nan")):.4f} | '
                 f'{"-" if base is None else f"{base:.4f}"} |')
  return '\n'.join(lines)


def picture(config, workdir: str, path: str, scale: float, n: int = 6):
  """Test canvases with the dense score map of the true class and boxes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnn import localization as loc  # pylint: disable=g-import-not-at-top
  from cnn import synthetic_localization as synth  # pylint: disable=g-import-not-at-top

  data = synth.load(config.source, config.test_split, config.data_dir,
                    canvas=config.canvas, seed=config.seed,
                    background=config.background, limit=n).materialize()
  from cnn import input_pipeline  # pylint: disable=g-import-not-at-top
  num_classes = input_pipeline.dataset_info(config.source, config.data_dir)[0]
  model, stride = loc.make_model(config, num_classes)
  params = loc._params_from(workdir, model, config)  # pylint: disable=protected-access
  probs, _ = loc.dense_maps(model, params, data.images, scale, config.canvas,
                            stride)
  classes, boxes = loc.dense_predict(
      model, params, data.images, window=config.canvas, stride=stride,
      scales=tuple(config.scales), merge=config.merge,
      merge_threshold=config.merge_threshold, batch_size=n)
  side = int(round(np.sqrt(probs.shape[1])))
  fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.6))
  for i, ax in enumerate(np.atleast_1d(axes)):
    ax.imshow(data.images[i])
    heat = np.asarray(probs[i, :, data.labels[i]]).reshape(side, side)
    # Each cell sits at its window's centre, mapped back to the canvas.
    t, half = config.canvas, stride / (2 * scale)
    c0, c1 = t / (2 * scale), (t / 2 + (side - 1) * stride) / scale
    ax.imshow(heat, cmap='jet', alpha=0.35, vmin=0, vmax=1,
              extent=(c0 - half, c1 + half, c1 + half, c0 - half))
    ax.set_xlim(0, t)
    ax.set_ylim(t, 0)
    for (x, y, w, h), color in ((data.boxes[i], 'lime'), (boxes[i], 'red')):
      ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color=color, lw=2))
    ax.set_title(f'true {data.labels[i]} / pred {classes[i]}', fontsize=8)
    ax.axis('off')
  fig.suptitle(f'green: true box, red: dense prediction; heat: p(true class) '
               f'at scale {scale}', fontsize=8)
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from cnn import localization  # pylint: disable=g-import-not-at-top

  def run():
    res = localization.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(_table(res))
    print(f'examples {int(res["examples"])}, dense evaluation at scales '
          f'{tuple(_CONFIG.value.scales)}, merge {_CONFIG.value.merge}')
    if _PICTURE.value:
      picture(_CONFIG.value, _WORKDIR.value, _PICTURE.value, _SCALE.value)
      print(f'picture: {_PICTURE.value}')
  common.run(run)


if __name__ == '__main__':
  app.run(main, flags_parser=common.parse_flags)
