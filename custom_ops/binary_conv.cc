// BinaryConv kernel: ONNX Conv (NCHW, group 1) on binarized weights and activations (binary.h for the math and
// layouts, onnxopt/reference/binary.py for the semantics).
//
// Per call: (1) every input row is binarized into channel-packed words on the zero-padded grid [cw][Hp][Wp],
// with per-pixel popcount and sum |x| beside it (tasks over image rows); (2) per output row, the AND-popcounts
// of every filter at every pixel of the row (kernels' conv_row), then the scaling: the receptive field's
// popcount(a) and sum |x| from the per-pixel arrays (pads hold 0), and popcount(b) over the taps inside the
// image (the full count for interior pixels, the per-tap counts summed for border pixels).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "binary.h"
#include "kernel_util.h"
#include "ops.h"

namespace onnxopt {

namespace {

constexpr int64_t kMaxAttribute = int64_t{1} << 24;
constexpr int64_t kRowChunks = 16;
constexpr int64_t kMaxKernel = 64;  // kh, kw bound (attribute check)  // compute tasks per image: enough to balance a few threads

struct ConvGeometry {
  int64_t n = 0, h = 0, w = 0, oh = 0, ow = 0, hp = 0, wp = 0;
};

struct ConvCall {
  const BinaryConvKernel* k = nullptr;
  ConvGeometry g;
  binary::ConvPlan plan;
  const float* x = nullptr;
  uint64_t* bits = nullptr;  // [N][Hp][Wp][cw]
  float* abs_sum = nullptr;  // [N][Hp][Wp]
  int32_t* ones = nullptr;   // [N][Hp][Wp]
  float* y = nullptr;
  int64_t chunks = 1;        // output-row chunks per image (compute tasks)
  std::atomic<bool> failed{false};
};

void PackTask(void* data, size_t task) {
  auto* call = static_cast<ConvCall*>(data);
  const BinaryConvKernel& k = *call->k;
  const ConvGeometry& g = call->g;
  const int64_t n = static_cast<int64_t>(task) / g.h, iy = static_cast<int64_t>(task) % g.h;
  const int64_t plane = g.hp * g.wp, at = (iy + k.pads_[0]) * g.wp + k.pads_[1], pix = n * plane + at;
  uint64_t* out = call->bits + n * plane * k.cw_ + at;  // image n's word planes [cw][Hp][Wp]
  k.kern_->pack_row(call->x + n * k.c_ * g.h * g.w, k.t_.data(), k.c_, g.h, g.w, iy, k.cw_, plane, out,
                    call->abs_sum + pix,
                    call->ones + pix);
}

// [first, last) of the taps along one axis that fall inside the input, for output coordinate o.
std::pair<int64_t, int64_t> ValidTaps(int64_t o, int64_t stride, int64_t pad, int64_t dil, int64_t taps, int64_t size) {
  int64_t first = taps, last = 0;
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t i = o * stride - pad + t * dil;
    if (i >= 0 && i < size) first = std::min(first, t), last = t + 1;
  }
  return {first, std::max(first, last)};
}

// A task's scratch, allocated once for its rows.
struct RowScratch {
  std::vector<int32_t> counts;  // [groups 8][ow]
  std::vector<float> kappa, d0;  // [ow]
  std::vector<int64_t> border;   // pixels whose tap columns are cut by padding: ox, x0, x1
};

// Output row oy of image n: the counts of every filter, then the scaling.
void ComputeRow(const ConvCall* call, int64_t n, int64_t oy, RowScratch& r) {
  {
    const BinaryConvKernel& k = *call->k;
    const ConvGeometry& g = call->g;
    const int64_t taps = k.kh_ * k.kw_, plane = g.hp * g.wp;
    std::vector<int32_t>& counts = r.counts;
    std::vector<float>& kappa = r.kappa;
    std::vector<float>& d0 = r.d0;
    std::vector<int64_t>& border = r.border;
    k.kern_->conv_row(call->plan, call->bits + n * plane * k.cw_, oy, counts.data());
    const float* abs_sum = call->abs_sum + n * plane;
    const int32_t* ones = call->ones + n * plane;
    const auto [y0, y1] = ValidTaps(oy, k.sh_, k.pads_[0], k.dh_, k.kh_, g.h);
    const float inv = 1.0f / static_cast<float>(taps * k.c_);
    float* y = call->y + n * k.m_ * g.oh * g.ow + oy * g.ow;
    // Per pixel of the row: kappa, the D0 term and the valid tap columns; then filter by filter along the row,
    // so that counts are read and Y written contiguously.
    border.clear();
    for (int64_t ox = 0; ox < g.ow; ++ox) {
      const auto [x0, x1] = ValidTaps(ox, k.sw_, k.pads_[1], k.dw_, k.kw_, g.w);
      float a = 0.0f;
      int64_t pc = 0;
      for (int64_t dy = 0; dy < k.kh_; ++dy) {
        const int64_t row = (oy * k.sh_ + dy * k.dh_) * g.wp + ox * k.sw_;
        for (int64_t dx = 0; dx < k.kw_; ++dx) {
          a += abs_sum[row + dx * k.dw_];
          pc += ones[row + dx * k.dw_];
        }
      }
      kappa[ox] = a * inv;
      d0[ox] = static_cast<float>(2 * pc - (y1 - y0) * (x1 - x0) * k.c_);
      if (x1 - x0 != k.kw_) border.insert(border.end(), {ox, x0, x1});
    }
    const bool cut_rows = y1 - y0 != k.kh_;  // a top or bottom row: some tap rows fall in the padding
    for (int64_t m = 0; m < k.m_; ++m) {
      const float p = k.w_.p[m], q = k.w_.q[m];
      const int32_t* cm = counts.data() + m * g.ow;
      float* ym = y + m * g.oh * g.ow;
      if (!cut_rows && border.empty()) {
        k.kern_->scale_row(cm, kappa.data(), d0.data(), g.ow, 2.0f * p, q, p * static_cast<float>(k.w_.ones[m]),
                           k.bias_full_[m], ym);
        continue;
      }
      // popcount(b) (and T W) over the taps inside the image: prefix sums over the tap columns of the row's
      // valid tap rows. The row is scaled with the full tap-column range, then the pixels whose tap columns
      // are cut (the left and right borders) take two differences each.
      int64_t pre[kMaxKernel + 1];  // only [0, kw] used: not zeroed whole (per filter and row)
      double tpre[kMaxKernel + 1];
      pre[0] = 0, tpre[0] = 0.0;
      const int32_t* tap_ones = k.tap_ones_.data() + m * taps;
      const float* tap_tw = k.tap_tw_.empty() ? nullptr : k.tap_tw_.data() + m * taps;
      for (int64_t dx = 0; dx < k.kw_; ++dx) {
        int64_t c = 0;
        double t = 0.0;
        for (int64_t dy = y0; dy < y1; ++dy) {
          c += tap_ones[dy * k.kw_ + dx];
          if (tap_tw != nullptr) t += tap_tw[dy * k.kw_ + dx];
        }
        pre[dx + 1] = pre[dx] + c;
        tpre[dx + 1] = tpre[dx] + t;
      }
      const float bias = k.bias_[m] + static_cast<float>(tpre[k.kw_]);
      k.kern_->scale_row(cm, kappa.data(), d0.data(), g.ow, 2.0f * p, q, p * static_cast<float>(pre[k.kw_]), bias,
                         ym);
      for (size_t i = 0; i < border.size(); i += 3) {
        const int64_t ox = border[i], x0 = border[i + 1], x1 = border[i + 2];
        const int64_t inside = pre[x1] - pre[x0];
        ym[ox] = kappa[ox] * (p * static_cast<float>(2 * cm[ox] - inside) + q * d0[ox]) + k.bias_[m] +
                 static_cast<float>(tpre[x1] - tpre[x0]);
      }
    }
  }
}

// Task t: rows [t0, t1) of chunk t % chunks of image t / chunks.
void ComputeTask(void* data, size_t task) {
  auto* call = static_cast<ConvCall*>(data);
  if (call->failed.load(std::memory_order_relaxed)) return;
  try {
    const ConvGeometry& g = call->g;
    const int64_t n = static_cast<int64_t>(task) / call->chunks, chunk = static_cast<int64_t>(task) % call->chunks;
    const int64_t rows = (g.oh + call->chunks - 1) / call->chunks;
    RowScratch r;
    r.counts.resize(static_cast<size_t>(call->plan.groups * binary::kGroup * g.ow));
    r.kappa.resize(static_cast<size_t>(g.ow)), r.d0.resize(static_cast<size_t>(g.ow));
    for (int64_t oy = chunk * rows; oy < std::min(g.oh, (chunk + 1) * rows); ++oy) ComputeRow(call, n, oy, r);
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
  bias_full_ = bias_;
  t_ = binary::ReadCentering(kinfo, present_inputs_, c_, "C", where);
  if (!t_.empty()) {
    // Per filter and tap: sum_c T[c] (p b + q) = p sum_{b=1} T + q sum T.
    double t_sum = 0.0;
    for (const float v : t_) t_sum += v;
    tap_tw_.assign(static_cast<size_t>(m_ * taps), 0.0f);
    for (int64_t m = 0; m < m_; ++m) {
      double total = 0.0;
      for (int64_t t = 0; t < taps; ++t) {
        double on = 0.0;
        for (int64_t i = 0; i < cw_; ++i) {
          for (uint64_t v = w_.bits[m * w_.words + t * cw_ + i]; v != 0; v &= v - 1) {
            on += t_[i * binary::kWord + __builtin_ctzll(v)];
          }
        }
        const double tw = w_.p[m] * on + w_.q[m] * t_sum;
        tap_tw_[m * taps + t] = static_cast<float>(tw);
        total += tw;
      }
      bias_full_[m] += static_cast<float>(total);
    }
  } else {
    t_.assign(static_cast<size_t>(c_), 0.0f);
  }
  const auto act = binary::kbit::ReadActAttributes(api, info, taps * cw_ * binary::kWord, where);
  if (act.bits > 1) kbit_ = binary::kbit::MakeConv(*this, act);  // before the bits are dropped
  w_.bits = {};  // regrouped above; only the counts and scales are kept
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
  if (g.hp * g.wp * cw_ > std::numeric_limits<int32_t>::max()) Fail(where, "input too large (over 2^31 words)");
  const int64_t plane = g.hp * g.wp;
  std::vector<uint64_t> bits(static_cast<size_t>(g.n * plane * cw_), 0);
  std::vector<float> abs_sum(static_cast<size_t>(g.n * plane), 0.0f);
  std::vector<int32_t> ones(static_cast<size_t>(g.n * plane), 0);
  const int64_t taps = kh_ * kw_;
  std::vector<int32_t> offsets(static_cast<size_t>(taps * cw_));
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t i = 0; i < cw_; ++i) {
      offsets[t * cw_ + i] = static_cast<int32_t>(i * plane + (t / kw_) * dh_ * g.wp + (t % kw_) * dw_);
    }
  }
  call.k = this;
  call.x = X.Data();
  call.bits = bits.data();
  call.abs_sum = abs_sum.data();
  call.ones = ones.data();
  call.y = y;
  binary::ConvPlan& p = call.plan;
  p.cw = cw_, p.taps = taps, p.groups = (m_ + binary::kGroup - 1) / binary::kGroup, p.ow = g.ow;
  p.pixel_step = sw_, p.row_step = sh_ * g.wp;
  p.wgroups = groups_.data();
  p.offsets = offsets.data();
  RunTasks(context, PackTask, g.n * g.h, &call);
  call.chunks = std::min<int64_t>(g.oh, kRowChunks);
  RunTasks(context, ComputeTask, g.n * call.chunks, &call);
  if (call.failed.load()) Fail(where, "a compute task failed (out of memory?)", ORT_FAIL);
}

Ort::Custom::OrtLiteCustomOp* MakeBinaryConvOp() { return new SafeOp<BinaryConvKernel>("BinaryConv"); }

}  // namespace onnxopt
