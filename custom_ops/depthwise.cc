// DepthwiseConv kernel: 3x3 depthwise convolution, stride 1 or 2, optional fused Relu/Clip (see depthwise.h for
// the semantics and the data layout of the prepared rows).
//
// Work is split into tasks of onnxruntime's ParallelFor: runs of whole (n, c) planes when there are many, and
// row bands of single planes when there are few planes for their size. A task keeps a ring of kRingRows
// prepared input rows (zero-padded; for stride 2 split into even and odd columns); each output row reads the
// last three of them through nine pointers, one per tap, so the inner loop is nine loads and nine FMAs per
// 8 outputs with no border test. The AVX2 stride-1 path skips the ring: on large planes it reads the input in
// place (windowed loads at the borders), since a copy there would cost as much memory traffic as the
// convolution itself (measured: copying 56x56 planes made them ~1.4x slower); planes up to 32 wide are copied
// whole into a zero-padded buffer in L1, because there nearly every block touches a border.
#include "depthwise.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>

#include "kernel_util.h"
#include "ops.h"

namespace onnxopt {
namespace depthwise {

void Finish(Geometry& g) {
  g.ow_vec = (g.ow + kLanes - 1) / kLanes * kLanes;
  // Stride 1: one padded row, read at x + j for x < ow_vec, j <= 2. Stride 2: even columns (read at x and x + 1)
  // then odd columns (read at x), each ow_vec + kLanes long.
  g.row_floats = g.stride == 1 ? g.ow_vec + kLanes : 2 * (g.ow_vec + kLanes);
  // The copy writes whole registers from column pad_left on; the taps read up to column ow_vec + 1.
  const int64_t copied = g.pad_left + (g.w + kLanes - 1) / kLanes * kLanes;
  g.padded_stride = (std::max(g.ow_vec + 2, copied) + kLanes - 1) / kLanes * kLanes;
  g.padded_rows = g.oh + 3;
  g.small = g.stride == 1 && g.w <= kSmallWidth && g.ow_vec <= kSmallWidth && g.padded_stride * g.padded_rows <= kSmallPlaneFloats;
}

size_t ScratchFloats(const Geometry& g) {
  const int64_t padded = g.stride == 1 ? 0 : 2 * (g.ow_vec + kLanes);  // the unsplit row, stride 2 only
  const int64_t zero_row = g.w + kLanes;  // the AVX2 stride-1 path reads padding rows from it
  const int64_t rows = kRingRows * g.row_floats + std::max(padded, zero_row);
  return static_cast<size_t>(g.small ? std::max(rows, g.padded_stride * g.padded_rows) : rows);
}

namespace {

// dst[p] = row[p - pad_left] where that is inside the row, else 0, for p in [0, len).
void PadRow(const float* row, int64_t w, int64_t pad_left, float* dst, int64_t len) {
  const int64_t lo = std::min(pad_left, len);
  const int64_t count = std::clamp<int64_t>(len - pad_left, 0, w);
  std::memset(dst, 0, static_cast<size_t>(lo) * sizeof(float));
  if (count > 0) std::memcpy(dst + lo, row, static_cast<size_t>(count) * sizeof(float));
  std::memset(dst + lo + count, 0, static_cast<size_t>(len - lo - count) * sizeof(float));
}

// even[k] = src[2k], odd[k] = src[2k + 1] for k < half.
void SplitPortable(const float* __restrict src, float* __restrict even, float* __restrict odd, int64_t half) {
  for (int64_t k = 0; k < half; ++k) {
    even[k] = src[2 * k];
    odd[k] = src[2 * k + 1];
  }
}

// Input row r of the plane, prepared into dst (row_floats); `padded` is scratch for the unsplit stride-2 row.
void PrepareRow(const Geometry& g, const float* x, int64_t r, float* dst, float* padded) {
  if (r < 0 || r >= g.h) {  // a padding row
    std::memset(dst, 0, static_cast<size_t>(g.row_floats) * sizeof(float));
    return;
  }
  const float* row = x + r * g.w;
  if (g.stride == 1) {
    PadRow(row, g.w, g.pad_left, dst, g.row_floats);
    return;
  }
  const int64_t half = g.ow_vec + kLanes;
  PadRow(row, g.w, g.pad_left, padded, 2 * half);
  SplitPortable(padded, dst, dst + half, half);
}

// One output row: out[x] = act(bias + sum_k w9[k] a[k][x]) for x < ow; a[k] readable up to ow_vec.
template <bool kClamp>
void RowPortable(const float* const* a, const float* w9, float bias, const Activation& act, float* __restrict out,
                 int64_t ow) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5], *a6 = a[6], *a7 = a[7],
              *a8 = a[8];
  const float w0 = w9[0], w1 = w9[1], w2 = w9[2], w3 = w9[3], w4 = w9[4], w5 = w9[5], w6 = w9[6], w7 = w9[7],
              w8 = w9[8];
  for (int64_t x = 0; x < ow; ++x) {
    float v = bias + a0[x] * w0 + a1[x] * w1 + a2[x] * w2;
    v += a3[x] * w3 + a4[x] * w4 + a5[x] * w5;
    v += a6[x] * w6 + a7[x] * w7 + a8[x] * w8;
    if (kClamp) v = std::min(std::max(v, act.lo), act.hi);
    out[x] = v;
  }
}

void Row(const float* const* a, const float* w9, float bias, const Activation& act, float* out, int64_t ow) {
  act.clamp ? RowPortable<true>(a, w9, bias, act, out, ow) : RowPortable<false>(a, w9, bias, act, out, ow);
}

// The portable path: the ring of prepared rows for both strides, the row loop left to the compiler.
void RowsPortable(const Geometry& g, const float* x, const float* w9, float bias, const Activation& act, float* y,
                  int64_t r0, int64_t r1, float* scratch) {
  const int64_t s = g.stride;
  const int64_t first_input_row = r0 * s - g.pad_top;  // the input row of prepared row 0
  const int64_t half = g.ow_vec + kLanes;              // stride 2: offset of the odd columns in a row
  float* ring = scratch;
  float* padded = scratch + kRingRows * g.row_floats;
  int64_t prepared = 0;
  for (int64_t oy = r0; oy < r1; ++oy) {
    const int64_t top = (oy - r0) * s;  // prepared row of filter row 0
    for (; prepared <= top + 2; ++prepared) {
      PrepareRow(g, x, first_input_row + prepared, ring + (prepared % kRingRows) * g.row_floats, padded);
    }
    const float* a[9];
    for (int i = 0; i < 3; ++i) {
      const float* row = ring + ((top + i) % kRingRows) * g.row_floats;
      if (s == 1) {  // tap j reads column x + j
        a[3 * i] = row, a[3 * i + 1] = row + 1, a[3 * i + 2] = row + 2;
      } else {  // tap j reads padded column 2x + j: even[x], odd[x], even[x + 1]
        a[3 * i] = row, a[3 * i + 1] = row + half, a[3 * i + 2] = row + 1;
      }
    }
    Row(a, w9, bias, act, y + oy * g.ow, g.ow);
  }
}


}  // namespace

void ComputeRows(const Geometry& g, const float* x, const float* w9, float bias, const Activation& act, float* y,
                 int64_t r0, int64_t r1, float* scratch, bool avx2) {
  if (avx2) {
    RowsAvx2(g, x, w9, bias, act, y, r0, r1, scratch);
  } else {
    RowsPortable(g, x, w9, bias, act, y, r0, r1, scratch);
  }
}

}  // namespace depthwise

namespace {

using Ort::Custom::Tensor;

// Below this many outputs a task is not worth a split (a few microseconds of work).
constexpr int64_t kMinTaskOutputs = 8192;
constexpr int64_t kMaxTasks = 256;

struct ParallelTask {
  const depthwise::Geometry* g;
  const float* x;
  const float* w;     // [C, 9]
  const float* bias;  // [C]
  const depthwise::Activation* act;
  float* y;
  bool avx2;
  int64_t tasks;
  int64_t parts;  // > 1: each task is one row band of one plane; 1: each task is a run of whole planes
  std::atomic<bool> failed{false};
};

void RunPlanes(const ParallelTask& t, int64_t p0, int64_t p1, int64_t r0, int64_t r1, float* scratch) {
  const depthwise::Geometry& g = *t.g;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p % g.c;
    depthwise::ComputeRows(g, t.x + p * g.h * g.w, t.w + c * 9, t.bias[c], *t.act, t.y + p * g.oh * g.ow, r0, r1,
                           scratch, t.avx2);
  }
}

void RunTask(void* data, size_t index) {
  auto* t = static_cast<ParallelTask*>(data);
  // Nothing may escape into onnxruntime's thread pool: an allocation failure is reported after the loop.
  try {
    const depthwise::Geometry& g = *t->g;
    const int64_t i = static_cast<int64_t>(index);
    // Zeroed once: the padding it holds for the stride-1 paths is never written afterwards.
    std::unique_ptr<float[]> scratch(new float[depthwise::ScratchFloats(g)]());
    if (t->parts > 1) {
      const int64_t p = i / t->parts, part = i % t->parts;
      RunPlanes(*t, p, p + 1, part * g.oh / t->parts, (part + 1) * g.oh / t->parts, scratch.get());
    } else {
      const int64_t planes = g.n * g.c;
      RunPlanes(*t, i * planes / t->tasks, (i + 1) * planes / t->tasks, 0, g.oh, scratch.get());
    }
  } catch (...) {
    t->failed.store(true);
  }
}

}  // namespace

DepthwiseConvKernel::DepthwiseConvKernel(const OrtApi* api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();

  present_inputs_ = ConvInputs(kinfo, where);

  // W: constant [C, 1, 3, 3], copied once.
  ConstantTensor w = ConstantFloatInput(kinfo, 1, "W", where);
  if (w.shape.size() != 4 || w.shape[0] < 1 || w.shape[1] != 1 || w.shape[2] != 3 || w.shape[3] != 3) {
    Fail(where, "W must have shape [C, 1, 3, 3] (one 3x3 filter per channel) with C >= 1, got " +
                    ShapeStr(w.shape));
  }
  c_ = w.shape[0];
  w_ = std::move(w.data);

  ReadAttributes(api, info, where);
  ReadActivation(api, info, where);

  // B: optional constant [C]; zeros otherwise, so that the inner loop has one form.
  bias_ = ConstantBias(kinfo, present_inputs_, c_, "C", where);
  if (bias_.empty()) bias_.assign(static_cast<size_t>(c_), 0.0f);
  avx2_ = HasAvx2Fma();
}

void DepthwiseConvKernel::ReadAttributes(const OrtApi* api, const OrtKernelInfo* info, const std::string& where) {
  pads_ = ReadPads(api, info, where);
  if (auto strides = IntsAttribute(api, info, "strides", where)) {
    const std::vector<int64_t>& s = *strides;
    if (s.size() != 2 || s[0] != s[1] || (s[0] != 1 && s[0] != 2)) {
      Fail(where, "attribute 'strides' must be [1, 1] or [2, 2], got " + ShapeStr(s));
    }
    stride_ = s[0];
  }
  RequireAllOnes(api, info, "dilations", where);
  if (auto ks = IntsAttribute(api, info, "kernel_shape", where)) {
    if (*ks != std::vector<int64_t>{3, 3}) Fail(where, "kernel_shape must be [3, 3], got " + ShapeStr(*ks));
  }
  if (auto group = IntAttribute(api, info, "group", where)) {
    if (*group != c_) {
      Fail(where, "group must equal the channel count C = " + std::to_string(c_) + " (depthwise), got " +
                      std::to_string(*group));
    }
  }
}

void DepthwiseConvKernel::ReadActivation(const OrtApi* api, const OrtKernelInfo* info, const std::string& where) {
  const std::string activation = StringAttribute(api, info, "activation", where).value_or("");
  const std::optional<float> lo = FloatAttribute(api, info, "clip_min", where);
  const std::optional<float> hi = FloatAttribute(api, info, "clip_max", where);
  constexpr float kInf = std::numeric_limits<float>::infinity();
  if (activation == "clip") {
    act_ = {true, lo.value_or(-kInf), hi.value_or(kInf)};
  } else if (activation == "relu" || activation.empty()) {
    if (lo || hi) Fail(where, "attributes clip_min / clip_max need activation = \"clip\"");
    act_ = {activation == "relu", 0.0f, kInf};
  } else {
    Fail(where, "attribute 'activation' must be \"\", \"relu\" or \"clip\", got \"" + activation + "\"");
  }
}

std::string DepthwiseConvKernel::Where() const { return onnxopt::Where("DepthwiseConv", node_name_); }

Ort::Status DepthwiseConvKernel::Compute(OrtKernelContext* context, const Tensor<float>& X, const Tensor<float>& W,
                                         std::optional<const Tensor<float>*> B, Tensor<float>& Y) {
  return Guarded(Where(), [&] { Run(context, X, W, B, Y); });
}

void DepthwiseConvKernel::Run(OrtKernelContext* context, const Tensor<float>& X, const Tensor<float>& W,
                              std::optional<const Tensor<float>*> B, Tensor<float>& Y) const {
  const std::string where = Where();
  const std::vector<int64_t>& xs = X.Shape();
  if (xs.size() != 4) Fail(where, "X must have rank 4 [N, C, H, W], got shape " + ShapeStr(xs));
  if (xs[1] != c_) {
    Fail(where, "X has " + std::to_string(xs[1]) + " channels (shape " + ShapeStr(xs) + ") but W has C = " +
                    std::to_string(c_) + " filters (W shape " + ShapeStr({c_, 1, 3, 3}) + ")");
  }
  // W and B are the constants read at kernel creation; their run-time shapes must still agree.
  const bool has_b = B.has_value() && *B != nullptr;
  CheckConstantShapes(W.Shape(), {c_, 1, 3, 3}, has_b ? &(*B)->Shape() : nullptr, c_, where);

  depthwise::Geometry g;
  g.n = xs[0];
  g.c = xs[1];
  g.h = xs[2];
  g.w = xs[3];
  g.pad_top = pads_[0];
  g.pad_left = pads_[1];
  g.stride = stride_;
  if (g.n < 0 || g.h < 0 || g.w < 0) Fail(where, "X has a negative dimension: " + ShapeStr(xs));
  const int64_t span_h = g.h + pads_[0] + pads_[2] - 3, span_w = g.w + pads_[1] + pads_[3] - 3;
  g.oh = span_h < 0 ? 0 : span_h / stride_ + 1;
  g.ow = span_w < 0 ? 0 : span_w / stride_ + 1;
  if (g.oh <= 0 || g.ow <= 0) {
    Fail(where, "output would be empty: X spatial " + std::to_string(g.h) + "x" + std::to_string(g.w) +
                    " with pads " + ShapeStr({pads_[0], pads_[1], pads_[2], pads_[3]}) + " is smaller than the " +
                    "3x3 filter");
  }
  depthwise::Finish(g);

  float* y = Y.Allocate({g.n, g.c, g.oh, g.ow});
  const int64_t planes = g.n * g.c;
  if (planes == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);

  ParallelTask task;
  task.g = &g;
  task.x = X.Data();
  task.w = w_.data();
  task.bias = bias_.data();
  task.act = &act_;
  task.y = y;
  task.avx2 = avx2_;
  const int64_t wanted = std::clamp<int64_t>(planes * g.oh * g.ow / kMinTaskOutputs, 1, kMaxTasks);
  task.parts = planes >= wanted ? 1 : std::min(g.oh, (wanted + planes - 1) / planes);
  task.tasks = task.parts > 1 ? planes * task.parts : std::min(planes, wanted);
  RunTasks(context, RunTask, task.tasks, &task);
  if (task.failed.load()) Fail(where, "out of memory for the row buffers of a task", ORT_FAIL);
}

Ort::Custom::OrtLiteCustomOp* MakeDepthwiseConvOp() { return new SafeOp<DepthwiseConvKernel>("DepthwiseConv"); }

}  // namespace onnxopt
