"""2-D convolution through oneDNN (the library PyTorch's CPU convolutions
use), called from jitted programs as XLA FFI custom calls.

XLA:CPU's own convolution kernels are the slow part of a CIFAR ResNet's
train step on a CPU (results/speed/). oneDNN's are not: `conv` runs the
forward pass, the input gradient and the weight gradient as three custom
calls (`native/onednn_conv.cc`) under one `custom_vjp`, on NHWC activations
and HWIO weights in place. It is equal to XLA's convolution to float32
rounding (tests/ops/test_onednn.py).

`status()` says whether it can run here: on a CPU backend, with the library
built (`make setup`) and oneDNN's shared library present. Everything else
(GPU, TPU, an unbuilt library) keeps XLA's convolution; `cnn.ops.conv` picks.
"""
from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from cnn.ops.native import build as native_build

_TARGETS = {'fwd': 'cnn_onednn_conv_fwd',
            'bwd_data': 'cnn_onednn_conv_bwd_data',
            'bwd_weights': 'cnn_onednn_conv_bwd_weights'}
_SYMBOLS = {'fwd': 'OnednnConvFwd', 'bwd_data': 'OnednnConvBwdData',
            'bwd_weights': 'OnednnConvBwdWeights'}

# NHWC activations, HWIO weights: what flax's nn.Conv passes.
NHWC_HWIO = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


_LIB = []  # the loaded library, once `_load` succeeded


@functools.lru_cache(maxsize=None)
def _load() -> tuple[str | None, str]:
  """(None, oneDNN version) when loaded and registered; else (reason, '')."""
  if not native_build.is_built():
    return ('not built (run `make setup`, or python -m '
            'cnn.ops.native.build)', '')
  dnnl = native_build.find_onednn_library()
  if dnnl is None:
    return ('oneDNN library missing (pip install -c constraints.txt '
            'onednn-cpu-gomp)', '')
  try:
    ctypes.CDLL(dnnl, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(native_build.LIBRARY)
  except OSError as e:
    return f'cannot load: {e}', ''
  for kind, symbol in _SYMBOLS.items():
    jax.ffi.register_ffi_target(
        _TARGETS[kind], jax.ffi.pycapsule(getattr(lib, symbol)),
        platform='cpu')
  lib.onednn_conv_version.restype = ctypes.c_char_p
  lib.onednn_conv_check.restype = ctypes.c_int
  lib.onednn_conv_check.argtypes = [ctypes.POINTER(ctypes.c_int64),
                                    ctypes.c_char_p, ctypes.c_int]
  _LIB.append(lib)
  return None, lib.onednn_conv_version().decode()


def status() -> tuple[bool, str]:
  """(usable here, one line saying what and why)."""
  if jax.default_backend() != 'cpu':
    return False, f'XLA (oneDNN is for CPU; backend {jax.default_backend()})'
  reason, version = _load()
  if reason:
    return False, f'XLA (oneDNN convolution {reason})'
  n = _threads()
  return True, (f"oneDNN {version} via XLA FFI ({n} thread"
                f"{'' if n == '1' else 's'})")


def _threads() -> str:
  return os.environ.get('OMP_NUM_THREADS') or str(os.cpu_count())


def supports(lhs, rhs, dn, strides, padding) -> bool:
  """Shapes the kernel handles (the caller has ruled out dilation and
  groups): 2-D, float32, NHWC/HWIO, and oneDNN has a fast kernel it trusts
  for all three passes (`kernel_check`). Others take XLA's convolution."""
  return (lhs.ndim == 4 and lhs.dtype == jnp.float32
          and rhs.dtype == jnp.float32
          and (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec))
          == NHWC_HWIO
          and kernel_check(tuple(lhs.shape), tuple(rhs.shape),
                           tuple(strides), tuple(padding))[0])


@functools.lru_cache(maxsize=None)
def kernel_check(x_shape, w_shape, strides, padding) -> tuple[bool, str]:
  """(True, '') when oneDNN runs this convolution's forward pass and both
  gradients on JIT kernels; else (False, which pass has what). oneDNN
  picks by shape and thread count: a layer whose maps are tiny (2x2 under
  a 3x3 kernel) can get only its im2col+GEMM kernel, which crashed here,
  or its reference loops, far slower (results/speed/README.md, "Numbers
  behind the code's comments"); such a layer keeps XLA's convolution
  (native/onednn_conv.cc says which kernels are skipped)."""
  if not status()[0]:
    return False, status()[1]
  (pt, pb), (pl, pr) = padding
  n, h, w, c = x_shape
  kh, kw, _, k = w_shape
  _, oh, ow, _ = out_shape(x_shape, w_shape, strides, padding)
  geometry = (ctypes.c_int64 * 15)(n, h, w, c, kh, kw, k, oh, ow,
                                   strides[0], strides[1], pt, pb, pl, pr)
  why = ctypes.create_string_buffer(512)
  ok = bool(_LIB[0].onednn_conv_check(geometry, why, len(why)))
  return ok, why.value.decode()


def _attrs(strides, padding) -> dict:
  (pt, pb), (pl, pr) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(pt), pad_bottom=np.int64(pb),
              pad_left=np.int64(pl), pad_right=np.int64(pr))


def _call(kind, out_shape, a, b, strides, padding):
  return jax.ffi.ffi_call(
      _TARGETS[kind], jax.ShapeDtypeStruct(out_shape, jnp.float32),
      vmap_method='sequential')(a, b, **_attrs(strides, padding))


def out_shape(x_shape, w_shape, strides, padding) -> tuple[int, ...]:
  n, h, w, _ = x_shape
  kh, kw, _, k = w_shape
  (pt, pb), (pl, pr) = padding
  return (n, (h + pt + pb - kh) // strides[0] + 1,
          (w + pl + pr - kw) // strides[1] + 1, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, w, strides, padding):
  """NHWC x HWIO -> NHWC convolution; strides (sh, sw), padding
  ((top, bottom), (left, right)) as explicit pairs."""
  return _call('fwd', out_shape(x.shape, w.shape, strides, padding), x, w,
               strides, padding)


def _conv_fwd(x, w, strides, padding):
  return conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, res, g):
  x, w = res
  dx = _call('bwd_data', x.shape, g, w, strides, padding)
  dw = _call('bwd_weights', w.shape, x, g, strides, padding)
  return dx, dw


conv.defvjp(_conv_fwd, _conv_bwd)
