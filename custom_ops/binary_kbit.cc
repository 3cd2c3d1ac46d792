// BinaryMatMul's k-bit mode (binary_kbit.h for the math): each input row is quantized to k-bit codes and packed
// into k bit planes once per call, then tasks of 64 output columns run the plane counts of every row over their
// columns' bits (64 rows of K / 8 bytes, in cache while the rows pass) and scale them. Also the attribute
// checks both ops share, and the kernel choice.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "binary.h"
#include "binary_kbit.h"
#include "kernel_util.h"

namespace onnxopt {
namespace binary {
namespace kbit {

ActAttributes ReadActAttributes(const OrtApi* api, const OrtKernelInfo* info, int64_t reduction,
                                const std::string& where) {
  ActAttributes a;
  const auto bits = IntAttribute(api, info, "act_bits", where);
  const auto scale = FloatAttribute(api, info, "act_scale", where);
  if (bits && (*bits < 1 || *bits > kMaxBits)) {
    Fail(where, "attribute 'act_bits' must be in [1, 8] (1: sign activations), got " + std::to_string(*bits));
  }
  a.bits = bits ? static_cast<int>(*bits) : 1;
  if (a.bits == 1) {
    if (scale) Fail(where, "attribute 'act_scale' applies to act_bits >= 2 only");
    return a;
  }
  if (!scale) Fail(where, "attribute 'act_scale' (the step of the k-bit codes, > 0) is required for act_bits >= 2");
  if (!std::isfinite(*scale) || *scale <= 0.0f || !std::isfinite(1.0f / *scale)) {
    Fail(where, "attribute 'act_scale' must be finite and > 0 (with a finite reciprocal), got " +
                    std::to_string(*scale));
  }
  const int64_t levels = (int64_t{1} << a.bits) - 1;
  if (reduction > std::numeric_limits<int32_t>::max() / levels) {
    Fail(where, "the reduction length " + std::to_string(reduction) + " times 2^act_bits - 1 = " +
                    std::to_string(levels) + " must stay below 2^31 (int32 counts)");
  }
  a.scale = *scale;
  return a;
}

const Kernels& ChooseKernels() {
  if (!HasAvx2Fma()) return PortableKernels();
  return HasAvx512Popcount() ? Avx512Kernels() : Avx2Kernels();
}

class MatMul {
 public:
  MatMul(const BinaryMatMulKernel& k, const ActAttributes& act)
      : k_(k.k_), n_(k.n_), words_(k.w_.words), bits_(act.bits), r_(1.0f / act.scale), weights_(k.w_.bits.data()),
        t_(k.t_), bias_(k.bias_), kern_(&ChooseKernels()) {
    sp_.resize(static_cast<size_t>(n_)), sq_.resize(static_cast<size_t>(n_));
    for (int64_t n = 0; n < n_; ++n) sp_[n] = act.scale * k.w_.p[n], sq_[n] = act.scale * k.w_.q[n];
  }

  int64_t k_, n_, words_;
  int bits_;
  float r_;
  const uint64_t* weights_;  // [N][words]: the kernel's checked bits (it outlives this)
  std::vector<float> t_;     // [K] or empty
  std::vector<float> bias_;  // [N]: B + T W
  std::vector<float> sp_, sq_;  // s P, s Q
  const Kernels* kern_;
};

namespace {

constexpr int64_t kCols = 64;  // output columns per task

struct MatMulCall {
  const MatMul* op = nullptr;
  const uint64_t* a = nullptr;  // [rows][bits][words]
  const float* u = nullptr;     // [rows]: sum of codes
  int64_t rows = 0;
  float* y = nullptr;
};

void MatMulTask(void* data, size_t t) {
  const auto* call = static_cast<const MatMulCall*>(data);
  const MatMul& op = *call->op;
  const int64_t n0 = static_cast<int64_t>(t) * kCols, n1 = std::min(op.n_, n0 + kCols);
  int32_t counts[kCols];
  for (int64_t r = 0; r < call->rows; ++r) {
    op.kern_->plane_count(op.weights_, op.words_, call->a + r * op.bits_ * op.words_, op.bits_, n0, n1, counts);
    float* y = call->y + r * op.n_;
    const float u = call->u[r];
    for (int64_t n = n0; n < n1; ++n) y[n] = op.sp_[n] * static_cast<float>(counts[n - n0]) + op.sq_[n] * u + op.bias_[n];
  }
}

}  // namespace

std::shared_ptr<const MatMul> MakeMatMul(const BinaryMatMulKernel& k, const ActAttributes& act) {
  return std::make_shared<const MatMul>(k, act);
}

void Run(const MatMul& op, OrtKernelContext* context, const float* x, int64_t rows, float* y) {
  std::vector<float> zeros;
  const float* t = op.t_.data();
  if (op.t_.empty()) zeros.assign(static_cast<size_t>(op.k_), 0.0f), t = zeros.data();
  std::vector<uint64_t> a(static_cast<size_t>(rows * op.bits_ * op.words_));
  std::vector<float> u(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t sum = op.kern_->pack_mat_row(x + r * op.k_, t, op.k_, op.r_, op.bits_, op.words_,
                                               a.data() + r * op.bits_ * op.words_);
    u[r] = static_cast<float>(sum);  // < 2^31 (checked at creation); exact below 2^24
  }
  MatMulCall call;
  call.op = &op;
  call.a = a.data();
  call.u = u.data();
  call.rows = rows;
  call.y = y;
  RunTasks(context, MatMulTask, (op.n_ + kCols - 1) / kCols, &call);
}

}  // namespace kbit
}  // namespace binary
}  // namespace onnxopt
