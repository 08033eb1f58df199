"""The model zoo: a registry from names to Linen modules.

Every model is called as `model.apply(variables, x, train=...)` on NHWC float
input and returns float32 logits. The last layer is always an `nn.Dense` named
`head`, so transfer learning swaps one key. `dtype` is the compute dtype;
parameters stay float32.

Names:
  alexnet, alexnet_tiny
  vgg_a, vgg_a_lrn, vgg_b, vgg_c, vgg_d, vgg_e (vgg11/13/16/19 = A/B/D/E),
    vgg_tiny
  resnet18/34/50/101/152, plain18/34, resnet_tiny
  resnet18_64, plain18_64, vgg_64 (64x64 inputs, 200 classes: Tiny ImageNet)
  cifar_resnet{6n+2}, cifar_plain{6n+2} (any n >= 1; 8 is the tiny one)
  lenet5
  det_trunk (the detectors' trunk + FC layers as a CIFAR classifier)
  overfeat_fast, overfeat_accurate, cifar_fcnet (OverFeat-shaped, 32x32),
    overfeat_tiny (OverFeat-shaped, 64x64 canvases)
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.alexnet import AlexNet
from cnn.models.cifar import CifarResNet, blocks_per_stage
from cnn.models.detnet import TrunkClassifier
from cnn.models.lenet import LeNet5
from cnn.models import overfeat as _overfeat
from cnn.models.overfeat import OverFeat
from cnn.models.resnet import ResNet
from cnn.models.vgg import CONFIGS as VGG_CONFIGS
from cnn.models.vgg import VGG

__all__ = ['AlexNet', 'CifarResNet', 'LeNet5', 'OverFeat', 'ResNet', 'VGG',
           'get_model',
           'model_names', 'close_names', 'default_input_shape',
           'default_num_classes']


class _Variant(NamedTuple):
  cls: type
  kwargs: dict[str, Any]
  input_shape: tuple[int, int, int]
  num_classes: int


_IMAGENET = (224, 224, 3)
_CIFAR = (32, 32, 3)

_RESNETS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}

_VARIANTS: dict[str, _Variant] = {
    'alexnet': _Variant(AlexNet, {}, (227, 227, 3), 1000),
    # 67 is the smallest input the 11x11/4 conv and three 3/2 pools accept
    # with a 1x1 map left at pool5.
    'alexnet_tiny': _Variant(
        AlexNet, dict(widths=(16, 32, 48, 48, 32), fc_width=64),
        (67, 67, 3), 10),
    'vgg_a': _Variant(VGG, dict(stages=VGG_CONFIGS['A']), _IMAGENET, 1000),
    'vgg_a_lrn': _Variant(VGG, dict(stages=VGG_CONFIGS['A'], lrn=True),
                          _IMAGENET, 1000),
    'vgg_b': _Variant(VGG, dict(stages=VGG_CONFIGS['B']), _IMAGENET, 1000),
    'vgg_c': _Variant(VGG, dict(stages=VGG_CONFIGS['C']), _IMAGENET, 1000),
    'vgg_d': _Variant(VGG, dict(stages=VGG_CONFIGS['D']), _IMAGENET, 1000),
    'vgg_e': _Variant(VGG, dict(stages=VGG_CONFIGS['E']), _IMAGENET, 1000),
    'vgg_tiny': _Variant(VGG, dict(stages=VGG_CONFIGS['tiny'], fc_width=64),
                         _CIFAR, 10),
    'resnet_tiny': _Variant(
        ResNet, dict(stage_sizes=(1, 1, 1, 1), num_filters=8), _CIFAR, 10),
    'lenet5': _Variant(LeNet5, {}, (28, 28, 1), 10),
    'overfeat_fast': _Variant(
        OverFeat, dict(layers=_overfeat.FAST, fc_widths=(3072, 4096)),
        (231, 231, 3), 1000),
    'overfeat_accurate': _Variant(
        OverFeat, dict(layers=_overfeat.ACCURATE, fc_widths=(4096, 4096)),
        (221, 221, 3), 1000),
    'cifar_fcnet': _Variant(
        OverFeat, dict(layers=_overfeat.CIFAR_FC, fc_widths=(256, 256),
                       dropout_rate=0.0), _CIFAR, 10),
    # The detectors' trunk as a CIFAR classifier (cnn.models.detnet).
    'det_trunk': _Variant(TrunkClassifier, {}, _CIFAR, 10),
    'overfeat_tiny': _Variant(
        OverFeat, dict(layers=_overfeat.TINY64, fc_widths=(256, 256),
                       dropout_rate=0.0), (64, 64, 3), 10),
}
_VARIANTS.update({
    f'resnet{depth}': _Variant(
        ResNet, dict(block=block, stage_sizes=sizes), _IMAGENET, 1000)
    for depth, (block, sizes) in _RESNETS.items()})
_VARIANTS.update({
    f'plain{depth}': _Variant(
        ResNet, dict(block='basic', stage_sizes=_RESNETS[depth][1],
                     residual=False), _IMAGENET, 1000)
    for depth in (18, 34)})
# Tiny ImageNet (64x64, 200 classes): ResNet-18 / its plain twin with a 3x3
# stride-1 stem and no pool (stage 4 sees 8x8), and a VGG-style net with BN.
_TINY = (64, 64, 3)
_VARIANTS.update({
    'resnet18_64': _Variant(ResNet, dict(stage_sizes=(2, 2, 2, 2),
                                         stem='3x3'), _TINY, 200),
    'plain18_64': _Variant(ResNet, dict(stage_sizes=(2, 2, 2, 2), stem='3x3',
                                        residual=False), _TINY, 200),
    'vgg_64': _Variant(VGG, dict(stages=VGG_CONFIGS['64'], batch_norm=True,
                                 fc_width=1024), _TINY, 200),
})
_ALIASES = {'vgg11': 'vgg_a', 'vgg13': 'vgg_b', 'vgg16': 'vgg_d',
            'vgg19': 'vgg_e'}

# Any depth 6n+2 is accepted; these are the ones listed by `model_names`.
_CIFAR_DEPTHS = (8, 20, 32, 44, 56, 110, 1202)
_CIFAR_RE = re.compile(r'(cifar_resnet|cifar_plain)(\d+)')


def model_names() -> list[str]:
  """Sorted names of the known models (CIFAR nets at the paper's depths)."""
  names = set(_VARIANTS) | set(_ALIASES)
  names |= {f'cifar_{kind}{d}' for kind in ('resnet', 'plain')
            for d in _CIFAR_DEPTHS}
  return sorted(names)


def _lookup(name: str) -> _Variant:
  name = _ALIASES.get(name, name)
  if name in _VARIANTS:
    return _VARIANTS[name]
  match = _CIFAR_RE.fullmatch(name)
  if match:
    family, depth = match.group(1), int(match.group(2))
    try:
      blocks_per_stage(depth, family)
    except ValueError as e:
      raise ValueError(f'bad model name {name!r}: {e}') from None
    return _Variant(CifarResNet, dict(depth=depth,
                                      residual=family == 'cifar_resnet'),
                    _CIFAR, 10)
  close = close_names(name)
  if close:
    guess = (close[0] if len(close) == 1
             else f'{", ".join(close[:-1])} or {close[-1]}')
    raise ValueError(
        f'unknown model {name!r}; did you mean {guess}? (all '
        f'{len(model_names())} names: cnn.models.model_names(); and '
        'cifar_resnet{6n+2} / cifar_plain{6n+2} for any n >= 1)')
  raise ValueError(
      f'unknown model {name!r}; known models: {", ".join(model_names())} '
      '(and cifar_resnet{6n+2} / cifar_plain{6n+2} for any n >= 1)')


def close_names(name: str, n: int = 4) -> list[str]:
  """The known model names nearest to a misspelt one, nearest first.

  Case, '_' and '-' are ignored and a CIFAR net's `cifar_` prefix is
  optional, so 'resnet_20' finds cifar_resnet20 and 'VGG16' vgg16. The
  score is difflib's ratio, at least 0.6 (as in `difflib.get_close_matches`)
  and within 0.15 of the best, so a near-exact match is not drowned out.
  """
  def keys(s: str) -> tuple[str, ...]:
    k = s.lower().replace('_', '').replace('-', '')
    return (k, k[len('cifar'):]) if k.startswith('cifar') else (k,)
  query = keys(name)[0]
  scored = sorted(
      (-max(difflib.SequenceMatcher(None, query, k).ratio()
            for k in keys(known)), known) for known in model_names())
  cutoff = max(0.6, -scored[0][0] - 0.15)
  return [known for score, known in scored[:n] if -score >= cutoff]


def get_model(name: str, *, num_classes: int | None = None,
              dtype: Any = jnp.float32, **overrides) -> nn.Module:
  """Builds a model from the zoo.

  Args:
    name: a name from `model_names()`, or `cifar_resnet{d}` /
      `cifar_plain{d}` for any depth d = 6n + 2.
    num_classes: outputs of the `head` layer; default per model (1000 for
      ImageNet nets, 10 for CIFAR/MNIST nets).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    **overrides: module fields to change, e.g. `shortcut='B'`, `groups=2`,
      `batch_norm=True`, `dropout_rate=0.0`.

  Returns:
    An unbound Linen module; call it as `apply(variables, x, train=...)`.

  Raises:
    ValueError: unknown name, a CIFAR depth not of the form 6n+2, or an
      override that is not a field of the model.
  """
  variant = _lookup(name)
  fields = {f.name for f in dataclasses.fields(variant.cls)} - {'parent',
                                                                  'name'}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(
        f'model {name!r} has no option {", ".join(unknown)}; options: '
        f'{", ".join(sorted(fields - {"num_classes", "dtype"}))}')
  kwargs = {**variant.kwargs, **overrides}
  if num_classes is None:
    num_classes = variant.num_classes
  return variant.cls(num_classes=num_classes, dtype=dtype, **kwargs)


def default_input_shape(name: str) -> tuple[int, int, int]:
  """The (H, W, C) input the model was designed for."""
  return _lookup(name).input_shape


def default_num_classes(name: str) -> int:
  """Outputs of the model's head when `num_classes` is not given."""
  return _lookup(name).num_classes
