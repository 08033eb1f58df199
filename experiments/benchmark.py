r"""Speed and memory of training and evaluation for one model.

  python -m experiments.benchmark --config=configs/cifar10.py:cifar_resnet20 \
    [--batch_size=128] [--steps=20] [--dtype=bfloat16] [--torch] \
    [--compare=dtype|fusion|conv|engine|onednn]

prints a table: compile time, train images/s (median of --steps steps after
warm-up, on synthetic uint8 batches through the library's real train step:
on-device crop/flip, forward, backward, SGD), eval images/s, peak memory,
FLOPs per image (forward, `cnn.tools.summary`) and the achieved GFLOP/s of
training (3x forward: forward + two backward convolutions), then the input
pipeline's own rate (`TrainBatches` + host->device copy on the real
`cifar10_jpeg` when present) and its ratio to the training rate.

`--torch` times the PyTorch twin of the net (`experiments/torch_reference.py`,
needs `pip install '.[torch]'`) in the same run, interleaved step by step with
JAX, and prints the ratio JAX/PyTorch. `--compare=dtype` puts float32 and
bfloat16 side by side; `--compare=fusion` the train step compiled without
XLA:CPU's fusion pass (`--config.xla_cpu_fusion=off`) against with it
(`on`), both with the convolution engine in effect (CPU only; the library's
default, auto, keeps the pass with oneDNN's convolutions and with the
chunked weight gradient on YNNPACK's); `--compare=conv` XLA's own convolution weight
gradient against the library's, summed over batch chunks chosen per shape
by measurement (`cnn.ops.conv`); `--compare=engine` XLA:CPU's convolution
kernels, YNNPACK (XLA's default) against Eigen (`--config.xla_cpu_conv=eigen`),
train and eval steps alike; `--compare=onednn` XLA's convolution (the
library's, as above) against oneDNN's (`cnn.ops.onednn`, `config.conv`).
Variants are timed round-robin, one step each
per round, so that load from other processes hits them alike.

`--layers` prints the per-layer view instead: every distinct convolution of
the model at the train batch, its forward pass, input gradient and weight
gradient in ms, as XLA computes them from jit arguments and (stride 1) the
weight gradient as shifted GEMMs (`benchmarking.shifted_weight_grad`), the
library's chunked weight gradient with its measured chunk count, and
oneDNN's three kernels through XLA's FFI (`cnn.ops.onednn`, where built),
beside PyTorch's with --torch; with the count of layers of each shape, so the sum
says where a step's convolution time goes.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and argument, e.g. configs/cifar10.py:MODEL.',
    lock_config=True)
_BATCH = flags.DEFINE_integer('batch_size', None, 'Training batch (default: '
                              "the config's).")
_EVAL_BATCH = flags.DEFINE_integer('eval_batch_size', None, 'Eval batch '
                                   "(default: the config's).")
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compiling.')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                           "Compute dtype (default: the config's).")
_TORCH = flags.DEFINE_bool('torch', False, 'Also time the PyTorch reference '
                           'and print the ratio.')
_CHANNELS_LAST = flags.DEFINE_bool('torch_channels_last', False,
                                   'PyTorch in channels-last memory format.')
_COMPARE = flags.DEFINE_enum('compare', None,
                             ['dtype', 'fusion', 'conv', 'engine', 'onednn'],
                             'Two JAX variants side by side: float32 vs '
                             'bfloat16, XLA default fusion vs the '
                             "library's CPU options, XLA's weight "
                             "gradient vs the library's measured one, or "
                             'YNNPACK vs Eigen convolutions (XLA:CPU).')
_LAYERS = flags.DEFINE_bool('layers', False, 'Per-layer view: each conv '
                            'shape forward / input grad / weight grad.')
_PIPELINE_BATCHES = flags.DEFINE_integer('pipeline_batches', 200, 'Batches '
                                         'timed for the input pipeline (0: '
                                         'skip).')
_DATASET = flags.DEFINE_string('dataset', 'cifar10_jpeg', 'TFDS dataset for '
                               'the input-pipeline rate (random images when '
                               'it is absent).')
_DATA_DIR = flags.DEFINE_string('data_dir', '../shared/data/tfds', 'TFDS '
                                'data_dir of --dataset.')
flags.mark_flags_as_required(['config'])

MIB = 1 << 20


def _fmt(v, digits=1):
  if v is None:
    return 'n/a'
  if isinstance(v, str):
    return v
  return f'{v:,.{digits}f}'


def _print_table(header, rows):
  widths = [max(len(str(r[i])) for r in [header] + rows)
            for i in range(len(header))]
  for k, r in enumerate([header] + rows):
    print('  '.join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths))))
    if k == 0:
      print('  '.join('-' * w for w in widths))


def _pipeline_data(config, image_shape, num_classes):
  """The real training split when it is on disk, else random images."""
  from cnn.tools import benchmarking  # pylint: disable=g-import-not-at-top
  from cnn.data import input_pipeline  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(_DATA_DIR.value)
  if os.path.isdir(os.path.join(data_dir, _DATASET.value)):
    data = input_pipeline.load_arrays(_DATASET.value, config.train_split,
                                      data_dir)
    return data, _DATASET.value
  return (benchmarking.synthetic_arrays(50_000, image_shape, num_classes),
          'random uint8 (no ' + _DATASET.value + ')')


def benchmark(config):
  """Builds, times and prints; returns the table rows (for callers)."""
  from cnn import tasks  # pylint: disable=g-import-not-at-top
  from cnn.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from cnn import runs  # pylint: disable=g-import-not-at-top

  task = tasks.get(config)
  if task.name != 'classification':
    raise ConfigError(f"the benchmark times classifiers; task='{task.name}' "
                      'is not one: use a configs/cifar10.py model')
  runs.validate_config(config, task)
  # The config's numerics (conv, conv_weight_grad, xla_cpu_conv,
  # xla_cpu_fusion), under the variants' own choices.
  with runs.numerics(config):
    return _benchmark(config)


def _benchmark(config):
  import statistics  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnn.tools import benchmarking as bm  # pylint: disable=g-import-not-at-top
  from cnn.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from cnn.ops import conv as conv_ops  # pylint: disable=g-import-not-at-top
  from cnn.ops import compiler  # pylint: disable=g-import-not-at-top

  bs = config.batch_size if _BATCH.value is None else _BATCH.value
  ebs = (config.eval_batch_size if _EVAL_BATCH.value is None
         else _EVAL_BATCH.value)
  if bs < 1 or ebs < 1 or _STEPS.value < 1:
    raise ConfigError('--batch_size, --eval_batch_size and --steps must be '
                      'positive')
  dtype = _DTYPE.value or config.dtype
  if _LAYERS.value:
    return _layers(config, bs)

  # Variants: name -> kwargs of jax_setup.
  if _COMPARE.value == 'dtype':
    variants = {'jax float32': dict(dtype='float32'),
                'jax bfloat16': dict(dtype='bfloat16')}
  elif _COMPARE.value == 'fusion':
    if jax.default_backend() != 'cpu':
      raise ConfigError("--compare=fusion times XLA:CPU's fusion pass; on "
                        f'{jax.default_backend()} the train step keeps '
                        "XLA's defaults: leave --compare out")
    # The same convolution engine on both sides; only the fusion pass differs.
    engine_options = conv_ops.engine_compiler_options() or {}
    variants = {'jax fusion-off': dict(dtype=dtype, compiler_options={
        **engine_options, **compiler.CPU_COMPILER_OPTIONS}),
                'jax fusion-on': dict(dtype=dtype,
                                      compiler_options=engine_options or None)}
  elif _COMPARE.value == 'conv':
    variants = {'jax xla-dW': dict(dtype=dtype, conv_policy='xla'),
                'jax chunked-dW': dict(dtype=dtype, conv_policy='auto')}
  elif _COMPARE.value == 'onednn':
    variants = {'jax xla-conv': dict(dtype=dtype, conv_impl='xla'),
                'jax onednn-conv': dict(dtype=dtype, conv_impl='onednn')}
  elif _COMPARE.value == 'engine':
    variants = {'jax ynnpack': dict(dtype=dtype, conv_engine='ynnpack'),
                'jax eigen': dict(dtype=dtype, conv_engine='eigen')}
  else:
    variants = {f'jax {dtype}': dict(dtype=dtype)}
  setups = {}
  for name, kw in variants.items():
    with conv_ops.policy(kw.pop('conv_policy', conv_ops.current_policy())), \
        conv_ops.engine(kw.pop('conv_engine', conv_ops.current_engine())), \
        conv_ops.implementation(kw.pop(
            'conv_impl', conv_ops.requested_implementation())):
      setups[name] = bm.jax_setup(config, bs, ebs, **kw)
  first = next(iter(setups.values()))
  train_batch = bm.synthetic_batch(bs, first.image_shape, first.num_classes)
  eval_batch = bm.synthetic_batch(ebs, first.image_shape, first.num_classes,
                                  mask=True)
  train_runners = {n: s.train_runner(train_batch) for n, s in setups.items()}
  eval_runners = {n: s.eval_runner(eval_batch) for n, s in setups.items()}
  compile_s = {n: s.compile_s for n, s in setups.items()}
  params = None

  if _TORCH.value:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      from experiments import torch_reference as tr  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError("--torch needs PyTorch: pip install '.[torch]'") from None
    try:
      net = tr.model_from_name(config.model, **dict(config.model_kwargs))
    except (ValueError, TypeError) as e:
      raise ConfigError(str(e)) from None
    tdtype = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
    tstep = tr.TrainStep(net, np.zeros(first.image_shape, np.float32),
                         channels_last=_CHANNELS_LAST.value, dtype=tdtype)
    tx = torch.from_numpy(train_batch['image'])
    ty = torch.from_numpy(train_batch['label']).long()
    tex = torch.from_numpy(eval_batch['image'])
    name = 'torch ' + dtype + (' cl' if _CHANNELS_LAST.value else '')
    t0 = time.perf_counter()
    tstep(tx, ty)  # PyTorch has no compile step; its first step is timed.
    compile_s[name] = time.perf_counter() - t0
    train_runners[name] = lambda: tstep(tx, ty)
    eval_runners[name] = lambda: tstep.eval(tex)
    params = (sum(x.size for x in jax.tree.leaves(first.state.params)),
              tr.count_params(net))

  train_t = bm.time_interleaved(train_runners, _STEPS.value, _WARMUP.value)
  eval_t = bm.time_interleaved(eval_runners, max(_STEPS.value // 2, 3), 1)
  names = list(train_runners)
  train_rate = {n: bs / statistics.median(train_t[n]) for n in names}
  eval_rate = {n: ebs / statistics.median(eval_t[n]) for n in names}
  fwd_flops = first.flops_per_image()
  rss = bm.peak_host_rss_bytes()
  dev = bm.device_peak_bytes()

  print(f'model {config.model}  batch {bs} (eval {ebs})  '
        f'{_STEPS.value} timed steps (median)  device '
        f'{jax.devices()[0].device_kind} x{jax.device_count()}')
  if params:
    print(f'parameters: jax {params[0]:,}  torch {params[1]:,}')
  jax_names = [n for n in names if n.startswith('jax')]
  torch_name = next((n for n in names if n.startswith('torch')), None)
  # Ratio columns: each JAX variant over PyTorch, and the second JAX variant
  # over the first (the effect of --compare).
  ratios = [(a, torch_name) for a in jax_names] if torch_name else []
  if len(jax_names) == 2:
    ratios.append((jax_names[1], jax_names[0]))
  header = (['metric'] + names +
            [f'{a.removeprefix("jax ")} / {b.removeprefix("jax ")}'
             for a, b in ratios])
  rows = []

  def row(label, values, digits=1):
    r = [label] + [_fmt(values.get(n), digits) for n in names]
    for a, b in ratios:
      r.append(f'{values[a] / values[b]:.2f}x' if values.get(b) else '')
    rows.append(r)

  row('compile s (torch: 1st step)', compile_s, 2)
  row('train images/s', train_rate)
  row('eval images/s', eval_rate)
  row('train GFLOP/s (3x fwd)',
      {n: 3 * fwd_flops * train_rate[n] / 1e9 for n in names}, 2)
  rows.append(['forward MFLOPs / image', f'{fwd_flops / 1e6:,.1f}'] +
              [''] * (len(header) - 2))
  rows.append(['peak host RSS MiB (process)', f'{rss / MIB:,.0f}'] +
              [''] * (len(header) - 2))
  rows.append(['peak device MiB', _fmt(dev and dev / MIB, 0)] +
              [''] * (len(header) - 2))
  _print_table(header, rows)

  if _PIPELINE_BATCHES.value:
    data, source = _pipeline_data(config, first.image_shape,
                                  first.num_classes)
    rate = bm.pipeline_rate(data, bs, _PIPELINE_BATCHES.value)
    best = max(train_rate[n] for n in names if n.startswith('jax'))
    verdict = 'OK' if rate >= 5 * best else 'TOO SLOW (< 5x)'
    print(f'input pipeline ({source}): {rate:,.0f} images/s = '
          f'{rate / best:,.1f}x the fastest JAX train rate: {verdict}')
  return rows


def _layers(config, bs: int):
  """The per-layer table (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from cnn import models  # pylint: disable=g-import-not-at-top
  from cnn.ops import conv as conv_ops  # pylint: disable=g-import-not-at-top
  from cnn.tools import benchmarking as bm  # pylint: disable=g-import-not-at-top
  name = config.model
  model = models.get_model(name, num_classes=config.num_classes or
                           models.default_num_classes(name),
                           **dict(config.model_kwargs))
  shapes = bm.conv_shapes(model, models.default_input_shape(name), bs)
  tr = None
  if _TORCH.value:
    from experiments import torch_reference as tr  # pylint: disable=g-import-not-at-top
  header = ['conv (NHWC in -> out)', 'layers', 'jax fwd', 'jax dx',
            'jax dW', 'jax dW shifted', 'jax dW chunked (m)', 'onednn fwd',
            'onednn dx', 'onednn dW']
  if tr:
    header += ['torch fwd', 'torch dx', 'torch dW', 'fwd+dx+dW jax/torch',
               'chunked jax/torch']
  rows, totals = [], {}
  for sh in shapes:
    t = bm.conv_layer_times(sh, _STEPS.value)
    ms = lambda v: '-' if v is None else f'{1000 * v:.1f}'
    r = [sh.describe(), str(sh.count), ms(t['forward']), ms(t['input_grad']),
         ms(t['weight_grad']), ms(t.get('weight_grad_shifted')),
         f"{ms(t['weight_grad_chunked'])} ({t['chunks']})",
         ms(t.get('onednn_forward')), ms(t.get('onednn_input_grad')),
         ms(t.get('onednn_weight_grad'))]
    if 'onednn_forward' in t:
      totals['onednn'] = totals.get('onednn', 0.0) + sh.count * (
          t['onednn_forward'] + t['onednn_input_grad']
          + t['onednn_weight_grad'])
    jax_total = t['forward'] + t['input_grad'] + t['weight_grad']
    lib_total = t['forward'] + t['input_grad'] + t['weight_grad_chunked']
    totals['lib'] = totals.get('lib', 0.0) + sh.count * lib_total
    totals['jax'] = totals.get('jax', 0.0) + sh.count * jax_total
    if tr:
      p = tr.conv_layer_times(sh.batch, sh.height, sh.width, sh.cin, sh.cout,
                              sh.kernel, sh.stride, _STEPS.value)
      torch_total = p['forward'] + p['input_grad'] + p['weight_grad']
      totals['torch'] = totals.get('torch', 0.0) + sh.count * torch_total
      r += [ms(p['forward']), ms(p['input_grad']), ms(p['weight_grad']),
            f'{jax_total / torch_total:.2f}x',
            f'{lib_total / torch_total:.2f}x']
    rows.append(r)
  print(f'model {name}  batch {bs}  {_STEPS.value} timed runs (median, ms)  '
        f'device {jax.devices()[0].device_kind}  convolutions: '
        f'{conv_ops.current_engine()}')
  _print_table(header, rows)
  line = (f"all convolutions of one train step (x layers): jax "
          f"{1000 * totals['jax']:.0f} ms, jax with the chunked weight "
          f"gradient {1000 * totals['lib']:.0f} ms")
  if 'onednn' in totals:
    line += f", oneDNN {1000 * totals['onednn']:.0f} ms"
  if 'torch' in totals:
    line += (f", torch {1000 * totals['torch']:.0f} ms "
             f"({totals['jax'] / totals['torch']:.2f}x, chunked "
             f"{totals['lib'] / totals['torch']:.2f}x")
    if 'onednn' in totals:
      line += f", oneDNN {totals['onednn'] / totals['torch']:.2f}x"
    line += ')'
  print(line)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.run(benchmark, _CONFIG.value, cache_default='off')


if __name__ == '__main__':
  common.main(main, flags_parser=common.parse_flags)
