"""OverFeat (Sermanet et al. 2014) and a small net of the same shape for CIFAR.

The nets are a conv/pool trunk (`features`) followed by fully connected layers
and the `head`, all described by a layer table so that the fast and accurate
models, a reduced-width test variant and the 32x32 `cifar_fcnet` share one
module.

Fast model (Table 1), 231 x 231 input:
  conv1 96 11x11/4 (56) -> pool 2/2 (28) -> conv2 256 5x5 (24) -> pool 2/2
  (12) -> conv3 512, conv4 1024, conv5 1024 3x3 pad 1 (12) -> pool 2/2 (6)
  -> fc6 3072 -> fc7 4096 -> head 1000: 145,920,872 parameters.
Accurate model (Table 3), 221 x 221 input:
  conv1 96 7x7/2 (108) -> pool 3/3 (36) -> conv2 256 7x7 (30) -> pool 2/2
  (15) -> conv3 512, conv4 512, conv5 1024, conv6 1024 3x3 pad 1 (15) ->
  pool 3/3 (5) -> fc7 4096 -> fc8 4096 -> head 1000: 144,656,488 parameters.
The total subsampling (the dense map's stride in input pixels) is 32 for the
fast model and 36 for the accurate one. The paper's layers have no LRN and
dropout 0.5 on the fully connected layers.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.common import Conv, Dtype, MaxPool, fc_classifier, he_normal

# ('conv', filters, kernel side, stride, padding) or ('pool', window, stride).
Layer = tuple

FAST = (('conv', 96, 11, 4, 0), ('pool', 2, 2),
        ('conv', 256, 5, 1, 0), ('pool', 2, 2),
        ('conv', 512, 3, 1, 1), ('conv', 1024, 3, 1, 1),
        ('conv', 1024, 3, 1, 1), ('pool', 2, 2))
ACCURATE = (('conv', 96, 7, 2, 0), ('pool', 3, 3),
            ('conv', 256, 7, 1, 0), ('pool', 2, 2),
            ('conv', 512, 3, 1, 1), ('conv', 512, 3, 1, 1),
            ('conv', 1024, 3, 1, 1), ('conv', 1024, 3, 1, 1),
            ('pool', 3, 3))
# 32 -> 30 -> 28 -> 14 -> 12 -> 10 -> 5: unpadded convs, so the dense map of
# the converted net equals the classifier on every window exactly (stride 4).
CIFAR_FC = (('conv', 32, 3, 1, 0), ('conv', 32, 3, 1, 0), ('pool', 2, 2),
            ('conv', 64, 3, 1, 0), ('conv', 64, 3, 1, 0), ('pool', 2, 2))

# For 64x64 localization canvases on a CPU: 64 -> 30 -> 15 -> 13 -> 11 -> 5,
# stride 8, about 10M multiply-adds per canvas in the convs (19.5M FLOPs:
# `python -m cnn.tools.summary overfeat_tiny`); also unpadded.
TINY64 = (('conv', 32, 5, 2, 0), ('pool', 2, 2),
          ('conv', 64, 3, 1, 0), ('conv', 64, 3, 1, 0), ('pool', 2, 2))


def resolve_layers(layers: Sequence[Layer],
                   widths: Optional[Sequence[int]] = None,
                   conv_padding: Optional[int] = None) -> tuple[Layer, ...]:
  """The layer table with conv widths and/or the padded convs' pads replaced.

  Args:
    layers: a table such as `FAST`.
    widths: new filter counts for the convs, in order (reduced-width nets).
    conv_padding: new padding for the convs that are padded in the table
      (0 makes every conv unpadded).

  Returns:
    The resolved table.

  Raises:
    ValueError: `widths` does not have one entry per conv.
  """
  convs = [l for l in layers if l[0] == 'conv']
  if widths is not None and len(widths) != len(convs):
    raise ValueError(f'widths={tuple(widths)} must give {len(convs)} conv '
                     'widths')
  out, i = [], 0
  for layer in layers:
    if layer[0] == 'conv':
      _, width, k, stride, pad = layer
      if widths is not None:
        width = widths[i]
      if conv_padding is not None and pad:
        pad = conv_padding
      out.append(('conv', width, k, stride, pad))
      i += 1
    else:
      out.append(tuple(layer))
  return tuple(out)


class OverFeatFeatures(nn.Module):
  """The trunk: `conv{i}` (+ReLU) and `pool{i}` named by the paper's layer.

  Attributes:
    layers: the resolved layer table.
    conv: conv module factory.
  """
  layers: Sequence[Layer]
  conv: nn.Module = Conv

  @nn.compact
  def __call__(self, x):
    layer = 0
    for spec in self.layers:
      if spec[0] == 'conv':
        layer += 1
        _, width, k, stride, pad = spec
        x = nn.relu(self.conv(width, (k, k), strides=stride,
                              padding=((pad, pad), (pad, pad)),
                              name=f'conv{layer}')(x))
      else:
        x = MaxPool(spec[1], spec[2], name=f'pool{layer}')(x)
    return x


class OverFeat(nn.Module):
  """`features`, then `fc{n}` layers (ReLU, dropout) and the `head`.

  The fully connected layers are numbered after the conv layers, as in the
  paper's tables (fc6, fc7 for the fast model; fc7, fc8 for the accurate one).

  Attributes:
    layers: the conv/pool table (`FAST`, `ACCURATE`, `CIFAR_FC`).
    fc_widths: widths of the fully connected layers before the head.
    widths: optional conv widths replacing the table's (reduced nets).
    conv_padding: optional pad for the table's padded convs (0: none).
    dropout_rate: dropout after each hidden FC layer in training.
    num_classes: outputs of `head`.
    dtype: compute dtype; parameters stay float32.
  """
  layers: Sequence[Layer] = FAST
  fc_widths: Sequence[int] = (3072, 4096)
  widths: Optional[Sequence[int]] = None
  conv_padding: Optional[int] = None
  dropout_rate: float = 0.5
  num_classes: int = 1000
  dtype: Dtype = jnp.float32

  @nn.nowrap
  def trunk(self, name: Optional[str] = None) -> OverFeatFeatures:
    """The conv trunk as a module of its own (used by the FC->conv net)."""
    conv = functools.partial(Conv, dtype=self.dtype, kernel_init=he_normal)
    return OverFeatFeatures(
        resolve_layers(self.layers, self.widths, self.conv_padding), conv,
        name=name)

  @nn.nowrap
  def fc_names(self) -> list[str]:
    first = sum(1 for l in self.layers if l[0] == 'conv') + 1
    return [f'fc{first + i}' for i in range(len(self.fc_widths))]

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = self.trunk(name='features')(x)
    return fc_classifier(
        x, dict(zip(self.fc_names(), self.fc_widths)), self.num_classes,
        dropout_rate=self.dropout_rate, dtype=self.dtype, train=train)
