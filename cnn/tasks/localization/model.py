"""The localizer: one conv trunk, a class head and a box head, all convs.

The lecture's route from classification to localization. One conv trunk (the
`features` of a registry model with an FC head, `cifar_fcnet` by default)
feeds two heads:
  * the class head: the model's FC layers and `head`, written as convs (the
    first an F x F VALID conv over the trunk's F x F map, the others 1x1), so
    at the training size they are exactly FC layers and on a larger image
    they slide (OverFeat, see `cnn.models.fully_conv`);
  * the box head (`box_fc*`, `box_head`): 4 numbers (x, y, w, h) of the
    object relative to the window (`cnn.ops.boxes.encode`), attached after
    the conv trunk (`attach='conv'`) or after the first FC layer
    (`attach='fc'`), the lecture's "where to attach the regression head?".
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn import models
from cnn.data import augment
from cnn.errors import ConfigError
from cnn.models import fully_conv
from cnn.models.common import Dtype, he_normal

ATTACH = ('conv', 'fc')
# Output layers start small: near-uniform class scores and boxes near the
# origin, instead of He-scaled outputs whose first L2 gradients blow up.
_SMALL = nn.initializers.variance_scaling(0.01, 'fan_in', 'normal')


class LocalizationNet(nn.Module):
  """Shared trunk, class head and box head, all convolutional.

  Returns (logits (B, H', W', K), box codes (B, H', W', 4)); H' = W' = 1 at
  the training size.

  Attributes:
    features: the conv trunk (`cnn.models.fully_conv.trunk_of` a registry model).
    window: F, the trunk's output side at the training input.
    fc_widths: the class head's hidden FC widths (the first is F x F).
    num_classes: classes.
    attach: 'conv' (box head reads the trunk) or 'fc' (reads the first FC).
    box_widths: the box head's hidden widths.
    dropout_rate: dropout after the hidden class-head layers in training.
    dtype: compute dtype.
  """
  features: nn.Module
  window: int
  fc_widths: Sequence[int]
  num_classes: int
  attach: str = 'conv'
  box_widths: Sequence[int] = (256,)
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    def conv(w, k, name, init=he_normal):
      return nn.Conv(w, (k, k), padding='VALID', dtype=self.dtype,
                     kernel_init=init, name=name)
    f = self.features(x)
    h, first_fc = f, None
    for i, width in enumerate(self.fc_widths):
      h = nn.relu(conv(width, self.window if i == 0 else 1, f'fc{i + 1}')(h))
      if i == 0:
        first_fc = h
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    logits = conv(self.num_classes, self.window if not self.fc_widths else 1,
                  'head', _SMALL)(h)
    if self.attach == 'fc' and first_fc is None:
      raise ValueError("attach='fc' needs at least one FC layer")
    b = f if self.attach == 'conv' else first_fc
    k = self.window if self.attach == 'conv' else 1
    for j, width in enumerate(self.box_widths):
      b = nn.relu(conv(width, k, f'box_fc{j + 1}')(b))
      k = 1
    codes = conv(4, k, 'box_head', _SMALL)(b)
    return (jnp.asarray(logits, jnp.float32), jnp.asarray(codes, jnp.float32))


def _fc_widths(base: nn.Module) -> tuple[int, ...]:
  if hasattr(base, 'fc_widths'):
    return tuple(base.fc_widths)
  return (base.fc_width, base.fc_width)


def make_model(config, num_classes: int) -> tuple[LocalizationNet, int]:
  """The localizer for `config` and the stride of its dense map.

  Raises:
    ConfigError: unknown model, or a model without an FC head on a trunk.
  """
  kwargs = dict(config.model_kwargs)
  try:
    base = models.get_model(config.model, num_classes=num_classes, **kwargs)
    features = fully_conv.trunk_of(base)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  shape = (config.canvas, config.canvas, 3)
  f_h, f_w, _ = fully_conv.trunk_output_shape(base, shape)
  if f_h < 1 or f_h != f_w:
    raise ConfigError(f'model {config.model} leaves a {f_h}x{f_w} map at '
                      f'canvas={config.canvas}; use a larger canvas')
  dropout = kwargs.get('dropout_rate', getattr(base, 'dropout_rate', 0.0))
  net = LocalizationNet(features, f_h, _fc_widths(base), num_classes,
                        attach=config.attach,
                        box_widths=tuple(config.box_widths),
                        dropout_rate=dropout)
  return net, fully_conv.output_stride(base, shape)


preprocess = augment.standardize_canvas

