"""A detector's detections drawn on test canvases (matplotlib PNG):
`draw`, the detection task's picture (`experiments.evaluate --picture`)."""
from __future__ import annotations

NAMES = {'rcnn': 'R-CNN', 'fast_rcnn': 'Fast R-CNN',
         'faster_rcnn': 'Faster R-CNN'}


def draw_row(axes, config, predictor, data, min_score: float) -> None:
  """Test canvases with one detector's detections (red, class and score)
  and the ground truth (green)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from cnn.data import input_pipeline  # pylint: disable=g-import-not-at-top
  if config.dataset == 'voc':
    names = [str(k) for k in range(20)]
  elif config.dataset != 'synthetic':  # photographs: the dataset's names
    from cnn.data import objects  # pylint: disable=g-import-not-at-top
    names = objects.class_names(config.dataset, config.data_dir)
  else:
    names = input_pipeline.class_names(config.source, config.data_dir)
  for col, ax in enumerate(axes):
    ax.imshow(data.images[col])
    n = int(data.num_objects[col])
    for (x, y, w, h), k in zip(data.boxes[col][:n], data.classes[col][:n]):
      ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color='lime',
                                 lw=1.5))
      ax.text(x, y + h + 1, names[k], color='black', fontsize=6,
              va='top', bbox=dict(facecolor='lime', alpha=0.6, pad=0.5,
                                  lw=0))
    b, s, c = predictor(data.images[col])[:3]
    for (x, y, w, h), score, k in zip(b, s, c):
      if score < min_score:
        continue
      ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color='red',
                                 lw=1.5))
      ax.text(x, y - 1, f'{names[k]} {score:.2f}', color='white',
              fontsize=6, bbox=dict(facecolor='red', alpha=0.6, pad=0.5,
                                    lw=0))
    ax.set_xlim(0, config.canvas)
    ax.set_ylim(config.canvas, 0)
    ax.axis('off')
    if col == 0:
      ax.set_title(NAMES[config.kind], fontsize=9, loc='left')


def save(fig, path: str, min_score: float, dpi: int) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.suptitle(f'green: ground truth (class below), red: detections with '
               f'score >= {min_score}', fontsize=9)
  fig.savefig(path, dpi=dpi, bbox_inches='tight')
  plt.close(fig)


def figure(rows: int, cols: int):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows),
                      squeeze=False)


def draw(config, model, variables, spec, data, path: str,
         num_images: int = 4, min_score: float = 0.3, dpi: int = 90) -> None:
  """One detector's detections on the first test canvases."""
  from cnn.tasks.detection import inference  # pylint: disable=g-import-not-at-top
  fig, axes = figure(1, num_images)
  predictor = inference.Predictor(model, variables, config, spec)
  draw_row(axes[0], config, predictor, data, min_score)
  save(fig, path, min_score, dpi)
