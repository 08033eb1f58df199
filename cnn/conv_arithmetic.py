"""The lecture's arithmetic of conv/pool layers, and the convolution as a
matrix.

Conventions shared by every function below:

* Activations are NHWC and kernels HWIO, the layout Flax's `nn.Conv` uses,
  so its kernels can be passed here unchanged.
* "Convolution" means cross-correlation (no kernel flip), as in every CNN
  framework.
* Sizes follow the lecture's notation: input N (or H, W), filter F, stride S,
  zero padding P, K filters; a layer's output side is (N + 2P - F)/S + 1.
* In the 2-D helpers an int applies to both spatial axes and a pair is
  per-axis (height, width); a padding entry may itself be a (lo, hi) pair for
  asymmetric padding.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


# --------------------------------------------------------------------------
# Argument normalisation.


def _int(v, name: str, minimum: int) -> int:
  # operator.index rejects floats such as 2.5 instead of silently truncating
  # them; bools are ints to Python but never a meaningful size here.
  if isinstance(v, bool):
    raise TypeError(f'{name} must be an int, got {v!r}')
  try:
    v = operator.index(v)
  except TypeError:
    raise TypeError(f'{name} must be an int, got {v!r}') from None
  if v < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {v}')
  return v


def _is_pair(v) -> bool:
  if isinstance(v, np.ndarray):
    return v.ndim == 1
  return isinstance(v, Sequence) and not isinstance(v, str)


def _pair(v, name: str, minimum: int) -> tuple[int, int]:
  """An int or a per-axis (height, width) pair of ints."""
  if _is_pair(v):
    if len(v) != 2:
      raise ValueError(f'{name} must be an int or a (height, width) pair, '
                       f'got {v!r}')
    return (_int(v[0], f'{name}[0]', minimum), _int(v[1], f'{name}[1]',
                                                    minimum))
  v = _int(v, name, minimum)
  return v, v


def _lo_hi(p, name: str) -> tuple[int, int]:
  """One axis's padding: an int (both sides) or a (lo, hi) pair."""
  if _is_pair(p):
    if len(p) != 2:
      raise ValueError(f'{name} must be an int or a (lo, hi) pair, got {p!r}')
    return _int(p[0], f'{name} lo', 0), _int(p[1], f'{name} hi', 0)
  p = _int(p, name, 0)
  return p, p


def _padding2d(p, name: str = 'padding') -> tuple[tuple[int, int], ...]:
  """2-D padding as ((top, bottom), (left, right)).

  Accepts P, (P_h, P_w) or ((top, bottom), (left, right)).
  """
  if _is_pair(p):
    if len(p) != 2:
      raise ValueError(f'{name} must be an int, a (height, width) pair or '
                       f'((top, bottom), (left, right)), got {p!r}')
    return (_lo_hi(p[0], f'{name}[0]'), _lo_hi(p[1], f'{name}[1]'))
  lo_hi = _lo_hi(p, name)
  return lo_hi, lo_hi


def _fmt_p(lo: int, hi: int) -> str:
  return str(lo) if lo == hi else f'({lo}, {hi})'


# --------------------------------------------------------------------------
# Conv / pool arithmetic.


def conv_output_size(n: int, f: int, s: int = 1, p=0, *,
                     strict: bool = True) -> int:
  """Output side of a conv or pool layer: (N + 2P - F)/S + 1.

  Args:
    n: input side N.
    f: filter (window) side F.
    s: stride S.
    p: zero padding P on each side, or a (lo, hi) pair for asymmetric
      padding, in which case 2P reads lo + hi.
    strict: if True (the default, for designing nets) the filter must tile
      the padded input exactly; if False the result is floored, which is what
      `lax.conv_general_dilated` with explicit padding, PyTorch and Flax's
      `nn.Conv` compute (the last rows/columns that do not fill a whole
      window are dropped).

  Returns:
    The output side, >= 1.

  Raises:
    ValueError: in a single line naming N, F, S and P, when the filter is
      larger than the padded input, or (strict only) when the stride does not
      divide N + 2P - F. The message lists the paddings in 0..F that would
      fit and the strides that fit with the given padding.
  """
  n = _int(n, 'N', 1)
  f = _int(f, 'F', 1)
  s = _int(s, 'S', 1)
  lo, hi = _lo_hi(p, 'P')
  span = n + lo + hi - f
  if span >= 0 and (span % s == 0 or not strict):
    return span // s + 1

  # Build one line that says both what is wrong and how to fix it, so that a
  # bad config fails with an actionable error rather than a shape mismatch
  # several layers later.
  p_txt = _fmt_p(lo, hi)
  given = f'(N={n}, F={f}, S={s}, P={p_txt})'
  if span < 0:
    what = (f'impossible conv arithmetic: filter F={f} is larger than the '
            f'padded input N + 2P = {n + lo + hi} {given}')
  else:
    two_p = f'2*{lo}' if lo == hi else f'{lo}+{hi}'
    what = (f'impossible conv arithmetic: (N + 2P - F)/S + 1 = '
            f'({n} + {two_p} - {f})/{s} + 1 = {span / s + 1:g} is not an '
            f'integer {given}')
  fits = [(q, (n + 2 * q - f) // s + 1) for q in range(f + 1)
          if n + 2 * q - f >= 0 and (n + 2 * q - f) % s == 0]
  if fits:
    hint = (f'paddings that fit at S={s}: '
            + ', '.join(f'P={q} -> {out}' for q, out in fits))
  else:
    hint = f'no padding P in 0..{f} fits at S={s}'
  if span >= 0:
    strides = [t for t in range(1, max(f, s) + 1) if span % t == 0]
    hint += (f'; strides that fit at P={p_txt}: '
             + ', '.join(f'S={t} -> {span // t + 1}' for t in strides))
    hint += f'; strict=False floors it to {span // s + 1}'
  raise ValueError(f'{what}; {hint}')


def conv_output_shape(input_hw_or_hwc, f, s=1, p=0, k: int | None = None,
                      strict: bool = True) -> tuple[int, ...]:
  """Output shape of a 2-D conv layer, one `conv_output_size` per axis.

  Args:
    input_hw_or_hwc: input shape (H, W) or (H, W, D); the depth D does not
      affect the spatial sizes.
    f: filter side, or a per-axis (F_h, F_w) pair.
    s: stride, or a per-axis pair.
    p: padding, a per-axis (P_h, P_w) pair, or ((top, bottom), (left, right)).
    k: number of filters K; when given it is appended as the output depth.
    strict: as in `conv_output_size`.

  Returns:
    (H_out, W_out), or (H_out, W_out, K) when `k` is given.

  Raises:
    ValueError: as in `conv_output_size`, prefixed by the failing axis.
  """
  shape = tuple(input_hw_or_hwc)
  if len(shape) not in (2, 3):
    raise ValueError(f'input shape must be (H, W) or (H, W, D), got {shape}')
  fs, ss, ps = _pair(f, 'F', 1), _pair(s, 'S', 1), _padding2d(p, 'P')
  out = []
  for axis, n, fa, sa, pa in zip(('height', 'width'), shape[:2], fs, ss, ps):
    try:
      out.append(conv_output_size(n, fa, sa, pa, strict=strict))
    except ValueError as e:
      raise ValueError(f'{axis}: {e}') from None
  if k is not None:
    out.append(_int(k, 'K', 1))
  return tuple(out)


def pool_output_shape(input_hw_or_hwc, f, s=None, p=0,
                      strict: bool = True) -> tuple[int, ...]:
  """Output shape of a 2-D pooling layer; pooling keeps the depth.

  Args:
    input_hw_or_hwc: input shape (H, W) or (H, W, D).
    f: window side, or a per-axis pair.
    s: stride, or a per-axis pair; defaults to `f` (non-overlapping windows).
    p: padding, as in `conv_output_shape`.
    strict: as in `conv_output_size`.

  Returns:
    (H_out, W_out), or (H_out, W_out, D) for a 3-D input shape.
  """
  shape = tuple(input_hw_or_hwc)
  depth = shape[2] if len(shape) == 3 else None
  return conv_output_shape(shape, f, f if s is None else s, p, k=depth,
                           strict=strict)


def conv_params(f, d_in: int, k: int, bias: bool = True) -> int:
  """Learnable parameters of a conv layer: F*F*D_in*K weights + K biases.

  Args:
    f: filter side F, or an (F_h, F_w) pair.
    d_in: input depth D_in.
    k: number of filters K.
    bias: whether each filter has a bias (False before BatchNorm, as in
      ResNets, where the norm's shift makes it redundant).

  Returns:
    The parameter count.
  """
  fh, fw = _pair(f, 'F', 1)
  d_in, k = _int(d_in, 'D_in', 1), _int(k, 'K', 1)
  return fh * fw * d_in * k + (k if bias else 0)


# --------------------------------------------------------------------------
# Convolution, pooling and their adjoint.


def _lax_padding(padding):
  # Strings go to lax untouched so that 'SAME' keeps XLA's own convention.
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(f"padding string must be 'SAME' or 'VALID', "
                       f'got {padding!r}')
    return padding.upper()
  return _padding2d(padding)


def _as_nhwc(x, kernel, name: str):
  """Lifts the single-channel 2-D convenience form to NHWC / HWIO."""
  x, kernel = jnp.asarray(x), jnp.asarray(kernel)
  if x.ndim == 2 and kernel.ndim == 2:
    return x[None, :, :, None], kernel[:, :, None, None], True
  if x.ndim == 4 and kernel.ndim == 4:
    return x, kernel, False
  raise ValueError(f'{name} takes an NHWC array with an HWIO kernel or a 2-D '
                   f'array with a 2-D kernel, got shapes {x.shape} and '
                   f'{kernel.shape}')


def conv2d(x, kernel, stride=1, padding=0, precision=None):
  """2-D convolution (cross-correlation, as in CNNs) by XLA.

  Output sizes follow the floor form (`conv_output_size(..., strict=False)`),
  as in every framework: a stride-2 3x3 conv with P=1 on a 32x32 input gives
  16x16 although (32 + 2 - 3)/2 + 1 is not an integer. Use
  `conv_output_shape` with strict=True to check a design exactly.

  Args:
    x: NHWC input, or a 2-D (H, W) array as a single-channel convenience.
    kernel: HWIO kernel (F_h, F_w, D_in, K), or a 2-D (F_h, F_w) kernel
      with a 2-D `x`.
    stride: S, or a per-axis pair.
    padding: zero padding P, a per-axis pair, ((top, bottom), (left,
      right)), or 'SAME' / 'VALID'.
    precision: passed to `lax.conv_general_dilated`; HIGHEST avoids the
      reduced-precision (e.g. TF32) default of some accelerators.

  Returns:
    The NHWC output (N, H_out, W_out, K), or (H_out, W_out) for 2-D input.
  """
  x4, k4, two_d = _as_nhwc(x, kernel, 'conv2d')
  y = lax.conv_general_dilated(x4, k4, _pair(stride, 'stride', 1),
                               _lax_padding(padding),
                               dimension_numbers=_NHWC, precision=precision)
  return y[0, :, :, 0] if two_d else y


def max_pool2d(x, f, s=None, padding=0):
  """2-D max pooling by `lax.reduce_window`.

  Args:
    x: NHWC input, or a 2-D (H, W) array.
    f: window side F, or a per-axis pair.
    s: stride S, or a per-axis pair; defaults to `f`.
    padding: as in `conv2d`; padded cells never win the max.

  Returns:
    The pooled array, (N, H_out, W_out, C) or (H_out, W_out); the depth is
    kept. Sizes follow the floor form, as in `conv2d`.
  """
  x = jnp.asarray(x)
  if x.ndim not in (2, 4):
    raise ValueError(f'max_pool2d takes an NHWC or a 2-D array, got shape '
                     f'{x.shape}')
  fh, fw = _pair(f, 'f', 1)
  sh, sw = _pair(f if s is None else s, 's', 1)
  # The identity of max: padding with it (rather than zeros) keeps padded
  # cells from winning over negative activations.
  if jnp.issubdtype(x.dtype, jnp.floating):
    init = -jnp.inf
  elif jnp.issubdtype(x.dtype, jnp.integer):
    init = jnp.iinfo(x.dtype).min
  else:
    init = False
  init = np.array(init, dtype=x.dtype)
  pad = _lax_padding(padding)
  if x.ndim == 2:
    window, strides = (fh, fw), (sh, sw)
  else:
    window, strides = (1, fh, fw, 1), (1, sh, sw, 1)
    if not isinstance(pad, str):
      pad = ((0, 0),) + pad + ((0, 0),)
  return lax.reduce_window(x, init, lax.max, window, strides, pad)


def conv_transpose2d(y, kernel, stride=1, padding=0, input_size=None,
                     precision=None):
  """Transposed convolution: the adjoint of `conv2d` (not its inverse).

  This is the map backprop applies to an output gradient to get the input
  gradient, i.e. C^T for the conv matrix C of `conv_matrix`, and the
  "deconvolution" / fractionally-strided conv that upsamples in FCNs. It is
  computed by XLA as a convolution of the stride-dilated `y` with the
  spatially flipped, in/out-swapped kernel, never through C.

  Args:
    y: NHWC array (N, H_out, W_out, K) in the forward conv's output space,
      or a 2-D (H_out, W_out) array with a 2-D kernel.
    kernel: the forward conv's HWIO kernel (F_h, F_w, D_in, K), or 2-D.
    stride: the forward conv's stride.
    padding: the forward conv's padding (ints or (lo, hi) pairs).
    input_size: the forward conv's input side N or (H, W). Several input
      sizes floor to the same output size when S > 1, so it is needed to undo
      that; default: the smallest, (H_out - 1)*S + F - 2P.
    precision: as in `conv2d`.

  Returns:
    (N, H, W, D_in), or (H, W) for 2-D input.
  """
  y4, k4, two_d = _as_nhwc(y, kernel, 'conv_transpose2d')
  strides = _pair(stride, 'stride', 1)
  pads = _padding2d(padding)
  fs = k4.shape[:2]
  outs = y4.shape[1:3]
  if input_size is None:
    sizes = tuple((o - 1) * s + f - lo - hi
                  for o, s, f, (lo, hi) in zip(outs, strides, fs, pads))
  else:
    sizes = _pair(input_size, 'input_size', 1)
  trans_pad = []
  for axis, n, o, s, f, (lo, hi) in zip(('height', 'width'), sizes, outs,
                                        strides, fs, pads):
    expected = conv_output_size(n, f, s, (lo, hi), strict=False)
    if expected != o:
      raise ValueError(f'conv_transpose2d {axis}: a conv with F={f}, S={s}, '
                       f'P={_fmt_p(lo, hi)} maps input {n} to {expected}, '
                       f'not to the given {o}')
    # Full correlation of the dilated y gives (o-1)*s + f positions starting
    # at padded-input index 0; drop the lo padded ones in front (negative
    # padding crops) and pad or crop the end to land on exactly n.
    dilated = (o - 1) * s + 1
    tlo = f - 1 - lo
    thi = n - dilated - tlo + f - 1
    trans_pad.append((tlo, thi))
  k_adj = jnp.swapaxes(jnp.flip(k4, (0, 1)), 2, 3)
  x = lax.conv_general_dilated(y4, k_adj, (1, 1), trans_pad,
                               lhs_dilation=strides, dimension_numbers=_NHWC,
                               precision=precision)
  return x[0, :, :, 0] if two_d else x


def conv_matrix(kernel, input_size, stride=1, padding=0) -> np.ndarray:
  """The matrix C of a 2-D convolution: C @ vec(x) == vec(conv2d(x)).

  vec is row-major flattening (x.reshape(-1)), so for a 3x3 kernel w on a
  4x4 input (S=1, P=0) C is 4x16 and its first row is
  [w00 w01 w02 0 w10 w11 w12 0 w20 w21 w22 0 0 0 0 0]. Padding is handled by
  building C for the padded input and dropping the columns of padded cells,
  which multiply zeros. C is dense, (H_out*W_out*K) x (H*W*D_in): meant for
  teaching and tests on small inputs, not for computing convolutions.

  Args:
    kernel: a 2-D (F_h, F_w) kernel, or an HWIO kernel (F_h, F_w, D_in, K).
    input_size: input side N, or (H, W).
    stride: as in `conv2d`.
    padding: as in `conv2d`, except strings.

  Returns:
    C as a numpy array of the kernel's dtype: (H_out*W_out, H*W) for a 2-D
    kernel; (H_out*W_out*K, H*W*D_in) for an HWIO kernel, rows and columns
    in NHWC order (the vec of one image, batch dimension dropped).
  """
  w = np.asarray(kernel)
  if w.ndim == 2:
    w = w[:, :, None, None]
  elif w.ndim != 4:
    raise ValueError(f'kernel must be 2-D or HWIO, got shape {w.shape}')
  fh, fw, d_in, k = w.shape
  h, wd = _pair(input_size, 'input_size', 1)
  sh, sw = _pair(stride, 'stride', 1)
  (pt, pb), (pl, pr) = _padding2d(padding)
  ho = conv_output_size(h, fh, sh, (pt, pb), strict=False)
  wo = conv_output_size(wd, fw, sw, (pl, pr), strict=False)
  hp, wp = h + pt + pb, wd + pl + pr

  c = np.zeros((ho, wo, k, hp, wp, d_in), dtype=w.dtype)
  ii = np.arange(ho)[:, None]
  jj = np.arange(wo)[None, :]
  # Output (i, j) sees padded input (i*S + a, j*S + b) through tap w[a, b];
  # for a fixed tap every output reads a distinct cell, so plain assignment
  # (no accumulation) is exact.
  for a in range(fh):
    for b in range(fw):
      c[ii, jj, :, ii * sh + a, jj * sw + b, :] = w[a, b].T
  c = c[:, :, :, pt:pt + h, pl:pl + wd, :]
  return c.reshape(ho * wo * k, h * wd * d_in)
