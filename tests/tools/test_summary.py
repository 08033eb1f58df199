"""Tests for cnn.tools.summary: per-layer shapes, params, FLOPs and the CLI."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from cnn import models
from cnn.tools import summary

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'cnn.tools.summary', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)


def by_path(rows):
  return {row.path: row for row in rows}


def test_alexnet_walk_through():
  rows = summary.summarize('alexnet')
  assert rows[0].path == 'input' and rows[0].output_shape == (227, 227, 3)
  layers = by_path(rows)
  conv1 = layers['features/conv1']
  assert conv1.kind == 'Conv'
  assert conv1.output_shape == (55, 55, 96)
  assert conv1.params == 11 * 11 * 3 * 96 + 96
  assert conv1.flops == 2 * (11 * 11 * 3 * 96) * 55 * 55
  assert layers['features/pool1'].output_shape == (27, 27, 96)
  assert layers['features/lrn1'].kind == 'LRN'
  assert layers['features/pool5'].output_shape == (6, 6, 256)
  assert layers['fc6'].params == 6 * 6 * 256 * 4096 + 4096
  assert layers['head'].output_shape == (1000,)
  assert sum(r.params for r in rows) == 62_378_344


def test_vgg_d_rows_sum_to_total():
  rows = summary.summarize('vgg_d')
  layers = by_path(rows)
  assert layers['features/pool5'].output_shape == (7, 7, 512)
  assert sum(r.params for r in rows) == 138_357_544
  assert sum(r.kind == 'Conv' for r in rows) == 13
  assert sum(r.kind == 'Dense' for r in rows) == 3


def test_summarize_options():
  rows = summary.summarize('cifar_resnet20', input_shape=(16, 16, 3),
                           num_classes=100)
  layers = by_path(rows)
  assert layers['stage3/block2/bn2'].output_shape == (4, 4, 64)
  assert layers['head'].output_shape == (100,)


def test_lenet_flops_exact():
  # conv/dense: 2 per multiply-add; max pool: one per window element.
  conv_dense = (2 * 5 * 5 * 1 * 6 * 28 * 28 + 2 * 5 * 5 * 6 * 16 * 10 * 10
                + 2 * 400 * 120 + 2 * 120 * 84 + 2 * 84 * 10)
  pools = 4 * 14 * 14 * 6 + 4 * 5 * 5 * 16
  model = models.get_model('lenet5')
  assert summary.flops_per_example(model, (28, 28, 1)) == conv_dense + pools


def test_resnet50_flops_near_paper():
  # He et al. 2015 quote 3.8e9 multiply-adds (4.1e9 with the stride on the
  # 3x3); at 2 FLOPs each this is ~8.2 GFLOPs.
  flops = summary.flops_per_example(models.get_model('resnet50'),
                                    (224, 224, 3))
  assert 8.0e9 < flops < 8.4e9


def test_count_params():
  tree = {'a': {'kernel': np.zeros((3, 3, 2, 4)), 'bias': np.zeros(4)},
          'b': jnp.zeros((5,))}
  assert summary.count_params(tree) == 72 + 4 + 5
  assert summary.count_params({}) == 0


def test_too_small_input_is_one_clear_error():
  with pytest.raises(ValueError, match='too small: layer features/pool5'):
    summary.summarize('vgg_d', input_shape=(16, 16, 3))


def test_main_errors_in_process(capsys):
  assert summary.main(['nosuchnet']) != 0
  err = capsys.readouterr().err
  assert err.startswith('error: unknown model') and err.count('\n') == 1
  assert summary.main(['alexnet', '--input-size', '32,32,3']) != 0
  err = capsys.readouterr().err
  assert 'too small' in err and err.count('\n') == 1


def test_cli_vgg_d():
  result = run_cli('vgg_d')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[-1] == 'total_params: 138357544'
  key, value = lines[-2].split(': ')
  assert key == 'flops_per_example' and int(value) > 30e9
  assert any(line.startswith('features/conv1_1') and '224 x 224 x 64' in line
             for line in lines)


def test_cli_bad_name():
  result = run_cli('cifar_resnet21')
  assert result.returncode != 0
  assert result.stdout == ''
  assert 'Traceback' not in result.stderr
  err = result.stderr.strip().splitlines()
  assert len(err) == 1 and '6n+2' in err[0]
