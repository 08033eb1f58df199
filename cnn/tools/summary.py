"""Per-layer walk-through of a model: output shapes, parameters and FLOPs.

    python -m cnn.tools.summary vgg_d
    python -m cnn.tools.summary alexnet --input-size 227,227,3 --num-classes 10

prints one row per layer (conv, pool, norm, fc, dropout) with its output
shape as H x W x D, its parameters and its FLOPs per example, then
`flops_per_example: N` and, last, `total_params: N`.

Nothing is allocated: the model is traced once under `jax.eval_shape` with a
method interceptor recording every leaf module call (a module that calls no
other module), so even VGG-E or ResNet-152 take about a second.

FLOP conventions (per example, forward pass):
  * conv / dense: 2 per multiply-add (kernel size x output positions); bias
    adds are not counted, as in the papers' tables.
  * batch/layer/group norm: 2 per output element (one scale, one shift, as
    folded at inference).
  * max pooling: one per window element per output; global average pooling:
    one per input element.
  * LRN: size + 4 per element (square, window sum, multiply-add, power,
    divide).
  * dropout: 0 (identity at inference).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn import models
from cnn.models.common import LRN, GlobalAvgPool, MaxPool


@dataclasses.dataclass(frozen=True)
class LayerRow:
  """One layer of the walk-through.

  Attributes:
    path: module path, e.g. 'stage2/block0/conv1' ('input' for the input).
    kind: module class name, e.g. 'Conv', 'MaxPool', 'Dense'.
    output_shape: output shape per example, e.g. (55, 55, 96).
    params: number of parameters the layer owns.
    flops: FLOPs per example (see the module docstring).
  """
  path: str
  kind: str
  output_shape: tuple[int, ...]
  params: int
  flops: int


def count_params(params_tree: Any) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(int(math.prod(leaf.shape)) for leaf in jax.tree.leaves(params_tree))


def _subtree(tree: Any, path: Sequence[str]) -> Any:
  for key in path:
    if not hasattr(tree, 'get'):
      return {}
    tree = tree.get(key, {})
  return tree


def _layer_flops(module: nn.Module, in_shape, out_shape, params: Any) -> int:
  """FLOPs per example of one leaf module (shapes include the batch axis)."""
  out_elems = math.prod(out_shape[1:])
  kernel = params.get('kernel') if hasattr(params, 'get') else None
  if kernel is not None:
    # Each output position does one multiply-add per kernel weight feeding
    # one output channel: kernel.size / out_channels of them per element.
    positions = math.prod(out_shape[1:-1])
    return 2 * math.prod(kernel.shape) * positions
  if isinstance(module, (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm)):
    return 2 * out_elems
  if isinstance(module, MaxPool):
    return module.window * module.window * out_elems
  if isinstance(module, GlobalAvgPool):
    return math.prod(in_shape[1:])
  if isinstance(module, LRN):
    return (module.size + 4) * out_elems
  return 0


def trace(model: nn.Module, input_shape: Sequence[int]):
  """Traces `model` on one example without allocating anything.

  Args:
    model: a zoo module (called as `model(x, train=False)`).
    input_shape: (H, W, C) of one example.

  Returns:
    (rows, params) where rows is a list of `LayerRow` (the input first) and
    params is the parameter tree of ShapeDtypeStructs.

  Raises:
    ValueError: the input does not fit the net (a layer fails on it or
      would output an empty map).
  """
  calls = []   # (module, path, in_shape, out_shape) of leaf calls, in order
  stack = []   # one [has_child] flag per module call in progress

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if stack:
      stack[-1][0] = True
    stack.append([False])
    module = context.module
    try:
      out = next_fun(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      if stack[-1][0] or not args or not hasattr(args[0], 'shape'):
        raise  # raised deeper down: already explained there
      # A leaf layer failing on its input is almost always impossible conv
      # arithmetic; say which layer and what it got, not lax's internals.
      raise ValueError(
          f'input {format_shape(input_shape)} does not fit: layer '
          f'{"/".join(module.path)} got {format_shape(args[0].shape[1:])}: '
          f'{str(e).strip().splitlines()[0] if str(e).strip() else e!r}'
      ) from e
    has_child = stack.pop()[0]
    if not has_child and args and hasattr(out, 'shape'):
      if 0 in out.shape[1:]:
        # Checked here, before the next layer initializes its weights from
        # an empty input (which fails with an unrelated division by zero).
        raise ValueError(
            f'input {format_shape(input_shape)} is too small: layer '
            f'{"/".join(module.path)} would output '
            f'{format_shape(out.shape[1:])}')
      calls.append((module, tuple(module.path), tuple(args[0].shape),
                    tuple(out.shape)))
    return out

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)

  def init(x):
    with nn.intercept_methods(interceptor):
      return model.init(jax.random.key(0), x, train=False)

  variables = jax.eval_shape(init, x)
  params = variables.get('params', {})
  rows = [LayerRow('input', 'Input', tuple(input_shape), 0, 0)]
  for module, path, in_shape, out_shape in calls:
    own = _subtree(params, path)
    rows.append(LayerRow('/'.join(path), type(module).__name__,
                         out_shape[1:], count_params(own),
                         _layer_flops(module, in_shape, out_shape, own)))
  return rows, params


def flops_per_example(model: nn.Module, input_shape: Sequence[int]) -> int:
  """Forward FLOPs for one example of shape (H, W, C); see module docstring."""
  rows, _ = trace(model, input_shape)
  return sum(row.flops for row in rows)


def summarize(name: str, input_shape: Sequence[int] | None = None,
              num_classes: int | None = None) -> list[LayerRow]:
  """Rows of the walk-through of zoo model `name`.

  Args:
    name: a name accepted by `cnn.models.get_model`.
    input_shape: (H, W, C); defaults to the model's design input.
    num_classes: outputs of the head; defaults to the model's.

  Returns:
    A list of `LayerRow`, the input first; the params column sums to the
    model's parameter count.

  Raises:
    ValueError: unknown model name or an input too small for the net.
  """
  model = models.get_model(name, num_classes=num_classes)
  if input_shape is None:
    input_shape = models.default_input_shape(name)
  rows, _ = trace(model, tuple(input_shape))
  return rows


def format_shape(shape: Sequence[int]) -> str:
  """(55, 55, 96) -> '55 x 55 x 96', the lecture's H x W x D notation."""
  return ' x '.join(str(d) for d in shape)


def format_rows(rows: Sequence[LayerRow]) -> str:
  """The table printed by the CLI, without the two total lines."""
  width = max(len('layer'), *(len(r.path) for r in rows))
  kind_width = max(len('type'), *(len(r.kind) for r in rows))
  lines = [f'{"layer":<{width}}  {"type":<{kind_width}}  {"output":>16}  '
           f'{"params":>13}  {"flops":>17}']
  for r in rows:
    lines.append(f'{r.path:<{width}}  {r.kind:<{kind_width}}  '
                 f'{format_shape(r.output_shape):>16}  {r.params:>13,}  '
                 f'{r.flops:>17,}')
  return '\n'.join(lines)


def _parse_input_size(text: str) -> tuple[int, int, int]:
  try:
    dims = tuple(int(d) for d in text.split(','))
  except ValueError:
    dims = ()
  if len(dims) != 3 or min(dims) < 1:
    raise argparse.ArgumentTypeError(
        f'expected H,W,C as three positive integers, got {text!r}')
  return dims


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m cnn.tools.summary',
      description='Per-layer output shapes, parameters and FLOPs of a model.')
  parser.add_argument('name', help='model name, e.g. alexnet, vgg_d, '
                      'resnet50, cifar_resnet110')
  parser.add_argument('--input_size', '--input-size', type=_parse_input_size, default=None,
                      metavar='H,W,C', help='input shape (default: the '
                      "model's design input)")
  parser.add_argument('--num_classes', '--num-classes', type=int, default=None,
                      help="outputs of the head (default: the model's)")
  args = parser.parse_args(argv)
  try:
    model = models.get_model(args.name, num_classes=args.num_classes)
    input_shape = args.input_size or models.default_input_shape(args.name)
    rows, params = trace(model, input_shape)
  except Exception as e:  # pylint: disable=broad-except
    # A CLI for people: one line saying what is wrong, no traceback.
    message = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    print(f'error: {message}', file=sys.stderr)
    return 2
  try:
    print(format_rows(rows))
    print(f'flops_per_example: {sum(r.flops for r in rows)}')
    print(f'total_params: {count_params(params)}')
    sys.stdout.flush()
  except BrokenPipeError:
    # `... | head` closed the pipe: what was wanted is printed. Python's
    # recipe: point stdout at devnull so the exit flush does not fail too.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  return 0


if __name__ == '__main__':
  sys.exit(main())
