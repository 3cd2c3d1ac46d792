// BinaryConv's k-bit mode (binary_kbit.h for the math). Per call: (1) every input row is quantized to codes and
// packed into k bit planes of channel words on the zero-padded grid [k][cw][Hp][Wp] per image, with each
// pixel's code sum beside it (tasks over image rows); (2) per output row, the plane counts of every filter at
// every pixel (kernels' conv_row, Horner-combined over the planes), then y = s P C + s Q U + B (+ T W over the
// taps inside the image). Padded pixels hold code 0, so unlike the XNOR mode nothing needs correcting at the
// borders except the centering constant T W.
#include <algorithm>
#include <atomic>
#include <limits>
#include <string>
#include <vector>

#include "binary.h"
#include "binary_kbit.h"
#include "kernel_util.h"

namespace onnxopt {
namespace binary {
namespace kbit {

class Conv {
 public:
  Conv(const BinaryConvKernel& k, const ActAttributes& act)
      : c_(k.c_), m_(k.m_), kh_(k.kh_), kw_(k.kw_), sh_(k.sh_), sw_(k.sw_), dh_(k.dh_), dw_(k.dw_), cw_(k.cw_),
        bits_(act.bits), r_(1.0f / act.scale), t_(k.t_), bias_(k.bias_), tap_tw_(k.tap_tw_),
        kern_(&ChooseKernels()), where_(k.Where()) {
    std::copy(k.pads_, k.pads_ + 4, pads_);
    const int64_t taps = kh_ * kw_, span = taps * cw_, groups = (m_ + kGroup - 1) / kGroup;
    wgroups_.assign(static_cast<size_t>(groups * span * kGroup), 0);  // padded filters: 0 bits
    for (int64_t m = 0; m < m_; ++m) {
      const uint64_t* row = k.w_.bits.data() + m * k.w_.words;
      for (int64_t j = 0; j < span; ++j) wgroups_[((m / kGroup) * span + j) * kGroup + m % kGroup] = row[j];
    }
    sp_.resize(static_cast<size_t>(m_)), sq_.resize(static_cast<size_t>(m_));
    for (int64_t m = 0; m < m_; ++m) sp_[m] = act.scale * k.w_.p[m], sq_[m] = act.scale * k.w_.q[m];
  }

  int64_t c_, m_, kh_, kw_, sh_, sw_, dh_, dw_, cw_;
  int64_t pads_[4];
  int bits_;
  float r_;
  std::vector<float> t_;         // [C] (zeros when absent)
  std::vector<float> bias_;      // [M] B
  std::vector<float> tap_tw_;    // [M][taps] T W per tap, or empty
  std::vector<uint64_t> wgroups_;  // [M / 8][taps][cw][8]
  std::vector<float> sp_, sq_;   // s P, s Q
  const Kernels* kern_;
  std::string where_;
};

namespace {

constexpr int64_t kRowChunks = 16;  // compute tasks per image: enough to balance a few threads

struct ConvCall {
  const Conv* op = nullptr;
  int64_t n = 0, h = 0, w = 0, oh = 0, ow = 0, hp = 0, wp = 0;
  ConvPlan plan;
  const float* x = nullptr;
  uint64_t* bits = nullptr;     // [N][k][cw][Hp][Wp]
  int32_t* code_sum = nullptr;  // [N][Hp][Wp]
  float* y = nullptr;
  int64_t chunks = 1;
  std::atomic<bool> failed{false};
};

void PackTask(void* data, size_t task) {
  auto* call = static_cast<ConvCall*>(data);
  const Conv& op = *call->op;
  const int64_t n = static_cast<int64_t>(task) / call->h, iy = static_cast<int64_t>(task) % call->h;
  const int64_t plane = call->hp * call->wp, at = (iy + op.pads_[0]) * call->wp + op.pads_[1];
  op.kern_->pack_conv_row(call->x + n * op.c_ * call->h * call->w, op.t_.data(), op.c_, call->h, call->w, iy, op.r_,
                          op.bits_, op.cw_, plane, call->bits + n * op.bits_ * op.cw_ * plane + at,
                          call->code_sum + n * plane + at);
}

struct RowScratch {
  std::vector<int32_t> counts;  // [groups 8][ow]
  std::vector<float> u;         // [ow]: code sum over the field
  std::vector<int64_t> border;  // (ox, x0, x1) of the pixels whose tap columns are cut (with T only)
  std::vector<double> pre;      // [kw + 1]: prefix sums of T W over tap columns (with T only)
};

void ComputeRow(const ConvCall& call, int64_t n, int64_t oy, RowScratch& r) {
  const Conv& op = *call.op;
  const int64_t plane = call.hp * call.wp, ow = call.ow, taps = op.kh_ * op.kw_;
  op.kern_->conv_row(call.plan, call.bits + n * op.bits_ * op.cw_ * plane, oy, r.counts.data());
  const int32_t* sums = call.code_sum + n * plane;
  for (int64_t ox = 0; ox < ow; ++ox) {
    int64_t u = 0;
    for (int64_t dy = 0; dy < op.kh_; ++dy) {
      const int32_t* row = sums + (oy * op.sh_ + dy * op.dh_) * call.wp + ox * op.sw_;
      for (int64_t dx = 0; dx < op.kw_; ++dx) u += row[dx * op.dw_];
    }
    r.u[ox] = static_cast<float>(u);
  }
  const bool centred = !op.tap_tw_.empty();
  int64_t y0 = 0, y1 = 0;
  r.border.clear();
  if (centred) {  // the pixels whose tap columns are cut by the padding: (ox, x0, x1)
    std::tie(y0, y1) = ValidTaps(oy, op.sh_, op.pads_[0], op.dh_, op.kh_, call.h);
    for (int64_t ox = 0; ox < ow; ++ox) {
      const auto [x0, x1] = ValidTaps(ox, op.sw_, op.pads_[1], op.dw_, op.kw_, call.w);
      if (x1 - x0 != op.kw_) r.border.insert(r.border.end(), {ox, x0, x1});
    }
  }
  float* y = call.y + n * op.m_ * call.oh * ow + oy * ow;
  for (int64_t m = 0; m < op.m_; ++m) {
    const int32_t* c = r.counts.data() + m * ow;
    float* ym = y + m * call.oh * ow;
    if (!centred) {
      op.kern_->scale_row(c, r.u.data(), ow, op.sp_[m], op.sq_[m], op.bias_[m], ym);
      continue;
    }
    // T W over the taps inside the image: prefix sums over the tap columns of the valid tap rows; every pixel
    // takes the whole range with the bias, the border pixels then their difference.
    const float* tw = op.tap_tw_.data() + m * taps;
    r.pre[0] = 0.0;
    for (int64_t dx = 0; dx < op.kw_; ++dx) {
      double s = 0.0;
      for (int64_t dy = y0; dy < y1; ++dy) s += tw[dy * op.kw_ + dx];
      r.pre[dx + 1] = r.pre[dx] + s;
    }
    const double whole = r.pre[op.kw_];
    op.kern_->scale_row(c, r.u.data(), ow, op.sp_[m], op.sq_[m], op.bias_[m] + static_cast<float>(whole), ym);
    for (size_t i = 0; i < r.border.size(); i += 3) {
      ym[r.border[i]] += static_cast<float>(r.pre[r.border[i + 2]] - r.pre[r.border[i + 1]] - whole);
    }
  }
}

void ComputeTask(void* data, size_t task) {
  auto* call = static_cast<ConvCall*>(data);
  if (call->failed.load(std::memory_order_relaxed)) return;
  try {
    const int64_t n = static_cast<int64_t>(task) / call->chunks, chunk = static_cast<int64_t>(task) % call->chunks;
    const int64_t rows = (call->oh + call->chunks - 1) / call->chunks;
    RowScratch r;
    r.counts.resize(static_cast<size_t>(call->plan.groups * kGroup * call->ow));
    r.u.resize(static_cast<size_t>(call->ow));
    r.pre.resize(static_cast<size_t>(call->op->kw_ + 1));
    for (int64_t oy = chunk * rows; oy < std::min(call->oh, (chunk + 1) * rows); ++oy) ComputeRow(*call, n, oy, r);
  } catch (...) {
    call->failed.store(true);
  }
}

}  // namespace

std::shared_ptr<const Conv> MakeConv(const BinaryConvKernel& k, const ActAttributes& act) {
  return std::make_shared<const Conv>(k, act);
}

void Run(const Conv& op, OrtKernelContext* context, const float* x, int64_t n, int64_t h, int64_t w, int64_t oh,
         int64_t ow, float* y) {
  ConvCall call;
  call.op = &op;
  call.n = n, call.h = h, call.w = w, call.oh = oh, call.ow = ow;
  call.hp = h + op.pads_[0] + op.pads_[2];
  call.wp = w + op.pads_[1] + op.pads_[3];
  const int64_t plane = call.hp * call.wp, taps = op.kh_ * op.kw_;
  if (y == nullptr) Fail(op.where_, "could not allocate the output", ORT_FAIL);
  if (op.bits_ * op.cw_ * plane > std::numeric_limits<int32_t>::max()) {
    Fail(op.where_, "input too large for act_bits planes (over 2^31 words per image)");
  }
  std::vector<uint64_t> bits(static_cast<size_t>(n * op.bits_ * op.cw_ * plane), 0);
  std::vector<int32_t> code_sum(static_cast<size_t>(n * plane), 0);
  std::vector<int32_t> offsets(static_cast<size_t>(taps * op.cw_));
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t i = 0; i < op.cw_; ++i) {
      offsets[t * op.cw_ + i] = static_cast<int32_t>(i * plane + (t / op.kw_) * op.dh_ * call.wp + (t % op.kw_) * op.dw_);
    }
  }
  call.x = x;
  call.bits = bits.data();
  call.code_sum = code_sum.data();
  call.y = y;
  ConvPlan& p = call.plan;
  p.cw = op.cw_, p.taps = taps, p.groups = (op.m_ + kGroup - 1) / kGroup, p.ow = ow;
  p.pixel_step = op.sw_, p.row_step = op.sh_ * call.wp;
  p.bits = op.bits_, p.bit_stride = op.cw_ * plane;
  p.wgroups = op.wgroups_.data();
  p.offsets = offsets.data();
  RunTasks(context, PackTask, n * h, &call);
  call.chunks = std::min<int64_t>(oh, kRowChunks);
  RunTasks(context, ComputeTask, n * call.chunks, &call);
  if (call.failed.load()) Fail(op.where_, "a compute task failed (out of memory?)", ORT_FAIL);
}

}  // namespace kbit
}  // namespace binary
}  // namespace onnxopt
