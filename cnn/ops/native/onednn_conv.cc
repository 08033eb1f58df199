// 2-D convolution through oneDNN as three XLA FFI handlers (CPU only).
//
// Layouts are JAX's: activations NHWC, weights HWIO, used in place. Each
// primitive is created with the weights in oneDNN's preferred blocked layout
// (`format_tag::any`); the HWIO weights (a few KB for a CIFAR layer) are
// reordered to it on each call, which is what makes the two gradients fast
// (with plain HWIO weights they were 2-8x slower). Primitives and reorders
// are cached per shape, stride and padding.
//
//   onednn_conv_fwd          x (N,H,W,C), w (KH,KW,C,K)    -> y  (N,OH,OW,K)
//   onednn_conv_bwd_data     dy (N,OH,OW,K), w              -> dx (N,H,W,C)
//   onednn_conv_bwd_weights  x (N,H,W,C), dy (N,OH,OW,K)   -> dw (KH,KW,C,K)
//
// Attributes: stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right
// (int64). Float32 only; the Python side falls back to XLA otherwise.

#include <array>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <xmmintrin.h>
#include <pmmintrin.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

enum Kind { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

using Key = std::array<int64_t, 15>;

struct Geometry {
  int64_t n, h, w, c, kh, kw, k, oh, ow;
  int64_t sh, sw, pt, pb, pl, pr;
};

struct Entry {
  dnnl::primitive prim;
  memory::desc src, wei, dst;   // as the primitive wants them
  memory::desc user_wei;        // HWIO
  dnnl::reorder wei_reorder;    // HWIO -> blocked (fwd, bwd_data) or back
  bool same_wei = false;        // the primitive took HWIO itself
  std::string impl;             // oneDNN's name for the kernel it runs
};

dnnl::engine& Engine() {
  static dnnl::engine* eng = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *eng;
}

// Denormal inputs made oneDNN's kernels up to 100x slower; XLA:CPU flushes
// denormals to zero in its own threads, so the OpenMP threads oneDNN runs on
// do the same (same numerics as XLA's convolution). OpenMP keeps one team per
// calling thread, so this runs once in each thread that calls in.
void FlushDenormalsInOmpThreads() {
  thread_local bool done = false;
  if (done) return;
#pragma omp parallel
  { _mm_setcsr(_mm_getcsr() | 0x8040); }
  done = true;
}

memory::dims Nchw(int64_t n, int64_t c, int64_t h, int64_t w) {
  return {n, c, h, w};
}

// Implementations oneDNN would pick that are skipped for the next one on
// its list (a shape with nothing else keeps its first; `onednn_conv_check`
// then sends the layer to XLA):
// * im2col + GEMM (`gemm` in the name), which oneDNN picks for tiny maps
//   such as 2x2 or 1x1 under a 3x3 kernel with padding 1 at one OpenMP
//   thread: its weight gradient crashed in im2col (a segmentation fault in
//   the suite's vgg_tiny test run after resnet_tiny, about 3 runs in 4 on
//   a 2-core AVX2 EPYC; oneDNN has fixed invalid reads in this kernel on
//   AVX2 before). Never picked for a CIFAR ResNet at batch 128;
// * the strided 1x1 weight gradient (`jit_1x1`) with fewer than 16 input
//   channels, reported to write past its workspace (oneDNN issue 6035).
bool Unsafe(const std::string& impl, const Geometry& g) {
  if (impl.find("gemm") != std::string::npos) return true;
  return impl.find("jit_1x1") != std::string::npos && g.c < 16 &&
         (g.sh > 1 || g.sw > 1);
}

template <typename PD>
void SkipUnsafe(PD& pd, const Geometry& g) {
  PD first = pd;
  while (Unsafe(pd.impl_info_str(), g)) {
    if (!pd.next_impl()) {
      pd = first;
      return;
    }
  }
}

Entry Build(Kind kind, const Geometry& g) {
  dnnl::engine& eng = Engine();
  memory::dims strides = {g.sh, g.sw};
  memory::dims pad_l = {g.pt, g.pl}, pad_r = {g.pb, g.pr};
  auto src_md = memory::desc(Nchw(g.n, g.c, g.h, g.w), dt::f32, tag::nhwc);
  auto dst_md = memory::desc(Nchw(g.n, g.k, g.oh, g.ow), dt::f32, tag::nhwc);
  memory::dims wdims = {g.k, g.c, g.kh, g.kw};
  auto user_wei = memory::desc(wdims, dt::f32, tag::hwio);
  auto any_wei = memory::desc(wdims, dt::f32, tag::any);

  auto fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, src_md, any_wei, dst_md, strides,
      pad_l, pad_r);
  Entry e;
  e.user_wei = user_wei;
  if (kind == kFwd) {
    SkipUnsafe(fwd_pd, g);
    e.prim = dnnl::convolution_forward(fwd_pd);
    e.impl = fwd_pd.impl_info_str();
    e.src = fwd_pd.src_desc();
    e.wei = fwd_pd.weights_desc();
    e.dst = fwd_pd.dst_desc();
  } else if (kind == kBwdData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, src_md, any_wei, dst_md,
        strides, pad_l, pad_r, fwd_pd);
    SkipUnsafe(pd, g);
    e.prim = dnnl::convolution_backward_data(pd);
    e.impl = pd.impl_info_str();
    e.src = pd.diff_src_desc();
    e.wei = pd.weights_desc();
    e.dst = pd.diff_dst_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, src_md, any_wei, dst_md,
        strides, pad_l, pad_r, fwd_pd);
    SkipUnsafe(pd, g);
    e.prim = dnnl::convolution_backward_weights(pd);
    e.impl = pd.impl_info_str();
    e.src = pd.src_desc();
    e.wei = pd.diff_weights_desc();
    e.dst = pd.diff_dst_desc();
  }
  e.same_wei = (e.wei == user_wei);
  if (!e.same_wei) {
    e.wei_reorder = kind == kBwdWeights
                        ? dnnl::reorder(dnnl::reorder::primitive_desc(
                              eng, e.wei, eng, user_wei))
                        : dnnl::reorder(dnnl::reorder::primitive_desc(
                              eng, user_wei, eng, e.wei));
  }
  return e;
}

// Cached primitives; entries are never removed, so a reference stays valid.
const Entry& Lookup(Kind kind, const Geometry& g) {
  static std::mutex mu;
  static auto* cache = new std::map<Key, std::unique_ptr<Entry>>();
  Key key = {kind, g.n,  g.h,  g.w,  g.c,  g.kh, g.kw, g.k,
             g.sh, g.sw, g.pt, g.pb, g.pl, g.pr, 0};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it == cache->end()) {
    it = cache->emplace(key, std::make_unique<Entry>(Build(kind, g))).first;
  }
  return *it->second;
}

// Scratch space for the blocked weights, one per thread that calls in.
float* WeightScratch(size_t bytes) {
  thread_local std::unique_ptr<char[]> buf;
  thread_local size_t size = 0;
  if (bytes > size) {
    buf.reset(new char[bytes + 64]);
    size = bytes;
  }
  uintptr_t p = reinterpret_cast<uintptr_t>(buf.get());
  return reinterpret_cast<float*>((p + 63) & ~uintptr_t{63});
}

ffi::Error Run(Kind kind, const Geometry& g, float* src, float* wei,
               float* dst) {
  try {
    FlushDenormalsInOmpThreads();
    const Entry& e = Lookup(kind, g);
    dnnl::engine& eng = Engine();
    dnnl::stream strm(eng);
    memory src_m(e.src, eng, src), dst_m(e.dst, eng, dst);
    memory user_w(e.user_wei, eng, wei);
    memory w_m = e.same_wei
                     ? user_w
                     : memory(e.wei, eng, WeightScratch(e.wei.get_size()));
    if (kind == kFwd) {
      if (!e.same_wei) e.wei_reorder.execute(strm, user_w, w_m);
      e.prim.execute(strm, {{DNNL_ARG_SRC, src_m},
                            {DNNL_ARG_WEIGHTS, w_m},
                            {DNNL_ARG_DST, dst_m}});
    } else if (kind == kBwdData) {
      if (!e.same_wei) e.wei_reorder.execute(strm, user_w, w_m);
      e.prim.execute(strm, {{DNNL_ARG_DIFF_SRC, src_m},
                            {DNNL_ARG_WEIGHTS, w_m},
                            {DNNL_ARG_DIFF_DST, dst_m}});
    } else {
      e.prim.execute(strm, {{DNNL_ARG_SRC, src_m},
                            {DNNL_ARG_DIFF_WEIGHTS, w_m},
                            {DNNL_ARG_DIFF_DST, dst_m}});
      if (!e.same_wei) e.wei_reorder.execute(strm, w_m, user_w);
    }
    strm.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN convolution: ") + err.what());
  }
  return ffi::Error::Success();
}

Geometry Geom(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
              ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
              int64_t pb, int64_t pl, int64_t pr) {
  return Geometry{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2],
                  sh,   sw,   pt,   pb,   pl,   pr};
}

ffi::Error FwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Geometry g = Geom(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw,
                    pt, pb, pl, pr);
  return Run(kFwd, g, x.typed_data(), w.typed_data(), y->typed_data());
}

ffi::Error BwdDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw,
                       int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Geometry g = Geom(dx->dimensions(), w.dimensions(), dy.dimensions(), sh,
                    sw, pt, pb, pl, pr);
  return Run(kBwdData, g, dx->typed_data(), w.typed_data(), dy.typed_data());
}

ffi::Error BwdWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t sh,
                          int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                          int64_t pr) {
  Geometry g = Geom(x.dimensions(), dw->dimensions(), dy.dimensions(), sh,
                    sw, pt, pb, pl, pr);
  return Run(kBwdWeights, g, x.typed_data(), dw->typed_data(),
             dy.typed_data());
}

}  // namespace

#define CONV_ATTRS                \
  .Attr<int64_t>("stride_h")      \
      .Attr<int64_t>("stride_w")  \
      .Attr<int64_t>("pad_top")   \
      .Attr<int64_t>("pad_bottom") \
      .Attr<int64_t>("pad_left")  \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdData, BwdDataImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdWeights, BwdWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

// Whether all three passes of this convolution get a fast kernel that is
// not skipped above (oneDNN's reference kernels, `ref`, are plain loops:
// 1.4-7 ms for a 2x2 layer of batch 2): 1 if so, 0 if not, so that the
// Python side gives the layer to XLA at trace time. `why` gets the pass
// and kernel that failed (or oneDNN's error). Primitives are built and
// cached here, as their first call would.
extern "C" int onednn_conv_check(const int64_t* geometry, char* why,
                                 int why_size) {
  const int64_t* v = geometry;
  Geometry g{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7],
             v[8], v[9], v[10], v[11], v[12], v[13], v[14]};
  static const char* kNames[] = {"forward", "input gradient",
                                 "weight gradient"};
  std::string reason;
  try {
    for (Kind kind : {kFwd, kBwdData, kBwdWeights}) {
      const Entry& e = Lookup(kind, g);
      if (Unsafe(e.impl, g) || e.impl.rfind("ref", 0) == 0) {
        reason = std::string(kNames[kind]) + " has only oneDNN's '" +
                 e.impl + "' kernel";
        break;
      }
    }
  } catch (const dnnl::error& err) {
    reason = std::string("oneDNN: ") + err.what();
  }
  if (why_size > 0) {
    std::snprintf(why, why_size, "%s", reason.c_str());
  }
  return reason.empty() ? 1 : 0;
}

// The oneDNN version this was built against, for the run's records.
extern "C" const char* onednn_conv_version() {
  static std::string v = [] {
    const dnnl_version_t* ver = dnnl_version();
    return std::to_string(ver->major) + "." + std::to_string(ver->minor) +
           "." + std::to_string(ver->patch);
  }();
  return v.c_str();
}
