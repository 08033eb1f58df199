"""Fully connected heads turned into convolutions (OverFeat, Sermanet et al.).

A classifier `features -> flatten -> fc ... -> head` trained on T x T inputs
sees an F x F x C map at the end of its trunk. Its first FC layer, with kernel
(F*F*C, N), is the same linear map as an F x F VALID convolution with kernel
(F, F, C, N) (the flatten is row-major over (H, W, C), so a reshape moves the
weights over); every later FC layer is a 1x1 convolution. The converted net
gives the same logits at T x T and, on a larger input, a map of scores: one
per T x T window, the windows `stride` input pixels apart, where `stride` is
the product of the trunk's conv and pool strides (32 for the fast OverFeat,
36 for the accurate one, 4 for `cifar_fcnet`).

The scores at map position (i, j) equal the original classifier applied to
the window at (i*stride, j*stride) exactly when no conv or pool of the trunk
is padded. With padded convs (OverFeat's conv3-5, AlexNet, VGG) the dense pass
lets a window's border see its real neighbours where the classifier on the
cropped window sees zeros, so the two agree only at the training size; that
is the paper's construction too, and it is why `windows_are_exact` exists.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn.models.alexnet import AlexNet, AlexNetFeatures
from cnn.models.common import Conv, Dtype, MaxPool, he_normal
from cnn.models.overfeat import OverFeat
from cnn.models.vgg import VGG, VGGFeatures


def trunk_of(model: nn.Module, name: str | None = 'features') -> nn.Module:
  """The conv trunk of an FC-head model as a module of its own (eval mode).

  Its parameters are the model's `features` subtree, so the same variables
  apply.

  Raises:
    ValueError: the model has no FC head (ResNets end in global average
      pooling) or its trunk is not a `features` submodule (LeNet-5).
  """
  import functools  # pylint: disable=g-import-not-at-top
  if isinstance(model, OverFeat):
    return model.trunk(name=name)
  conv = functools.partial(Conv, dtype=model.dtype, kernel_init=he_normal)
  if isinstance(model, AlexNet):
    return AlexNetFeatures(model.widths, conv, model.groups, model.lrn,
                           name=name)
  if isinstance(model, VGG):
    norm = None
    if model.batch_norm:
      conv = functools.partial(conv, use_bias=False)
      norm = functools.partial(nn.BatchNorm, use_running_average=True,
                               momentum=0.9, epsilon=1e-5, dtype=model.dtype)
    return VGGFeatures(model.conv_stages, conv, norm, model.lrn, name=name)
  raise ValueError(
      f'{type(model).__name__} has no fully connected head on a `features` '
      'trunk to convert; convertible: OverFeat nets (overfeat_fast, '
      'overfeat_accurate, cifar_fcnet), AlexNet, VGG')


class FullyConvNet(nn.Module):
  """A trunk followed by convolutions standing in for the FC layers.

  Returns logits of shape (B, H', W', num_classes): one score vector per
  window of the training size.

  Attributes:
    features: the trunk (its variables are the classifier's `features`).
    head: per FC layer (name, output width, kernel side); the first side is
      F, the trunk's map side at the training input, the others 1.
    dtype: compute dtype.
  """
  features: nn.Module
  head: Sequence[tuple[str, int, int]]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train  # inference only: dropout is the identity
    x = self.features(x)
    for i, (name, width, k) in enumerate(self.head):
      x = Conv(width, (k, k), padding='VALID', dtype=self.dtype,
              name=name)(x)
      if i < len(self.head) - 1:
        x = nn.relu(x)
    return jnp.asarray(x, jnp.float32)


def trunk_output_shape(model: nn.Module, input_shape: Sequence[int]):
  """(F, F, C) at the end of the trunk for one (H, W, C) input (no FLOPs)."""
  trunk = trunk_of(model, name=None)
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  out = jax.eval_shape(lambda x: trunk.init_with_output(
      jax.random.PRNGKey(0), x)[0], x)
  return tuple(out.shape[1:])


def convert(model: nn.Module, variables: dict, input_shape: Sequence[int]
            ) -> tuple[FullyConvNet, dict]:
  """Converts a classifier with an FC head into an equivalent conv net.

  Args:
    model: a registry model with a `features` trunk and Dense layers after it
      (the `head` last).
    variables: its variables ({'params': ..., maybe 'batch_stats': ...}).
    input_shape: the (H, W, C) training input it was built for.

  Returns:
    (fully-convolutional module, its variables): the same weights, reshaped.

  Raises:
    ValueError: the model cannot be converted, or its first FC layer does not
      fit the trunk's output at `input_shape`.
  """
  trunk = trunk_of(model)
  f_h, f_w, c = trunk_output_shape(model, input_shape)
  params = variables['params']
  fc_names = _fc_order([k for k in params if k != 'features'])
  new_params = {'features': params['features']}
  head = []
  for i, name in enumerate(fc_names):
    kernel = params[name]['kernel']
    if i == 0:
      if kernel.shape[0] != f_h * f_w * c:
        raise ValueError(
            f'{name} takes {kernel.shape[0]} inputs but the trunk gives '
            f'{f_h}x{f_w}x{c} at input {tuple(input_shape)}: pass the input '
            'shape the model was trained on')
      kernel = kernel.reshape(f_h, f_w, c, kernel.shape[1])
    else:
      kernel = kernel.reshape(1, 1, *kernel.shape)
    new_params[name] = {'kernel': kernel, 'bias': params[name]['bias']}
    head.append((name, kernel.shape[-1], kernel.shape[0]))
  if f_h != f_w:
    raise ValueError(f'non-square trunk output {f_h}x{f_w} is not supported')
  new_vars = dict(variables)
  new_vars['params'] = new_params
  return FullyConvNet(trunk, tuple(head), dtype=model.dtype), new_vars


def _fc_order(names: list[str]) -> list[str]:
  """FC layer names in network order: by their number, `head` last.

  Parameter dicts come back key-sorted from jit, eval_shape and checkpoints,
  so their order cannot be trusted ('fc10' < 'fc9').
  """
  if 'head' not in names:
    raise ValueError(f'expected FC layers ending in `head`, got {names}')
  hidden = [n for n in names if n != 'head']
  bad = [n for n in hidden if not re.fullmatch(r'[a-z_]+\d+', n)]
  if bad:
    raise ValueError(f'cannot order FC layers {names}: {bad} has no number')
  return sorted(hidden, key=lambda n: int(re.search(r'\d+$', n).group())) + [
      'head']


def _layer_geometry(model: nn.Module, input_shape: Sequence[int]):
  """Strides and paddings of every conv and pool of the trunk, in order."""
  trunk = trunk_of(model, name=None)
  found = []

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == '__call__':
      if isinstance(m, nn.Conv):
        s = m.strides or 1
        s = s if isinstance(s, int) else s[0]
        found.append((s, m.padding))
      elif isinstance(m, MaxPool):
        found.append((m.stride, m.padding))
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda x: trunk.init(jax.random.PRNGKey(0), x), x)
  return found


def _unpadded(padding: Any) -> bool:
  if isinstance(padding, str):
    return padding.upper() == 'VALID'
  return all(p == 0 for pair in padding for p in np.ravel(pair))


def output_stride(model: nn.Module, input_shape: Sequence[int]) -> int:
  """Input pixels between adjacent positions of the dense score map."""
  return int(np.prod([s for s, _ in _layer_geometry(model, input_shape)]))


def windows_are_exact(model: nn.Module, input_shape: Sequence[int]) -> bool:
  """True when the dense map equals the classifier on every cropped window
  (no conv or pool of the trunk is padded)."""
  return all(_unpadded(p) for _, p in _layer_geometry(model, input_shape))


def map_size(train_size: int, size: int, stride: int) -> int:
  """Positions along one axis for an input of `size` (training size T)."""
  return (size - train_size) // stride + 1 if size >= train_size else 0


def dense_output_shape(conv_net: FullyConvNet, variables: dict,
                       input_shape: Sequence[int]) -> tuple[int, ...]:
  """(H', W', K) of the score map for one (H, W, C) input, without FLOPs."""
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  out = jax.eval_shape(lambda v, x: conv_net.apply(v, x), variables, x)
  return tuple(out.shape[1:])


def sliding_windows(model: nn.Module, variables: dict, images, window: int,
                    stride: int, batch: int = 64, apply=None):
  """The brute-force baseline: crop every window and classify it.

  Args:
    model: the original classifier.
    variables: its variables.
    images: (B, H, W, C).
    window: the training input side T.
    stride: distance between windows (use `output_stride`).
    batch: windows classified per call.
    apply: a jitted `(variables, x) -> logits` to reuse between calls
      (timing); default: jit `model.apply` afresh.

  Returns:
    (B, H', W', K) scores, H' = (H - T) // stride + 1 (likewise W').
  """
  b, h, w, _ = images.shape
  ny, nx = map_size(window, h, stride), map_size(window, w, stride)
  crops = [images[:, i * stride:i * stride + window,
                  j * stride:j * stride + window]
           for i in range(ny) for j in range(nx)]
  crops = jnp.stack(crops, axis=1).reshape((-1, window, window,
                                            images.shape[-1]))
  if apply is None:
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  outs = [apply(variables, crops[k:k + batch])
          for k in range(0, len(crops), batch)]
  out = jnp.concatenate(outs)
  return out.reshape(b, ny, nx, -1)
