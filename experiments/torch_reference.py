"""PyTorch twins of the CIFAR nets, for side-by-side timing only.

Kept apart from the library (torch is an optional extra: `pip install
'.[torch]'`): `python -m experiments.benchmark --torch` times one of these
against `cnn.models.CifarResNet` in the same process and prints the ratio.

The nets match `cnn.models.cifar` layer for layer: a 3x3 conv + BN + ReLU
stem, three stages of n basic blocks (16/32/64 filters, stride 2 where a
stage starts), option-A shortcuts (subsample even pixels, zero-pad channels)
or option-B projections, global average pooling and a 10-way linear head.
Convs have no bias and He-normal (fan-in) init; BN momentum 0.1 (Flax's 0.9),
epsilon 1e-5. The train step does the same work as `cnn.training.step`: uint8 ->
[0, 1] minus the mean, pad-4 random crop and flip, forward, cross-entropy,
backward, SGD with momentum 0.9 and coupled weight decay 1e-4 (PyTorch's SGD
is the update `cnn.training.optim` reproduces).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
  nn.init.kaiming_normal_(conv.weight, mode='fan_in', nonlinearity='relu')
  return conv


def _bn(c: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class BasicBlock(nn.Module):
  """Two 3x3 convs with BN; the shortcut as in `cnn.models.resnet`."""

  def __init__(self, cin: int, cout: int, stride: int, residual: bool,
               shortcut: str):
    super().__init__()
    self.conv1, self.bn1 = _conv3(cin, cout, stride), _bn(cout)
    self.conv2, self.bn2 = _conv3(cout, cout), _bn(cout)
    self.residual = residual
    self.stride = stride
    self.extra = cout - cin
    self.proj = None
    if residual and shortcut == 'B' and (stride != 1 or cin != cout):
      conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
      nn.init.kaiming_normal_(conv.weight, mode='fan_in', nonlinearity='relu')
      self.proj = nn.Sequential(conv, _bn(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.residual:
      if self.proj is not None:
        s = self.proj(x)
      else:
        s = x[:, :, ::self.stride, ::self.stride] if self.stride != 1 else x
        if self.extra:
          s = F.pad(s, (0, 0, 0, 0, 0, self.extra))  # NCHW: pad channels.
      y = y + s
    return F.relu(y)


class CifarResNet(nn.Module):
  """depth = 6n + 2 (see `cnn.models.cifar.CifarResNet`)."""

  def __init__(self, depth: int = 20, residual: bool = True,
               shortcut: str = 'A', num_classes: int = 10,
               widths=(16, 32, 64)):
    super().__init__()
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f'depth {depth} is not of the form 6n+2')
    n = (depth - 2) // 6
    self.stem = nn.Sequential(_conv3(3, widths[0]), _bn(widths[0]), nn.ReLU())
    blocks, cin = [], widths[0]
    for i, w in enumerate(widths):
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        blocks.append(BasicBlock(cin, w, stride, residual, shortcut))
        cin = w
    self.blocks = nn.Sequential(*blocks)
    # Flax's Dense default: LeCun-normal kernel, zero bias.
    self.head = nn.Linear(cin, num_classes)
    nn.init.trunc_normal_(self.head.weight, std=(1.0 / cin) ** 0.5 / .8796)
    nn.init.zeros_(self.head.bias)

  def forward(self, x):
    x = self.blocks(self.stem(x))
    return self.head(x.mean(dim=(2, 3)))


def model_from_name(name: str, **kwargs) -> CifarResNet:
  """`cifar_resnet{d}` / `cifar_plain{d}` -> the PyTorch twin."""
  for prefix, residual in (('cifar_resnet', True), ('cifar_plain', False)):
    if name.startswith(prefix) and name[len(prefix):].isdigit():
      return CifarResNet(int(name[len(prefix):]), residual=residual, **kwargs)
  raise ValueError(f'no PyTorch reference for {name!r}: use cifar_resnet{{d}}'
                   ' or cifar_plain{d}')


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


class TrainStep:
  """One SGD step on a uint8 NHWC batch, the work of `cnn.training.step` train."""

  def __init__(self, model: nn.Module, mean, *, lr: float = 0.1,
               momentum: float = 0.9, weight_decay: float = 1e-4,
               pad: int = 4, channels_last: bool = False,
               dtype: torch.dtype = torch.float32):
    self.model = model
    self.memory_format = (torch.channels_last if channels_last
                          else torch.contiguous_format)
    model.to(memory_format=self.memory_format)
    # (H, W, C) or (C,) mean in [0, 1] units -> broadcastable over NCHW.
    mean = torch.as_tensor(mean, dtype=torch.float32)
    self.mean = (mean.permute(2, 0, 1) if mean.ndim == 3
                 else mean.reshape(-1, 1, 1))
    self.pad = pad
    self.dtype = dtype
    self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                               weight_decay=weight_decay)
    self.gen = torch.Generator().manual_seed(0)

  def _augment(self, x):
    n, _, h, w = x.shape
    p = self.pad
    if p:
      x = F.pad(x, (p, p, p, p))
      # One gather for all crops: per-example offsets into the padded maps.
      off = torch.randint(0, 2 * p + 1, (n, 2), generator=self.gen)
      rows = (off[:, 0:1] + torch.arange(h)).view(n, 1, h, 1)
      cols = (off[:, 1:2] + torch.arange(w)).view(n, 1, 1, w)
      x = x[torch.arange(n).view(n, 1, 1, 1),
            torch.arange(x.shape[1]).view(1, -1, 1, 1), rows, cols]
    flip = torch.rand(n, generator=self.gen) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)

  def __call__(self, images, labels) -> float:
    """images: uint8 (N, H, W, C) tensor; labels: int64 (N,). Returns loss."""
    self.model.train()
    x = images.permute(0, 3, 1, 2).float() / 255.0 - self.mean
    x = self._augment(x).contiguous(memory_format=self.memory_format)
    with torch.autocast('cpu', dtype=self.dtype,
                        enabled=self.dtype != torch.float32):
      logits = self.model(x)
    loss = F.cross_entropy(logits.float(), labels)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss.detach()

  @torch.no_grad()
  def eval(self, images):
    self.model.eval()
    x = images.permute(0, 3, 1, 2).float() / 255.0 - self.mean
    x = x.contiguous(memory_format=self.memory_format)
    with torch.autocast('cpu', dtype=self.dtype,
                        enabled=self.dtype != torch.float32):
      return self.model(x).float()


def conv_layer_times(batch: int, height: int, width: int, cin: int, cout: int,
                     kernel: int, stride: int, steps: int = 10) -> dict:
  """PyTorch's forward / input gradient / weight gradient of one conv
  (NCHW, float32), median seconds, as `cnn.tools.benchmarking` times JAX's."""
  import time  # pylint: disable=g-import-not-at-top
  from torch.nn import grad as nn_grad  # pylint: disable=g-import-not-at-top
  x = torch.randn(batch, cin, height, width)
  w = torch.randn(cout, cin, kernel, kernel) * 0.1
  pad = kernel // 2
  y = F.conv2d(x, w, stride=stride, padding=pad)
  g = torch.randn_like(y)
  fns = {
      'forward': lambda: F.conv2d(x, w, stride=stride, padding=pad),
      'input_grad': lambda: nn_grad.conv2d_input(x.shape, w, g, stride=stride,
                                                 padding=pad),
      'weight_grad': lambda: nn_grad.conv2d_weight(x, w.shape, g,
                                                   stride=stride, padding=pad),
  }
  out = {}
  with torch.no_grad():
    for name, fn in fns.items():
      fn()
      fn()
      ts = []
      for _ in range(steps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
      out[name] = sorted(ts)[len(ts) // 2]
  return out
