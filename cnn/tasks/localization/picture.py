"""A picture of localization predictions on test canvases."""
import numpy as np

from cnn.tasks.localization import dense


def draw(config, model, params, stride: int, test, path: str,
         scale: float = 1.5, n: int = 6, names=None) -> None:
  """Test canvases with the dense score map of the true class and boxes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  data = test
  n = min(n, len(data.images))
  data_images = data.images[:n]
  probs, _ = dense.dense_maps(model, params, data_images, scale,
                              config.canvas, stride)
  classes, boxes = dense.dense_predict(
      model, params, data_images, window=config.canvas, stride=stride,
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
    name = (lambda c: names[c][:18]) if names else str
    ax.set_title(f'true {name(data.labels[i])}\npred {name(classes[i])}',
                 fontsize=7)
    ax.axis('off')
  fig.suptitle(f'green: true box, red: dense prediction; heat: p(true class) '
               f'at scale {scale}', fontsize=8)
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)
