"""Native convolution kernels, called from jitted programs through XLA's FFI.

`onednn_conv.cc` is built by `make setup` (`python -m cnn.ops.native.build`)
against the oneDNN of the PyPI packages `onednn-cpu-gomp` and
`onednn-devel-cpu-gomp`; `cnn.ops.onednn` loads it and falls back to XLA's
convolution where it is not built.
"""
