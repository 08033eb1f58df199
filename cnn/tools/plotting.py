"""Figures and tables from run folders: He et al. Figure 6 and Table 6.

Everything is read from the runs' `metrics.jsonl` and `config.json` (and,
for the filter grid, a checkpoint), so a sweep can be plotted while it is
still running. Figures are matplotlib `Figure` objects (Agg backend, no
display needed); `save` writes them as PNG.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

import matplotlib
import numpy as np

from cnn.tools import sweeps
from cnn.errors import ConfigError
from cnn.training import run_folder
from cnn.training.metric_writers import read_metrics

matplotlib.use('Agg')  # Before pyplot: files only, never a window.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

# He et al. 2015, Table 6 (CIFAR-10 test error %, parameters in millions).
# The plain nets have no table entry: the paper shows them in Figure 6 only.
PAPER_TABLE6 = {
    ('resnet', 20): (8.75, 0.27),
    ('resnet', 32): (7.51, 0.46),
    ('resnet', 44): (7.17, 0.66),
    ('resnet', 56): (6.97, 0.85),
    ('resnet', 110): (6.43, 1.7),
    ('resnet', 1202): (7.93, 19.4),
}
_MODEL_RE = re.compile(r'^cifar_(plain|resnet)(\d+)$')
KIND_TITLES = {'plain': 'plain', 'resnet': 'ResNet'}


@dataclasses.dataclass
class Run:
  """One run folder: its name, config, records and the (kind, depth) it is.

  `kind` is 'plain' or 'resnet' for the CIFAR nets of He et al., else the
  model name; `depth` is 0 when it cannot be read off the model name.
  """
  name: str
  directory: str
  config: dict
  records: list

  @property
  def model(self) -> str:
    return self.config.get('model', '?')

  @property
  def kind(self) -> str:
    m = _MODEL_RE.match(self.model)
    return m.group(1) if m else self.model

  @property
  def depth(self) -> int:
    m = _MODEL_RE.match(self.model)
    return int(m.group(2)) if m else 0

  @property
  def seed(self) -> int:
    return int(self.config.get('seed', 0))

  @property
  def stem(self) -> str:
    """The name without its seed suffix: `plain20_s1` -> `plain20`."""
    return re.sub(r'_s\d+$', '', self.name)


def load_runs(workdir: str, only: str | None = None) -> list[Run]:
  """The run folders directly under `workdir` that have logged metrics.

  Args:
    workdir: a sweep folder.
    only: a regular expression; only runs whose name it matches (re.search).
  """
  if not os.path.isdir(workdir):
    raise ConfigError(f'{workdir} is not a folder; pass the --workdir of a '
                      'sweep')
  try:
    pattern = re.compile(only or '')
  except re.error as e:
    raise ConfigError(f"--only='{only}' is not a regular expression ({e})"
                      ) from None
  runs = []
  for name in sorted(os.listdir(workdir)):
    if not pattern.search(name):
      continue
    d = os.path.join(workdir, name)
    cfg_path = os.path.join(d, 'config.json')
    if not os.path.isfile(cfg_path):
      continue
    records = read_metrics(d)
    if not records:
      continue
    runs.append(Run(name, d, run_folder.read_config(d), records))
  if not runs:
    raise ConfigError(f'no run with metrics.jsonl under {workdir}'
                      f"{f' matching {only!r}' if only else ''}; run "
                      'experiments.sweep first (or point at a sweep folder)')
  return sorted(runs, key=lambda r: (r.kind, r.depth, r.seed, r.name))


def _groups(runs: list[Run]) -> dict[tuple[str, int, str], list[Run]]:
  """Runs by (kind, depth, stem); runs named `<stem>_s<seed>` are seeds of
  one net and are averaged, other stems (e.g. lr schedules) stay apart."""
  out: dict[tuple[str, int, str], list[Run]] = {}
  for r in runs:
    out.setdefault((r.kind, r.depth, r.stem), []).append(r)
  return out


def _shared(kind: str, depth: int, groups) -> bool:
  """Whether several nets (stems) have this kind and depth."""
  return sum(1 for (k, d, _) in groups if (k, d) == (kind, depth)) > 1


def _label(kind: str, depth: int, stem: str, groups) -> str:
  """'ResNet-20', or 'ResNet-20 <stem>' when several nets share it."""
  name = f'{KIND_TITLES.get(kind, kind)}-{depth}' if depth else kind
  return f'{name} {stem}' if _shared(kind, depth, groups) else name


def mean_curve(runs: list[Run], split: str) -> tuple[np.ndarray, np.ndarray]:
  """Steps and the seed-mean error (%) over the steps all runs reached."""
  curves = [dict(zip(*sweeps.curves(r.records, split))) for r in runs]
  common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
  steps = np.asarray(common, np.int64)
  values = np.asarray([[c[s] for s in common] for c in curves], np.float64)
  return steps, 100.0 * values.mean(axis=0) if len(common) else np.zeros(0)


def _binned(x: np.ndarray, y: np.ndarray, points: int = 200
            ) -> tuple[np.ndarray, np.ndarray]:
  """At most ~`points` points: consecutive log points averaged (a run that
  logged its training error every step would draw a band of batch noise;
  the paper draws a curve). Shorter curves are returned as they are."""
  if len(x) <= 2 * points:
    return x, y
  k = len(x) // points
  n = len(x) // k * k
  return (x[:n].reshape(-1, k)[:, -1],
          y[:n].reshape(-1, k).mean(axis=1))


def figure6(runs: list[Run], title: str | None = None) -> plt.Figure:
  """He et al. Figure 6: plain nets left, ResNets right.

  x = iterations, y = error %; dashed = training error, bold = test error
  (the held-out split when there is no test record); one colour per depth,
  the same colour for a depth on both panels, the same y-range on both.
  Several seeds of one net are averaged; a training curve of more than 400
  log points is averaged down to about 200.
  """
  groups = _groups(runs)
  # One colour per depth, shared by both panels; per net when several nets
  # of one depth share a panel (e.g. a sweep over schedules).
  by_depth = not any(_shared(k, d, groups) for (k, d, _) in groups)
  keys = sorted({d if by_depth else (d, stem) for (_, d, stem) in groups})
  cmap = plt.get_cmap('tab10')
  colours = {key: cmap(i % 10) for i, key in enumerate(keys)}
  colour = lambda d, stem: colours[d if by_depth else (d, stem)]
  # Plain nets left, ResNets right; a sweep of other nets (LeNet-5 seeds)
  # gets one panel per kind instead of two empty ones.
  kinds = ('plain', 'resnet')
  if not any(k in kinds for (k, _, _) in groups):
    kinds = tuple(sorted({k for (k, _, _) in groups}))
  fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4),
                           sharey=True, squeeze=False)
  axes = axes[0]
  lo, hi = math.inf, -math.inf
  for ax, kind in zip(axes, kinds):
    for (k, depth, stem), members in sorted(groups.items()):
      if k != kind:
        continue
      label = _label(kind, depth, stem, groups)
      seeds = f' ({len(members)} seeds)' if len(members) > 1 else ''
      split = sweeps.eval_split(members[0].records) or 'test'
      x, y = _binned(*mean_curve(members, 'train'))
      if len(x):
        ax.plot(x, y, '--', color=colour(depth, stem), linewidth=1)
        lo, hi = min(lo, y.min()), max(hi, y.max())
      x, y = mean_curve(members, split)
      if len(x):
        ax.plot(x, y, '-', color=colour(depth, stem), linewidth=2.5,
                label=label + seeds)
        lo, hi = min(lo, y.min()), max(hi, y.max())
    ax.set_title({'plain': 'plain nets', 'resnet': 'ResNets'}.get(kind, kind))
    ax.set_xlabel('iterations')
    ax.grid(alpha=0.3)
    # Style key first, then one entry per depth, as in the paper.
    handles, labels = ax.get_legend_handles_labels()
    style = [plt.Line2D([], [], color='grey', linestyle='--', linewidth=1),
             plt.Line2D([], [], color='grey', linewidth=2.5)]
    ax.legend(style + handles, ['training error', 'test error'] + labels,
              loc='best', fontsize=8)
  axes[0].set_ylabel('error (%)')
  for ax in axes[1:]:
    ax.tick_params(labelleft=True)
  if math.isfinite(lo):
    pad = 0.05 * max(hi - lo, 1.0)
    axes[0].set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def lr_figure(run: Run) -> plt.Figure:
  """Learning rate over iterations (log scale): where steps/plateaus cut it."""
  x, y = sweeps.curves(run.records, 'train', 'learning_rate')
  fig, ax = plt.subplots(figsize=(5, 3))
  # A record at step s holds the rate of the log window ending at s, so the
  # value belongs to the interval before it ('pre'): a cut at 300 shows there.
  ax.step(x, y, where='pre', color='C0')
  ax.set_yscale('log')
  ax.set_xlabel('iterations')
  ax.set_ylabel('learning rate')
  ax.set_title(f'{run.name}: {run.config.get("lr_schedule", "?")} schedule')
  ax.grid(alpha=0.3, which='both')
  fig.tight_layout()
  return fig


def first_conv_kernel(directory: str, checkpoint: str | int = 'latest'
                      ) -> tuple[np.ndarray, str, int]:
  """The first conv layer's kernel (H, W, C_in, K) from a run's checkpoint.

  Returns:
    The kernel, its parameter path (e.g. 'stem/conv') and the step.
  """
  from cnn.training import checkpointing  # pylint: disable=g-import-not-at-top
  from cnn.tools import summary  # pylint: disable=g-import-not-at-top
  config = run_folder.read_config(directory)
  if config is None:
    raise ConfigError(f'{directory} holds no run (no config.json)')
  ckpt = checkpointing.Checkpointer(os.path.join(directory, 'checkpoints'),
                                    read_only=True)
  step = ckpt.resolve(checkpoint)
  # Call order, not the checkpoint's sorted keys, says which conv is first.
  rows = summary.summarize(config['model'],
                           num_classes=config.get('num_classes') or 10)
  path = next((r.path for r in rows if r.kind == 'Conv'), None)
  if path is None:
    raise ConfigError(f"model '{config['model']}' has no conv layer")
  try:
    state = ckpt.restore_tree(step)
  finally:
    ckpt.close()
  node = state['params']
  for key in path.split('/'):
    node = node[key]
  return np.asarray(node['kernel'], np.float32), path, step


def filters_figure(kernel: np.ndarray, title: str = '') -> plt.Figure:
  """A grid of a conv kernel's filters (H, W, C_in, K) as small images.

  Each filter is min-max scaled on its own (the lecture's convention), as
  RGB for 3 input channels, grey otherwise (channel mean).
  """
  k = kernel.shape[-1]
  cols = int(math.ceil(math.sqrt(k)))
  rows = int(math.ceil(k / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4),
                           squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.set_axis_off()
    if i >= k:
      continue
    f = kernel[..., i]
    f = (f - f.min()) / max(float(f.max() - f.min()), 1e-12)
    if f.shape[-1] == 3:
      ax.imshow(f, interpolation='nearest')
    else:
      ax.imshow(f.mean(axis=-1), cmap='gray', interpolation='nearest')
  if title:
    fig.suptitle(title, fontsize=8)
  return fig


def _fmt(values: list[float]) -> str:
  """'x.xx' for one value, 'mean ± std' (sample std) for several."""
  if not values:
    return '-'
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}'


def table6(runs: list[Run]) -> str:
  """Markdown: per net, parameters and final/best test error (%) beside the
  paper's Table 6. Errors are mean ± std over seeds (sample std)."""
  from cnn.tools import summary  # pylint: disable=g-import-not-at-top
  lines = ['| net | depth | params | runs | iterations | final training '
           'error % | final test error % | best test error % | paper test '
           'error % (params) |',
           '|---|---|---|---|---|---|---|---|---|']
  groups = _groups(runs)
  for (kind, depth, stem), members in sorted(groups.items()):
    model = members[0].model
    try:
      params = sum(r.params for r in summary.summarize(
          model, num_classes=members[0].config.get('num_classes') or 10))
      params = f'{params / 1e6:.2f}M'
    except ValueError:
      params = '?'
    final, best, train, steps = [], [], [], set()
    for r in members:
      split = sweeps.eval_split(r.records)
      if split:
        _, ys = sweeps.curves(r.records, split)
        final.append(100 * ys[-1])
        best.append(100 * min(ys))
      _, ys = sweeps.curves(r.records, 'train')
      if ys:
        train.append(100 * ys[-1])
      steps.add(max(x['step'] for x in r.records))
    paper = PAPER_TABLE6.get((kind, depth))
    paper = f'{paper[0]:.2f} ({paper[1]}M)' if paper else '-'
    its = '/'.join(str(s) for s in sorted(steps))
    net = KIND_TITLES.get(kind, kind)
    if _shared(kind, depth, groups):
      net += f' {stem}'
    lines.append(f'| {net} | {depth or "-"} | '
                 f'{params} | {len(members)} | {its} | {_fmt(train)} | '
                 f'{_fmt(final)} | {_fmt(best)} | {paper} |')
  return '\n'.join(lines) + '\n'


def save(fig: plt.Figure, path: str, dpi: int = 80) -> str:
  """Writes `fig` as PNG and closes it (figures hold memory until closed)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def _filters_run(runs: list[Run], name: str | None) -> Run | None:
  with_ckpt = [r for r in runs if sweeps.checkpoint_steps(r.directory)]
  if name:
    chosen = [r for r in with_ckpt if r.name == name]
    if not chosen:
      raise ConfigError(f"--filters_run='{name}' is not a run with a "
                        'checkpoint; choose one of '
                        f'{", ".join(r.name for r in with_ckpt) or "(none)"}')
    return chosen[0]
  if not with_ckpt:
    return None
  # The deepest ResNet (the paper's subject), else the deepest of any kind.
  return max(with_ckpt, key=lambda r: (r.kind == 'resnet', r.depth, -r.seed))


def write_all(workdir: str, out: str | None = None, dpi: int = 80,
              filters_run: str | None = None, checkpoint: str = 'latest',
              only: str | None = None) -> tuple[list[str], str]:
  """Writes figure6.png, table6.md, lr_<run>.png and filters.png.

  Args:
    workdir: a sweep folder (one subfolder per run).
    out: where to write (default: `workdir`).
    dpi: resolution of the PNGs (the filter grid gets at least 100).
    filters_run: the run whose first conv filters to draw; default: the
      deepest ResNet with a checkpoint (no filters.png when none has one).
    checkpoint: that run's checkpoint: 'latest', 'best' or a step.
    only: a regular expression selecting runs by name (default: all).

  Returns:
    The paths written and the Markdown table.
  """
  runs = load_runs(workdir, only)
  out = out or workdir
  os.makedirs(out, exist_ok=True)
  # A study's kept records (results/STUDY/runs) are titled by the study.
  name = os.path.basename(os.path.abspath(workdir))
  if name == 'runs':
    name = os.path.basename(os.path.dirname(os.path.abspath(workdir)))
  written = [save(figure6(runs, title=name), os.path.join(out, 'figure6.png'),
                  dpi)]
  table = table6(runs)
  path = os.path.join(out, 'table6.md')
  with open(path, 'w') as f:
    f.write(table)
  written.append(path)
  for r in runs:
    written.append(save(lr_figure(r), os.path.join(out, f'lr_{r.name}.png'),
                        dpi))
  run = _filters_run(runs, filters_run)
  if run is not None:
    kernel, layer, step = first_conv_kernel(run.directory, checkpoint)
    h, w, c, k = kernel.shape
    written.append(save(
        filters_figure(kernel, f'{run.name} {layer}, step {step}:\n'
                       f'{k} filters {h}x{w}x{c}'),
        os.path.join(out, 'filters.png'), max(dpi, 100)))
  return written, table
