// BinaryConv kernel: ONNX Conv (NCHW, group 1) on binarized weights and activations (binary.h for the math and
// layouts, onnxopt/reference/binary.py for the semantics).
//
// Per call, tasks over chunks of output rows. A task binarizes the input rows its chunk reads into a window
// of channel-packed words on the zero-padded grid [cw][rows][Wp], with per-pixel popcount and sum |x - T|
// beside it, each row just before the first output row that needs it; then per output row: the receptive
// field's popcount(a) and sum |x - T| from the per-pixel arrays (pads hold 0), and the AND-popcounts of every
// filter at every pixel with the scaling applied as they are stored (kernels' conv_scaled), using the
// constants (popcount(b), T W) of a field with all its tap columns inside; pixels whose tap columns are cut
// by the padding then add the precomputed terms of their border class (PlanBorders).
#include <algorithm>
#include <atomic>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "binary.h"
#include "kernel_util.h"
#include "ops.h"

namespace onnxopt {

namespace {

constexpr int64_t kMaxAttribute = int64_t{1} << 24;
constexpr int64_t kRowChunks = 16;  // compute tasks per image: enough to balance a few threads
constexpr int64_t kMaxKernel = 64;  // kh, kw bound (attribute check)

struct ConvGeometry {
  int64_t n = 0, h = 0, w = 0, oh = 0, ow = 0, hp = 0, wp = 0;
};

struct BorderPlan;

struct ConvCall {
  const BinaryConvKernel* k = nullptr;
  const BorderPlan* borders = nullptr;
  ConvGeometry g;
  binary::ConvPlan plan;  // offsets on a task's window of packed rows
  const float* x = nullptr;
  float* y = nullptr;
  int64_t chunks = 1, chunk_rows = 1;  // output-row chunks per image (compute tasks), rows per chunk
  int64_t window = 1;                  // padded input rows one chunk reads
  std::atomic<bool> failed{false};
};

// The distinct valid-tap ranges along one axis (classes) and the class of every output coordinate.
struct AxisClasses {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  std::vector<int32_t> of;  // [outputs]
};

AxisClasses ClassifyAxis(int64_t outputs, int64_t stride, int64_t pad, int64_t dil, int64_t taps, int64_t size) {
  AxisClasses a;
  a.of.resize(static_cast<size_t>(outputs));
  for (int64_t o = 0; o < outputs; ++o) {
    const auto r = binary::ValidTaps(o, stride, pad, dil, taps, size);
    const auto it = std::find(a.ranges.begin(), a.ranges.end(), r);
    a.of[o] = static_cast<int32_t>(it - a.ranges.begin());
    if (it == a.ranges.end()) a.ranges.push_back(r);
  }
  return a;
}

// popcount(b) and T W over the taps inside the image, by border class: the scaling runs every pixel with the
// constants of its tap rows and all tap columns (pb, bias per row class), and the pixels whose tap columns
// are cut then add kappa dk + db, the terms of the taps outside (zero for uncut pixels). Per call (the
// classes depend on the image size), at most classes x M x taps work.
struct BorderPlan {
  AxisClasses rows, cols;
  std::vector<int64_t> cut;     // output columns whose tap columns are not all inside
  std::vector<float> pb, bias;  // [row classes][M]
  std::vector<float> dk, db;    // [row classes][column classes][M]
};

BorderPlan PlanBorders(const BinaryConvKernel& k, const ConvGeometry& g) {
  BorderPlan b;
  b.rows = ClassifyAxis(g.oh, k.sh_, k.pads_[0], k.dh_, k.kh_, g.h);
  b.cols = ClassifyAxis(g.ow, k.sw_, k.pads_[1], k.dw_, k.kw_, g.w);
  for (int64_t ox = 0; ox < g.ow; ++ox) {
    if (b.cols.ranges[b.cols.of[ox]] != std::pair<int64_t, int64_t>{0, k.kw_}) b.cut.push_back(ox);
  }
  const int64_t ny = static_cast<int64_t>(b.rows.ranges.size()), nx = static_cast<int64_t>(b.cols.ranges.size());
  const int64_t taps = k.kh_ * k.kw_;
  b.pb.resize(static_cast<size_t>(ny * k.m_)), b.bias.resize(b.pb.size());
  b.dk.resize(static_cast<size_t>(ny * nx * k.m_)), b.db.resize(b.dk.size());
  std::vector<int64_t> pre(static_cast<size_t>(k.kw_ + 1));  // prefix sums over the tap columns
  std::vector<double> tpre(pre.size());
  for (int64_t yc = 0; yc < ny; ++yc) {
    const auto [y0, y1] = b.rows.ranges[yc];
    for (int64_t m = 0; m < k.m_; ++m) {
      const int32_t* ones = k.tap_ones_.data() + m * taps;
      const float* tw = k.tap_tw_.empty() ? nullptr : k.tap_tw_.data() + m * taps;
      for (int64_t dx = 0; dx < k.kw_; ++dx) {
        int64_t c = 0;
        double t = 0.0;
        for (int64_t dy = y0; dy < y1; ++dy) c += ones[dy * k.kw_ + dx], t += tw ? tw[dy * k.kw_ + dx] : 0.0;
        pre[dx + 1] = pre[dx] + c, tpre[dx + 1] = tpre[dx] + t;
      }
      const float p = k.w_.p[m];
      b.pb[yc * k.m_ + m] = p * static_cast<float>(pre[k.kw_]);
      b.bias[yc * k.m_ + m] = static_cast<float>(k.bias_[m] + tpre[k.kw_]);
      for (int64_t xc = 0; xc < nx; ++xc) {
        const auto [x0, x1] = b.cols.ranges[xc];
        const size_t at = static_cast<size_t>((yc * nx + xc) * k.m_ + m);
        b.dk[at] = p * static_cast<float>(pre[k.kw_] - (pre[x1] - pre[x0]));
        b.db[at] = static_cast<float>((tpre[x1] - tpre[x0]) - tpre[k.kw_]);
      }
    }
  }
  return b;
}

// A task's scratch, allocated once for its rows: its window of packed input rows (the zero-padded grid's
// rows [r0, r0 + window), pads and pad channels 0) and the per-row arrays.
struct TaskScratch {
  std::vector<uint64_t> bits;     // [cw][window][wp]
  std::vector<float> abs_sum;     // [window][wp]: sum_c |x - T[c]| per pixel
  std::vector<int32_t> ones;      // [window][wp]: popcount(a) per pixel
  std::vector<int32_t> counts;    // [groups 8][ow]
  std::vector<float> kappa, d0;   // [ow]
  std::vector<float> col_abs;     // [wp]: abs_sum over the row's tap rows, per padded column
  std::vector<int32_t> col_ones;  // [wp]: ones likewise

  explicit TaskScratch(const ConvCall& call) {
    const ConvGeometry& g = call.g;
    const size_t plane = static_cast<size_t>(call.window * g.wp);
    bits.assign(plane * static_cast<size_t>(call.k->cw_), 0);
    abs_sum.assign(plane, 0.0f), ones.assign(plane, 0);
    counts.resize(static_cast<size_t>(call.plan.groups * binary::kGroup * g.ow));
    kappa.resize(static_cast<size_t>(g.ow)), d0.resize(static_cast<size_t>(g.ow));
    col_abs.resize(static_cast<size_t>(g.wp)), col_ones.resize(static_cast<size_t>(g.wp));
  }
};

// Padded row pr of image n into window row pr - r0 (rows in the padding stay 0).
void PackRow(const ConvCall* call, int64_t n, int64_t r0, int64_t pr, TaskScratch& ts) {
  const BinaryConvKernel& k = *call->k;
  const ConvGeometry& g = call->g;
  const int64_t iy = pr - k.pads_[0];
  if (iy < 0 || iy >= g.h) return;
  const int64_t at = (pr - r0) * g.wp + k.pads_[1];
  k.kern_->pack_row(call->x + n * k.c_ * g.h * g.w, k.t_.data(), k.c_, g.h, g.w, iy, k.cw_, call->window * g.wp,
                    ts.bits.data() + at, ts.abs_sum.data() + at, ts.ones.data() + at);
}

// kappa and d0 of output row oy (row oy - oy0 of the window): the field's sums as column sums over its tap
// rows (pads hold 0), then sums of kw columns.
void RowFields(const ConvCall* call, const BorderPlan& b, int64_t oy, int64_t local, TaskScratch& ts) {
  const BinaryConvKernel& k = *call->k;
  const ConvGeometry& g = call->g;
  float* ca = ts.col_abs.data();
  int32_t* co = ts.col_ones.data();
  std::fill(ts.col_abs.begin(), ts.col_abs.end(), 0.0f);
  std::fill(ts.col_ones.begin(), ts.col_ones.end(), 0);
  for (int64_t dy = 0; dy < k.kh_; ++dy) {
    const int64_t row = (local * k.sh_ + dy * k.dh_) * g.wp;
    for (int64_t x = 0; x < g.wp; ++x) ca[x] += ts.abs_sum[row + x], co[x] += ts.ones[row + x];
  }
  const float inv = 1.0f / static_cast<float>(k.kh_ * k.kw_ * k.c_);
  const auto [y0, y1] = b.rows.ranges[b.rows.of[oy]];
  for (int64_t ox = 0; ox < g.ow; ++ox) {
    float a = 0.0f;
    int32_t pc = 0;
    for (int64_t dx = 0; dx < k.kw_; ++dx) a += ca[ox * k.sw_ + dx * k.dw_], pc += co[ox * k.sw_ + dx * k.dw_];
    const auto [x0, x1] = b.cols.ranges[b.cols.of[ox]];
    ts.kappa[ox] = a * inv;
    ts.d0[ox] = static_cast<float>(2 * int64_t{pc} - (y1 - y0) * (x1 - x0) * k.c_);
  }
}

// Output row oy of image n: counts and scaling of every filter in one pass (kernels' conv_scaled), then the
// correction of the pixels whose tap columns are cut by the padding.
void ComputeRow(const ConvCall* call, const BorderPlan& b, int64_t n, int64_t oy, int64_t local, TaskScratch& ts) {
  const BinaryConvKernel& k = *call->k;
  const ConvGeometry& g = call->g;
  RowFields(call, b, oy, local, ts);
  const int64_t yc = b.rows.of[oy], nx = static_cast<int64_t>(b.cols.ranges.size());
  binary::RowScale s;
  s.kappa = ts.kappa.data(), s.d0 = ts.d0.data();
  s.two_p = k.two_p_.data(), s.q = k.w_.q.data();
  s.pb = b.pb.data() + yc * k.m_, s.bias = b.bias.data() + yc * k.m_;
  s.m = k.m_, s.y = call->y + (n * k.m_ * g.oh + oy) * g.ow, s.y_step = g.oh * g.ow;
  k.kern_->conv_scaled(call->plan, ts.bits.data(), local, s, ts.counts.data());
  for (const int64_t ox : b.cut) {
    const size_t at = static_cast<size_t>((yc * nx + b.cols.of[ox]) * k.m_);
    const float* dk = b.dk.data() + at;
    const float* db = b.db.data() + at;
    float* y = s.y + ox;
    for (int64_t m = 0; m < k.m_; ++m) y[m * s.y_step] += ts.kappa[ox] * dk[m] + db[m];
  }
}

// Task t: the rows of chunk t % chunks of image t / chunks, each packing the input rows it newly needs just
// before it is computed, so that reading the input overlaps the count loop and the packed rows stay in L1.
// Chunks overlap by the field's height less one stride: those rows are packed by both (from cache).
void ComputeTask(void* data, size_t task) {
  auto* call = static_cast<ConvCall*>(data);
  if (call->failed.load(std::memory_order_relaxed)) return;
  try {
    const BinaryConvKernel& k = *call->k;
    const ConvGeometry& g = call->g;
    const int64_t n = static_cast<int64_t>(task) / call->chunks, chunk = static_cast<int64_t>(task) % call->chunks;
    const int64_t oy0 = chunk * call->chunk_rows, oy1 = std::min(g.oh, oy0 + call->chunk_rows);
    const int64_t r0 = oy0 * k.sh_;
    TaskScratch ts(*call);
    int64_t packed = r0;  // window rows [r0, packed) are packed
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      for (const int64_t need = oy * k.sh_ + (k.kh_ - 1) * k.dh_ + 1; packed < need; ++packed) {
        PackRow(call, n, r0, packed, ts);
      }
      ComputeRow(call, *call->borders, n, oy, oy - oy0, ts);
    }
  } catch (...) {
    call->failed.store(true);
  }
}

struct ChannelLimit {
  int64_t c, cp;
};
bool InsideChannels(int64_t bit, const void* ctx) {
  const auto* l = static_cast<const ChannelLimit*>(ctx);
  return bit % l->cp < l->c;
}

}  // namespace

std::string BinaryConvKernel::Where() const { return onnxopt::Where("BinaryConv", node_name_); }

BinaryConvKernel::BinaryConvKernel(const OrtApi* api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();
  present_inputs_ = onnxopt::PresentInputs(kinfo);
  if (present_inputs_ < 3 || present_inputs_ > 5) {
    Fail(where, "expects inputs (X, Wbits, S), (X, Wbits, S, B) or (X, Wbits, S, B, T), got " +
                    std::to_string(present_inputs_));
  }
  const auto c = IntAttribute(api, info, "C", where);
  if (!c || *c < 1 || *c > kMaxAttribute) Fail(where, "attribute 'C' (input channels, in [1, 2^24]) is required");
  c_ = *c;
  const auto ks = IntsAttribute(api, info, "kernel_shape", where);
  if (!ks || ks->size() != 2 || (*ks)[0] < 1 || (*ks)[1] < 1 || (*ks)[0] > kMaxKernel || (*ks)[1] > kMaxKernel) {
    Fail(where, "attribute 'kernel_shape' must be 2 ints in [1, 64]" +
                    (ks ? ", got " + ShapeStr(*ks) : std::string(", and is required")));
  }
  kh_ = (*ks)[0], kw_ = (*ks)[1];
  auto pair = [&](const char* name, int64_t& a, int64_t& b) {
    if (auto v = IntsAttribute(api, info, name, where)) {
      if (v->size() != 2 || (*v)[0] < 1 || (*v)[1] < 1 || (*v)[0] > kMaxAttribute || (*v)[1] > kMaxAttribute) {
        Fail(where, std::string("attribute '") + name + "' must be 2 ints in [1, 2^24], got " + ShapeStr(*v));
      }
      a = (*v)[0], b = (*v)[1];
    }
  };
  pair("strides", sh_, sw_);
  pair("dilations", dh_, dw_);
  const auto pads = ReadPads(api, info, where);
  if (*std::max_element(pads.begin(), pads.end()) > kMaxAttribute) Fail(where, "attribute 'pads' must be at most 2^24");
  std::copy(pads.begin(), pads.end(), pads_);
  if (auto group = IntAttribute(api, info, "group", where); group && *group != 1) {
    Fail(where, "only group = 1 is supported, got " + std::to_string(*group));
  }
  cw_ = binary::Words(c_);
  int is_constant = 0;
  Ort::ConstValue wv = kinfo.GetTensorConstantInput(1, &is_constant);
  if (!is_constant || wv == nullptr) Fail(where, "Wbits (input 1) must be a constant initializer");
  const std::vector<int64_t> wshape = wv.GetTensorTypeAndShapeInfo().GetShape();
  if (wshape.size() != 2 || wshape[0] < 1) Fail(where, "Wbits must have shape [M, kh kw Cp / 8], got " + ShapeStr(wshape));
  m_ = wshape[0];
  const int64_t taps = kh_ * kw_;
  const ChannelLimit limit{c_, cw_ * binary::kWord};
  w_ = binary::ReadBitWeights(api, info, m_, taps * cw_ * binary::kWord, InsideChannels, &limit, where);
  const int64_t groups = (m_ + binary::kGroup - 1) / binary::kGroup, span = taps * cw_;
  groups_.assign(static_cast<size_t>(groups * span * binary::kGroup), 0);
  tap_ones_.assign(static_cast<size_t>(m_ * taps), 0);
  for (int64_t m = 0; m < m_; ++m) {
    const uint64_t* row = w_.bits.data() + m * w_.words;
    for (int64_t j = 0; j < span; ++j) {
      groups_[((m / binary::kGroup) * span + j) * binary::kGroup + m % binary::kGroup] = row[j];
      tap_ones_[m * taps + j / cw_] += __builtin_popcountll(row[j]);
    }
  }
  bias_.assign(static_cast<size_t>(m_), 0.0f);
  if (present_inputs_ == 5 && kinfo.GetInputName(3).empty()) {
    Fail(where, "T (centering, input 4) needs the bias B (input 3): zeros if none");
  }
  if (present_inputs_ >= 4) {
    const ConstantTensor b = ConstantFloatInput(kinfo, 3, "B", where);
    if (b.shape != std::vector<int64_t>{m_}) {
      Fail(where, "B must have shape [M] = [" + std::to_string(m_) + "], got " + ShapeStr(b.shape));
    }
    bias_ = b.data;
  }
  t_ = binary::ReadCentering(kinfo, present_inputs_, c_, "C", where);
  if (!t_.empty()) {
    // Per filter and tap: sum_c T[c] (p b + q) = p sum_{b=1} T + q sum T.
    double t_sum = 0.0;
    for (const float v : t_) t_sum += v;
    tap_tw_.assign(static_cast<size_t>(m_ * taps), 0.0f);
    for (int64_t m = 0; m < m_; ++m) {
      for (int64_t t = 0; t < taps; ++t) {
        double on = 0.0;
        for (int64_t i = 0; i < cw_; ++i) {
          for (uint64_t v = w_.bits[m * w_.words + t * cw_ + i]; v != 0; v &= v - 1) {
            on += t_[i * binary::kWord + __builtin_ctzll(v)];
          }
        }
        const double tw = w_.p[m] * on + w_.q[m] * t_sum;
        tap_tw_[m * taps + t] = static_cast<float>(tw);
      }
    }
  } else {
    t_.assign(static_cast<size_t>(c_), 0.0f);
  }
  const auto act = binary::kbit::ReadActAttributes(api, info, taps * cw_ * binary::kWord, where);
  if (act.bits > 1) kbit_ = binary::kbit::MakeConv(*this, act);  // before the bits are dropped
  w_.bits = {};  // regrouped above; only the counts and scales are kept
  two_p_.resize(static_cast<size_t>(m_));
  for (int64_t m = 0; m < m_; ++m) two_p_[m] = 2.0f * w_.p[m];
  kern_ = &binary::ChooseKernels();
}

Ort::Status BinaryConvKernel::Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                                      const Ort::Custom::Tensor<uint8_t>& Wbits, const Ort::Custom::Tensor<float>& S,
                                      std::optional<const Ort::Custom::Tensor<float>*> B,
                                      std::optional<const Ort::Custom::Tensor<float>*> T,
                                      Ort::Custom::Tensor<float>& Y) {
  return Guarded(Where(), [&] { Run(context, X, Wbits, S, B, T, Y); });
}

void BinaryConvKernel::Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                           const Ort::Custom::Tensor<uint8_t>& Wbits, const Ort::Custom::Tensor<float>& S,
                           std::optional<const Ort::Custom::Tensor<float>*> B,
                           std::optional<const Ort::Custom::Tensor<float>*> T, Ort::Custom::Tensor<float>& Y) const {
  const std::string where = Where();
  const std::vector<int64_t>& xs = X.Shape();
  if (xs.size() != 4 || xs[1] != c_) {
    Fail(where, "X must have shape [N, C, H, W] with C = " + std::to_string(c_) + ", got " + ShapeStr(xs));
  }
  if (Wbits.Shape() != std::vector<int64_t>{m_, w_.words * 8} || S.Shape() != w_.s_shape) {
    Fail(where, "Wbits or S changed shape since kernel creation");
  }
  if (B.has_value() && *B != nullptr && (*B)->Shape() != std::vector<int64_t>{m_}) {
    Fail(where, "B must have shape [" + std::to_string(m_) + "], got " + ShapeStr((*B)->Shape()));
  }
  if (T.has_value() && *T != nullptr && (*T)->Shape() != std::vector<int64_t>{c_}) {
    Fail(where, "T must have shape [" + std::to_string(c_) + "], got " + ShapeStr((*T)->Shape()));
  }
  ConvCall call;
  ConvGeometry& g = call.g;
  g.n = xs[0], g.h = xs[2], g.w = xs[3];
  g.hp = g.h + pads_[0] + pads_[2];
  g.wp = g.w + pads_[1] + pads_[3];
  const int64_t span_y = g.hp - dh_ * (kh_ - 1) - 1, span_x = g.wp - dw_ * (kw_ - 1) - 1;
  if (span_y < 0 || span_x < 0) {
    Fail(where, "input " + ShapeStr(xs) + " is smaller than the dilated kernel after padding");
  }
  g.oh = span_y / sh_ + 1, g.ow = span_x / sw_ + 1;
  float* y = Y.Allocate({g.n, m_, g.oh, g.ow});
  if (g.n == 0 || g.h == 0 || g.w == 0) return;
  if (kbit_) return binary::kbit::Run(*kbit_, context, X.Data(), g.n, g.h, g.w, g.oh, g.ow, y);  // checks y
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);
  call.chunks = std::min<int64_t>(g.oh, kRowChunks);
  call.chunk_rows = (g.oh + call.chunks - 1) / call.chunks;
  call.chunks = (g.oh + call.chunk_rows - 1) / call.chunk_rows;
  call.window = (call.chunk_rows - 1) * sh_ + (kh_ - 1) * dh_ + 1;
  const int64_t plane = call.window * g.wp;
  if (plane * cw_ > std::numeric_limits<int32_t>::max()) Fail(where, "input too large (over 2^31 words per task)");
  const int64_t taps = kh_ * kw_;
  std::vector<int32_t> offsets(static_cast<size_t>(taps * cw_));
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t i = 0; i < cw_; ++i) {
      offsets[t * cw_ + i] = static_cast<int32_t>(i * plane + (t / kw_) * dh_ * g.wp + (t % kw_) * dw_);
    }
  }
  call.k = this;
  call.x = X.Data();
  call.y = y;
  binary::ConvPlan& p = call.plan;
  p.cw = cw_, p.taps = taps, p.groups = (m_ + binary::kGroup - 1) / binary::kGroup, p.ow = g.ow;
  p.pixel_step = sw_, p.row_step = sh_ * g.wp;
  p.wgroups = groups_.data();
  p.offsets = offsets.data();
  const BorderPlan borders = PlanBorders(*this, g);
  call.borders = &borders;
  RunTasks(context, ComputeTask, g.n * call.chunks, &call);
  if (call.failed.load()) Fail(where, "a compute task failed (out of memory?)", ORT_FAIL);
}

Ort::Custom::OrtLiteCustomOp* MakeBinaryConvOp() { return new SafeOp<BinaryConvKernel>("BinaryConv"); }

}  // namespace onnxopt
