// 2-D convolution on CPU through oneDNN's C++ API, as MindSpore AOT custom ops (src/ops/conv.py).
//
// Why: MindSpore's CPU Conv2D hands oneDNN plain NCHW tensors, which needs the AVX2 cap and an
// im2col + sgemm path. Here oneDNN picks its own (blocked) layouts (format_tag::any) and the
// tensors are reordered from and to NCHW around each call; on the 2-core dev machine every
// convolution of R50-FPN 800x1216 then runs forward + backward in 0.95x torch's time (docs/performance.md).
//
// Ops (MindSpore AOT signature; params are the inputs then the outputs, plain row-major):
//   FcosConvForward[Bias]:   x (N,C,H,W), w (O,C/g,KH,KW), [b (O)], attrs -> y (N,O,OH,OW)
//   FcosConvBackwardData:    x, w, dy, attrs -> dx
//   FcosConvBackwardWeights: x, w, dy, attrs -> dw [, db]   (db when attrs says has_bias)
//   FcosConv*Scaled:         the same with a frozen BatchNorm folded in (scale, shift; see below)
//   FcosConvForwardScaledRelu: FcosConvForwardScaled followed by a ReLU (a oneDNN post-op)
// attrs: int64 (11,) = stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, has_bias, relu,
// x_channels_last, y_channels_last. A tensor in channels-last storage keeps its (N,C,H,W) shape but
// holds its values in (N,H,W,C) order (src/ops/backend.py): between two layers that both take it,
// oneDNN runs its channels-last kernels on it directly, with no reorder; a plain NCHW tensor is
// reordered to the layout oneDNN picks and back.
// Primitives and reorders are built once per shape and attributes and kept; blocked copies of the
// tensors live in scratch buffers shared by all layers.
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "runtime.h"

namespace {

using fcos_ops::GetRuntime;
using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

// Blocked copies of the tensors live in a few buffers shared by every layer, each grown to the
// largest need: one kernel runs at a time (Runtime::mutex), and per-layer buffers kept another copy
// of every activation of the network (R50-FPN 800x1216 training: see docs/performance.md).
class Scratch {
 public:
  void *Get(int slot, size_t bytes) {
    Buffer &b = buffers_[slot];
    if (b.size < bytes) {
      std::free(b.data);
      b.data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      if (b.data == nullptr) throw std::bad_alloc();
      b.size = bytes;
    }
    return b.data;
  }

 private:
  struct Buffer {
    void *data = nullptr;
    size_t size = 0;
  };
  Buffer buffers_[3];
};

Scratch &GetScratch() {
  static Scratch scratch;
  return scratch;
}

// One tensor argument of a primitive: the caller's plain buffer, wrapped, and, when the primitive
// wants another layout, a view of a scratch slot and the two reorders.
struct Arg {
  memory user, prim;
  dnnl::reorder to_prim, to_user;
  bool reorder = false;
  int slot = 0;

  Arg() = default;
  Arg(const memory::desc &user_md, const memory::desc &want, const dnnl::engine &engine, int scratch_slot)
      : user(user_md, engine, DNNL_MEMORY_NONE), reorder(want != user_md), slot(scratch_slot) {
    prim = reorder ? memory(want, engine, DNNL_MEMORY_NONE) : user;
    if (reorder) {
      to_prim = dnnl::reorder(user, prim);
      to_user = dnnl::reorder(prim, user);
    }
  }
  // Point at the caller's buffer (and, if the layout differs, at the scratch slot).
  void Bind(void *data) {
    user.set_data_handle(data);
    prim.set_data_handle(reorder ? GetScratch().Get(slot, prim.get_desc().get_size()) : data);
  }
  // An input: bind, then copy it into the primitive's layout if that differs.
  void In(void *data, dnnl::stream &stream) {
    Bind(data);
    if (reorder) to_prim.execute(stream, user, prim);
  }
  // An output, after the primitive ran: copy it back to the caller's layout if that differs.
  void Out(dnnl::stream &stream) {
    if (reorder) to_user.execute(stream, prim, user);
  }
};

struct Geometry {
  memory::dim n, c, h, w, o, kh, kw, oh, ow;
  memory::dims strides, dilates, padding;
  int64_t groups;
  bool has_bias, relu;
  // *_u: the caller's layouts; *_any: what the primitives are asked for (channels-last where the
  // caller's tensor is, so that no reorder runs; else oneDNN's choice)
  memory::desc src_u, wei_u, dst_u, bias_md, src_any, wei_any, dst_any;

  Geometry(const int64_t *x, const int64_t *wt, const int64_t *attrs)
      : n(x[0]), c(x[1]), h(x[2]), w(x[3]), o(wt[0]), kh(wt[2]), kw(wt[3]),
        strides{attrs[0], attrs[1]}, dilates{attrs[4] - 1, attrs[5] - 1}, padding{attrs[2], attrs[3]},
        groups(attrs[6]), has_bias(attrs[7] != 0), relu(attrs[8] != 0) {
    oh = (h + 2 * padding[0] - attrs[4] * (kh - 1) - 1) / strides[0] + 1;
    ow = (w + 2 * padding[1] - attrs[5] * (kw - 1) - 1) / strides[1] + 1;
    memory::dims src{n, c, h, w}, dst{n, o, oh, ow};
    memory::dims wei = groups > 1 ? memory::dims{groups, o / groups, c / groups, kh, kw} : memory::dims{o, c, kh, kw};
    const bool src_last = attrs[9] != 0, dst_last = attrs[10] != 0;
    src_u = memory::desc(src, dt::f32, src_last ? tag::nhwc : tag::nchw);
    dst_u = memory::desc(dst, dt::f32, dst_last ? tag::nhwc : tag::nchw);
    wei_u = memory::desc(wei, dt::f32, groups > 1 ? tag::goihw : tag::oihw);
    bias_md = memory::desc({o}, dt::f32, tag::a);
    src_any = src_last ? src_u : memory::desc(src, dt::f32, tag::any);
    dst_any = dst_last ? dst_u : memory::desc(dst, dt::f32, tag::any);
    wei_any = memory::desc(wei, dt::f32, tag::any);
  }

  // post_relu: the forward kernel's own descriptor, with the ReLU; the backward kernels' hint has none
  dnnl::convolution_forward::primitive_desc Forward(const dnnl::engine &engine, bool post_relu = false) const {
    dnnl::primitive_attr attr;
    if (post_relu) {
      dnnl::post_ops ops;
      ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
      attr.set_post_ops(ops);
    }
    return dnnl::convolution_forward::primitive_desc(
        engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src_any, wei_any,
        has_bias ? bias_md : memory::desc(), dst_any, strides, dilates, padding, padding, attr);
  }
};

// y = conv(x, w) [+ b], then max(0, y) when attrs say relu
struct ForwardKernel {
  dnnl::convolution_forward conv;
  Arg x, w, y;
  memory bias;
  bool has_bias;

  ForwardKernel(const Geometry &g, const dnnl::engine &engine) : has_bias(g.has_bias) {
    auto pd = g.Forward(engine, g.relu);
    conv = dnnl::convolution_forward(pd);
    x = Arg(g.src_u, pd.src_desc(), engine, 0);
    w = Arg(g.wei_u, pd.weights_desc(), engine, 1);
    y = Arg(g.dst_u, pd.dst_desc(), engine, 2);
    bias = memory(g.bias_md, engine, DNNL_MEMORY_NONE);
  }
  // params: x, w, [b,] attrs, y
  void Run(void **params, dnnl::stream &s) {
    x.In(params[0], s);
    w.In(params[1], s);
    y.Bind(params[has_bias ? 4 : 3]);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, x.prim}, {DNNL_ARG_WEIGHTS, w.prim}, {DNNL_ARG_DST, y.prim}};
    if (has_bias) {
      bias.set_data_handle(params[2]);
      args[DNNL_ARG_BIAS] = bias;
    }
    conv.execute(s, args);
    y.Out(s);
    s.wait();
  }
};

// dx = conv's adjoint in x, at dy
struct BackwardDataKernel {
  dnnl::convolution_backward_data data;
  Arg dy, w, dx;

  BackwardDataKernel(const Geometry &g, const dnnl::engine &engine) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, g.src_any, g.wei_any, g.dst_any, g.strides, g.dilates,
        g.padding, g.padding, g.Forward(engine));
    data = dnnl::convolution_backward_data(pd);
    dy = Arg(g.dst_u, pd.diff_dst_desc(), engine, 0);
    w = Arg(g.wei_u, pd.weights_desc(), engine, 1);
    dx = Arg(g.src_u, pd.diff_src_desc(), engine, 2);
  }
  // params: x (for its shape), w, dy, attrs, dx
  void Run(void **params, dnnl::stream &s) {
    dy.In(params[2], s);
    w.In(params[1], s);
    dx.Bind(params[4]);
    data.execute(s, {{DNNL_ARG_DIFF_DST, dy.prim}, {DNNL_ARG_WEIGHTS, w.prim}, {DNNL_ARG_DIFF_SRC, dx.prim}});
    dx.Out(s);
    s.wait();
  }
};

// dw [, db] = conv's adjoint in w [and b], at x and dy
struct BackwardWeightsKernel {
  dnnl::convolution_backward_weights weights;
  Arg x, dy, dw;
  memory db;
  bool has_bias;

  BackwardWeightsKernel(const Geometry &g, const dnnl::engine &engine) : has_bias(g.has_bias) {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, g.src_any, g.wei_any, g.has_bias ? g.bias_md : memory::desc(),
        g.dst_any, g.strides, g.dilates, g.padding, g.padding, g.Forward(engine));
    weights = dnnl::convolution_backward_weights(pd);
    x = Arg(g.src_u, pd.src_desc(), engine, 0);
    dy = Arg(g.dst_u, pd.diff_dst_desc(), engine, 1);
    dw = Arg(g.wei_u, pd.diff_weights_desc(), engine, 2);
    db = memory(g.bias_md, engine, DNNL_MEMORY_NONE);
  }
  // params: x, w (for its shape), dy, attrs, dw, [db]
  void Run(void **params, dnnl::stream &s) {
    x.In(params[0], s);
    dy.In(params[2], s);
    dw.Bind(params[4]);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, x.prim}, {DNNL_ARG_DIFF_DST, dy.prim},
                                         {DNNL_ARG_DIFF_WEIGHTS, dw.prim}};
    if (has_bias) {
      db.set_data_handle(params[5]);
      args[DNNL_ARG_DIFF_BIAS] = db;
    }
    weights.execute(s, args);
    dw.Out(s);
    s.wait();
  }
};

using Key = std::vector<int64_t>;
constexpr int kAttrs = 11;

Key MakeKey(const int64_t *x, const int64_t *w, const int64_t *attrs) {
  Key key(x, x + 4);
  key.insert(key.end(), w, w + 4);
  key.insert(key.end(), attrs, attrs + kAttrs);
  return key;
}

// Look up (or build) the kernel for this call's shapes and attributes and run it; 1 on any error.
// x is params[0] and w params[1] in every op; attrs sits at attrs_index.
template <typename Kernel>
int RunCached(void **params, int64_t **shapes, int attrs_index) {
  static std::map<Key, std::unique_ptr<Kernel>> cache;
  const int64_t *attrs = static_cast<const int64_t *>(params[attrs_index]);
  try {
    std::lock_guard<std::mutex> lock(GetRuntime().mutex);
    Key key = MakeKey(shapes[0], shapes[1], attrs);
    auto it = cache.find(key);
    if (it == cache.end()) {
      it = cache.emplace(key, std::make_unique<Kernel>(Geometry(shapes[0], shapes[1], attrs), GetRuntime().engine))
               .first;
    }
    it->second->Run(params, GetRuntime().stream);
  } catch (const std::exception &) {  // dnnl::error, std::bad_alloc
    return 1;
  }
  return 0;
}

bool Conv4d(int *ndims) { return ndims[0] == 4 && ndims[1] == 4; }

bool BiasMatches(void **params, int attrs_index, bool with_bias) {
  return (static_cast<const int64_t *>(params[attrs_index])[7] != 0) == with_bias;
}

bool ReluMatches(void **params, int attrs_index, bool with_relu) {
  return (static_cast<const int64_t *>(params[attrs_index])[8] != 0) == with_relu;
}

// w (O, ...) with each output channel's row times scale[o], in a buffer of the calling thread.
const float *ScaledWeights(const void *w, const void *scale, const int64_t *w_shape) {
  thread_local std::vector<float> scaled;
  const int64_t rows = w_shape[0], row = w_shape[1] * w_shape[2] * w_shape[3];
  scaled.resize(rows * row);
  const float *src = static_cast<const float *>(w), *factor = static_cast<const float *>(scale);
  for (int64_t o = 0; o < rows; ++o) {
    for (int64_t k = 0; k < row; ++k) scaled[o * row + k] = src[o * row + k] * factor[o];
  }
  return scaled.data();
}

// x, w, scale, shift, attrs -> y: the forward kernel on w * scale, the shift as its bias
int ForwardScaled(void **params, int64_t **shapes) {
  void *standard[] = {params[0], const_cast<float *>(ScaledWeights(params[1], params[2], shapes[1])), params[3],
                      params[4], params[5]};
  return RunCached<ForwardKernel>(standard, shapes, 3);
}

}  // namespace

// Op names: MindSpore keys a custom op's bprop by its function name, so layers with and without a
// bias have their own forward ops (one name used with both gave the second kind the first kind's
// bprop: "The parameters number of the function is 4, but the number of provided arguments is 3").
// Backward data and backward weights are separate ops so that a graph that needs only one of them
// (the first layer's input gradient, a frozen layer's weights) runs only that one.

// A convolution followed by a frozen BatchNorm, y = conv(x, w * scale) + shift with scale and shift
// (O,) per output channel, has ops of its own (the *Scaled ones) that scale the weights here: the
// same product as a MindSpore Mul broadcasting (O,) over w kept an index workspace per layer for
// good (R50-FPN 800x1216 training held 0.8 GB more; docs/performance.md). No gradient reaches
// scale and shift (the norm is frozen): dw = scale * conv's adjoint in w.

// x, w, attrs -> y
extern "C" int FcosConvForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                               void *) {
  if (nparam != 4 || !Conv4d(ndims) || !BiasMatches(params, 2, false) || !ReluMatches(params, 2, false)) return 1;
  return RunCached<ForwardKernel>(params, shapes, 2);
}

// x, w, b, attrs -> y
extern "C" int FcosConvForwardBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                   void *) {
  if (nparam != 5 || !Conv4d(ndims) || !BiasMatches(params, 3, true) || !ReluMatches(params, 3, false)) return 1;
  return RunCached<ForwardKernel>(params, shapes, 3);
}

// x, w, dy, attrs -> dx
extern "C" int FcosConvBackwardData(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                    void *) {
  if (nparam != 5 || !Conv4d(ndims)) return 1;
  return RunCached<BackwardDataKernel>(params, shapes, 3);
}

// x, w, dy, attrs -> dw [, db]
extern "C" int FcosConvBackwardWeights(int nparam, void **params, int *ndims, int64_t **shapes, const char **,
                                       void *, void *) {
  if ((nparam != 5 && nparam != 6) || !Conv4d(ndims) || !BiasMatches(params, 3, nparam == 6)) return 1;
  return RunCached<BackwardWeightsKernel>(params, shapes, 3);
}

// x, w, scale, shift, attrs -> y   (attrs say has_bias: the shift is the bias)
extern "C" int FcosConvForwardScaled(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                     void *) {
  if (nparam != 6 || !Conv4d(ndims) || !BiasMatches(params, 4, true) || !ReluMatches(params, 4, false)) return 1;
  return ForwardScaled(params, shapes);
}

// x, w, scale, shift, attrs -> max(0, y)   (its own name: its bprop takes dy through the ReLU first)
extern "C" int FcosConvForwardScaledRelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **,
                                         void *, void *) {
  if (nparam != 6 || !Conv4d(ndims) || !BiasMatches(params, 4, true) || !ReluMatches(params, 4, true)) return 1;
  return ForwardScaled(params, shapes);
}

// x, w, scale, dy, attrs -> dx
extern "C" int FcosConvBackwardDataScaled(int nparam, void **params, int *ndims, int64_t **shapes, const char **,
                                          void *, void *) {
  if (nparam != 6 || !Conv4d(ndims)) return 1;
  void *standard[] = {params[0], const_cast<float *>(ScaledWeights(params[1], params[2], shapes[1])), params[3],
                      params[4], params[5]};
  return RunCached<BackwardDataKernel>(standard, shapes, 3);
}

// x, w, scale, dy, attrs -> dw   (attrs say no bias: the shift gets no gradient)
extern "C" int FcosConvBackwardWeightsScaled(int nparam, void **params, int *ndims, int64_t **shapes,
                                             const char **, void *, void *) {
  if (nparam != 6 || !Conv4d(ndims) || !BiasMatches(params, 4, false)) return 1;
  void *standard[] = {params[0], params[1], params[3], params[4], params[5]};
  if (RunCached<BackwardWeightsKernel>(standard, shapes, 3) != 0) return 1;
  const int64_t rows = shapes[1][0], row = shapes[1][1] * shapes[1][2] * shapes[1][3];
  float *dw = static_cast<float *>(params[5]);
  const float *scale = static_cast<const float *>(params[2]);
  for (int64_t o = 0; o < rows; ++o) {
    for (int64_t k = 0; k < row; ++k) dw[o * row + k] *= scale[o];
  }
  return 0;
}
