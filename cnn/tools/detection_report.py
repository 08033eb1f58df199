"""The detector comparison table and a picture of detections
(`experiments.detection_table`).

`comparison_table` reads the final test record of each detection run's
metrics.jsonl; `draw_detections` runs trained detectors on test canvases
and draws their boxes (matplotlib PNG; one detector's picture is the task's,
`cnn.tasks.detection.pictures`).
"""
from __future__ import annotations

import json
import os

import numpy as np

from cnn.training import metric_writers
from cnn.errors import ConfigError
from cnn.tasks.detection import pictures

# The lecture's table, as the lecture quotes it (R-CNN and Fast R-CNN by
# Girshick et al., Faster R-CNN by Ren et al.; VGG-16 on Pascal VOC 2007;
# test time per image including proposals): seconds, mAP. 66.0 / 66.9 are
# R-CNN's / Fast R-CNN's VOC 2007 test mAP trained on VOC 2007 (Girshick
# 2015, Table 1); the lecture repeats 66.9 for Faster R-CNN, whose paper
# reports 69.9 (trained on 07) and 73.2 (07+12) (Ren et al. 2015, Table 3).
LECTURE = {'rcnn': (50.0, 66.0), 'fast_rcnn': (2.0, 66.9),
           'faster_rcnn': (0.2, 66.9)}
NAMES = pictures.NAMES


def final_test(workdir: str) -> tuple[str, dict]:
  """(detector kind, last 'test' record) of a finished detection run."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'{workdir} holds no run (no config.json); train it '
                      'with python -m experiments.train '
                      '--config=configs/detection.py:KIND first')
  with open(path) as f:
    config = json.load(f)
  if config.get('task') != 'detection':
    raise ConfigError(f'{workdir} is not a detection run (task='
                      f"{config.get('task', 'classification')})")
  tests = [r for r in metric_writers.read_metrics(workdir)
           if r['split'] == 'test']
  if not tests:
    raise ConfigError(f'{workdir} has no test record yet: let its training '
                      'finish (rerun the same train command to resume)')
  return config['kind'], tests[-1]


def training_seconds(workdir: str) -> tuple[int, float | None]:
  """(steps, seconds of training) of a run: the run clock at its last
  training record less the evaluations before it (each from the training
  record of its step to the last held-out record of that step); None where
  the run has no clock."""
  records = metric_writers.read_metrics(workdir)
  train = [r for r in records if r['split'] == 'train']
  if not train or 'wall_seconds' not in train[-1]:
    return (train[-1]['step'] if train else 0), None
  at = {r['step']: r['wall_seconds'] for r in train}
  evals = {}
  for r in records:
    if r['split'] != 'train' and r['step'] in at and 'wall_seconds' in r:
      evals[r['step']] = max(evals.get(r['step'], 0.0),
                             r['wall_seconds'] - at[r['step']])
  last = train[-1]['step']
  return last, at[last] - sum(v for k, v in evals.items() if k < last)


def time_side_by_side(workdirs, num_images: int
                      ) -> list[tuple[float, float, float]]:
  """(proposal, network, NMS) seconds per image of each run's detector, measured
  in one process on the same test canvases, the detectors taking turns on
  each image so that machine noise hits them alike."""
  predictors, data = [], None
  for workdir in workdirs:
    run, predictor = _load(workdir)
    predictors.append(predictor)
    if data is None:
      data = run.data.evals['test']
  for p in predictors:
    p(data.images[0])  # compile outside the timed loop
  totals = np.zeros((len(predictors), 3))
  n = min(num_images, len(data))
  for image in data.images[:n]:
    for k, p in enumerate(predictors):
      totals[k] += p(image)[5:8]
  return [tuple(t) for t in totals / n]


def compare_nms(workdir: str, candidates, num_images: int) -> str:
  """Markdown: the detection NMS's time per image for each value of
  `inference.nms_candidates`, side by side on the same network outputs of
  the first test canvases (the variants taking turns on each), and whether
  each variant's detections equal the first's on every image."""
  import functools  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from cnn.tasks.detection import inference  # pylint: disable=g-import-not-at-top
  run, predictor = _load(workdir)
  data = run.data.evals['test']
  posts = [jax.jit(functools.partial(
      inference.postprocess, **dict(predictor.post_kwargs, candidates=c)))
           for c in candidates]
  inputs = [predictor.network(image)[:4]
            for image in data.images[:min(num_images, len(data))]]
  for post in posts:  # compile outside the timed loop
    jax.block_until_ready(post(*inputs[0]))
  seconds = np.zeros((len(posts), len(inputs)))
  same = [True] * len(posts)
  for i, x in enumerate(inputs):
    outs = []
    for k, post in enumerate(posts):
      t = time.perf_counter()
      outs.append(jax.block_until_ready(post(*x)))
      seconds[k, i] = time.perf_counter() - t
      same[k] &= all(np.array_equal(np.asarray(a), np.asarray(b))
                     for a, b in zip(outs[0], outs[k]))
  lines = [f'| nms_candidates ({workdir}, {len(inputs)} images) | NMS mean '
           '| NMS median | vs the first | detections equal the first\'s |',
           '|---|---|---|---|---|']
  for k, c in enumerate(candidates):
    lines.append(f'| {c} | {seconds[k].mean() * 1000:.1f} ms | '
                 f'{np.median(seconds[k]) * 1000:.1f} ms | '
                 f'{seconds[0].mean() / seconds[k].mean():.2f}x | '
                 f'{"yes" if same[k] else "NO"} |')
  return '\n'.join(lines)


def comparison_table(workdirs, timing_images: int = 0) -> str:
  """Markdown: mAP@0.5, time per image and speed-up vs R-CNN, beside the
  lecture's figures.

  mAP and proposal recall come from each run's final test record; the times
  too, unless `timing_images` > 0: then they are measured again side by side
  (`time_side_by_side`) on that many test canvases.
  """
  rows = [final_test(w) for w in workdirs]
  training = [training_seconds(w) for w in workdirs]
  if timing_images:
    for (_, r), (tp, tn, tm) in zip(rows, time_side_by_side(workdirs,
                                                            timing_images)):
      r.update(proposal_seconds=tp, network_seconds=tn, nms_seconds=tm,
               seconds_per_image=tp + tn + tm)
  base = next((r['seconds_per_image'] for k, r in rows if k == 'rcnn'), None)
  lines = ['| detector | mAP@0.5 | test time / image | proposals | network '
           '| NMS | speed-up vs R-CNN | proposal recall@0.5 | training '
           '| lecture: time / image | lecture: speed-up | lecture: mAP (VOC '
           '2007) |', '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for (kind, r), (steps, secs) in zip(rows, training):
    trained = (f'{secs / 60:.1f} min / {steps} steps' if secs is not None
               else f'? / {steps} steps')
    t = r['seconds_per_image']
    speed = f'{base / t:.1f}x' if base else '-'
    lec_t, lec_map = LECTURE[kind]
    # Runs recorded before NMS was timed apart have it in their network.
    nms = (f'{r["nms_seconds"] * 1000:.1f} ms' if 'nms_seconds' in r
           else 'in network')
    lines.append(
        f'| {NAMES[kind]} | {r["map"]:.3f} | {t * 1000:.1f} ms | '
        f'{r["proposal_seconds"] * 1000:.1f} ms | '
        f'{r["network_seconds"] * 1000:.1f} ms | {nms} | {speed} | '
        f'{r["proposal_recall"]:.3f} | {trained} | {lec_t:g} s | '
        f'{LECTURE["rcnn"][0] / lec_t:.0f}x | {lec_map} |')
  return '\n'.join(lines)


def _load(workdir: str):
  """(run, Predictor) of a detection run's latest checkpoint."""
  from cnn.tasks.detection import inference  # pylint: disable=g-import-not-at-top
  from cnn import runs  # pylint: disable=g-import-not-at-top
  run, state, _ = runs.restore_run(workdir)
  if run.task.name != 'detection':
    raise ConfigError(f'{workdir} is not a detection run (task='
                      f'{run.task.name})')
  return run, inference.Predictor(run.model, state.variables, run.config,
                                  run.task.spec)


def draw_detections(workdirs, path: str, num_images: int = 4,
                    min_score: float = 0.3, dpi: int = 90) -> None:
  """One row per detection run: its detections on the first test canvases."""
  fig, axes = pictures.figure(len(workdirs), num_images)
  for row, workdir in enumerate(workdirs):
    run, predictor = _load(workdir)
    pictures.draw_row(axes[row], run.config, predictor,
                      run.data.evals['test'], min_score)
  pictures.save(fig, path, min_score, dpi)
