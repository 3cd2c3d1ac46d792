// FastfoodMatMul kernel: Y = a stack of d Adaptive Fastfood blocks S H G Pi H B applied to each row of X,
// truncated to N outputs, plus the bias (see onnxopt/reference/fastfood.py for the semantics and the math).
//
// Per row, in a buffer of n floats (n a power of two): z = [x, 0...0]; per block t
//     z *= B_t;  FWHT(z);  w[i] = G_t[i] * z[P_t[i]];  FWHT(w);  z = w * S_t
// and y = z[:N] + bias. The FWHT runs in place: log2 n stages of butterflies (a, b) -> (a + b, a - b). The
// first three stages (pairs at distance 1, 2, 4) work inside groups of 8 and run as one radix-8 step per
// group; the later stages pair runs of >= 8 contiguous floats, which the compiler vectorises in the AVX2 copy.
// The permutation needs a second buffer (a gather cannot run in place), into which G is folded.
//
// At kernel creation S_t and B_{t+1} are merged into one diagonal (they meet with nothing between them), so
// a block costs two transforms and two diagonal passes. Rows are independent: tasks of a few rows each go
// through the session's thread pool (RunTasks); a batch-1 call is one task.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "kernel_util.h"
#include "ops.h"

namespace onnxopt {

namespace {

// In-place unnormalised Walsh-Hadamard transform of v[0..n), n a power of two >= 8 or any n >= 1 (small n
// take the plain loop). Written once, compiled twice below: the AVX2 copy is chosen at run time.
inline __attribute__((always_inline)) void FwhtBody(float* __restrict v, int64_t n) {
  if (n < 8) {
    for (int64_t h = 1; h < n; h *= 2) {
      for (int64_t i = 0; i < n; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const float a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
      }
    }
    return;
  }
  for (int64_t i = 0; i < n; i += 8) {  // stages h = 1, 2, 4 within each group of 8
    float* g = v + i;
    const float a0 = g[0] + g[1], a1 = g[0] - g[1], a2 = g[2] + g[3], a3 = g[2] - g[3];
    const float a4 = g[4] + g[5], a5 = g[4] - g[5], a6 = g[6] + g[7], a7 = g[6] - g[7];
    const float b0 = a0 + a2, b1 = a1 + a3, b2 = a0 - a2, b3 = a1 - a3;
    const float b4 = a4 + a6, b5 = a5 + a7, b6 = a4 - a6, b7 = a5 - a7;
    g[0] = b0 + b4;
    g[1] = b1 + b5;
    g[2] = b2 + b6;
    g[3] = b3 + b7;
    g[4] = b0 - b4;
    g[5] = b1 - b5;
    g[6] = b2 - b6;
    g[7] = b3 - b7;
  }
  for (int64_t h = 8; h < n; h *= 2) {
    for (int64_t i = 0; i < n; i += 2 * h) {
      float* __restrict a = v + i;
      float* __restrict b = v + i + h;
      for (int64_t j = 0; j < h; ++j) {
        const float x = a[j], y = b[j];
        a[j] = x + y;
        b[j] = x - y;
      }
    }
  }
}

// One block after its input diagonal: FWHT(z); w = G * z[P]; FWHT(w); z = w * out (out = S_t B_{t+1}).
inline __attribute__((always_inline)) void BlockBody(float* __restrict z, float* __restrict w,
                                                     const float* __restrict g, const int64_t* __restrict p,
                                                     const float* __restrict out, int64_t n) {
  FwhtBody(z, n);
  for (int64_t i = 0; i < n; ++i) w[i] = g[i] * z[p[i]];
  FwhtBody(w, n);
  for (int64_t i = 0; i < n; ++i) z[i] = w[i] * out[i];
}

void BlockPortable(float* z, float* w, const float* g, const int64_t* p, const float* out, int64_t n) {
  BlockBody(z, w, g, p, out, n);
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) void BlockAvx2(float* z, float* w, const float* g, const int64_t* p,
                                                    const float* out, int64_t n) {
  BlockBody(z, w, g, p, out, n);
}
#endif

using BlockFn = void (*)(float*, float*, const float*, const int64_t*, const float*, int64_t);

bool IsPow2(int64_t v) { return v >= 1 && (v & (v - 1)) == 0; }

}  // namespace

struct FastfoodMatMulKernel;

namespace {

// One call's state shared by the tasks (which must not throw: failures are recorded in `failed`).
struct Call {
  const FastfoodMatMulKernel* k = nullptr;
  const float* x = nullptr;
  float* y = nullptr;
  int64_t rows = 0, rows_per_task = 1;
  std::atomic<bool> failed{false};
};

}  // namespace

struct FastfoodMatMulKernel {
  FastfoodMatMulKernel(const OrtApi* api, const OrtKernelInfo* info);

  size_t PresentInputs() const { return present_inputs_; }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& B, const Ort::Custom::Tensor<float>& G,
                      const Ort::Custom::Tensor<float>& S, const Ort::Custom::Tensor<int64_t>& P,
                      std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& Y) {
    return Guarded(Where(), [&] { Run(context, X, B, G, S, P, bias, Y); });
  }

  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X, const Ort::Custom::Tensor<float>& B,
           const Ort::Custom::Tensor<float>& G, const Ort::Custom::Tensor<float>& S,
           const Ort::Custom::Tensor<int64_t>& P, std::optional<const Ort::Custom::Tensor<float>*> bias,
           Ort::Custom::Tensor<float>& Y);
  std::string Where() const { return onnxopt::Where("FastfoodMatMul", node_name_); }

  // y[0..N) of one row x[0..K), with z and w scratch buffers of n floats.
  void Row(const float* x, float* y, float* z, float* w) const {
    const float* b0 = in_.data();
    for (int64_t i = 0; i < k_; ++i) z[i] = x[i] * b0[i];
    std::fill(z + k_, z + n_, 0.0f);  // the zero padding K -> n
    for (int64_t t = 0; t < d_; ++t) {
      block_(z, w, g_.data() + t * n_, p_.data() + t * n_, out_.data() + t * n_, n_);
    }
    if (bias_.empty()) {
      std::memcpy(y, z, static_cast<size_t>(n_out_) * sizeof(float));
    } else {
      for (int64_t j = 0; j < n_out_; ++j) y[j] = z[j] + bias_[j];
    }
  }

  std::string node_name_;
  size_t present_inputs_ = 0;
  int64_t d_ = 0, n_ = 0, k_ = 0, n_out_ = 0;
  std::vector<float> in_;    // [n] B_1: the first input diagonal
  std::vector<float> g_;     // [d][n]
  std::vector<int64_t> p_;   // [d][n]
  std::vector<float> out_;   // [d][n] S_t * B_{t+1} (S_d for the last block)
  std::vector<float> bias_;  // [N] or empty
  BlockFn block_ = BlockPortable;
};

namespace {

void RowsTask(void* data, size_t task) {
  auto* call = static_cast<Call*>(data);
  if (call->failed.load(std::memory_order_relaxed)) return;
  try {
    const FastfoodMatMulKernel& k = *call->k;
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(2 * k.n_));
    const int64_t r0 = static_cast<int64_t>(task) * call->rows_per_task;
    const int64_t r1 = std::min(call->rows, r0 + call->rows_per_task);
    for (int64_t r = r0; r < r1; ++r) k.Row(call->x + r * k.k_, call->y + r * k.n_out_, buf.data(), buf.data() + k.n_);
  } catch (...) {
    call->failed.store(true);
  }
}

}  // namespace

FastfoodMatMulKernel::FastfoodMatMulKernel(const OrtApi* api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();
  present_inputs_ = onnxopt::PresentInputs(kinfo);
  if (present_inputs_ != 5 && present_inputs_ != 6) {
    Fail(where, "expects inputs (X, B, G, S, P) or (X, B, G, S, P, bias), got " + std::to_string(present_inputs_));
  }
  const auto kin = IntAttribute(api, info, "in_features", where);
  const auto kout = IntAttribute(api, info, "out_features", where);
  if (!kin || !kout) Fail(where, "attributes 'in_features' (K) and 'out_features' (N) are required");

  const ConstantTensor b = ConstantFloatInput(kinfo, 1, "B", where);
  if (b.shape.size() != 2 || b.shape[0] < 1 || !IsPow2(b.shape[1]) || b.shape[1] > (int64_t{1} << 24)) {
    Fail(where, "B must have shape [d, n] with d >= 1 and n a power of two, got " + ShapeStr(b.shape));
  }
  d_ = b.shape[0];
  n_ = b.shape[1];
  k_ = *kin;
  n_out_ = *kout;
  if (k_ < 1 || k_ > n_ || n_out_ < 1 || n_out_ > n_) {
    Fail(where, "in_features " + std::to_string(k_) + " and out_features " + std::to_string(n_out_) +
                    " must be in [1, n = " + std::to_string(n_) + "]");
  }
  const ConstantTensor g = ConstantFloatInput(kinfo, 2, "G", where);
  const ConstantTensor s = ConstantFloatInput(kinfo, 3, "S", where);
  for (const auto& [name, t] : {std::pair<const char*, const ConstantTensor*>{"G", &g}, {"S", &s}}) {
    if (t->shape != b.shape) {
      Fail(where, std::string(name) + " must have shape [d, n] = " + ShapeStr(b.shape) + " like B, got " +
                      ShapeStr(t->shape));
    }
  }

  // P: a constant int64 initializer, each row a permutation.
  p_ = ConstantPermutations(kinfo, 4, "P", b.shape, where);
  if (present_inputs_ == 6) {
    const ConstantTensor bt = ConstantFloatInput(kinfo, 5, "bias", where);
    if (bt.shape != std::vector<int64_t>{n_out_}) {
      Fail(where, "bias must have shape [N] = [" + std::to_string(n_out_) + "], got " + ShapeStr(bt.shape));
    }
    bias_ = bt.data;
  }

  in_.assign(b.data.begin(), b.data.begin() + n_);
  g_ = g.data;
  out_ = s.data;
  for (int64_t t = 0; t + 1 < d_; ++t) {  // S_t B_{t+1}: nothing lies between them
    for (int64_t i = 0; i < n_; ++i) out_[t * n_ + i] *= b.data[(t + 1) * n_ + i];
  }
#if defined(__x86_64__) || defined(__i386__)
  block_ = HasAvx2Fma() ? BlockAvx2 : BlockPortable;
#endif
}

void FastfoodMatMulKernel::Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                               const Ort::Custom::Tensor<float>& B, const Ort::Custom::Tensor<float>& G,
                               const Ort::Custom::Tensor<float>& S, const Ort::Custom::Tensor<int64_t>& P,
                               std::optional<const Ort::Custom::Tensor<float>*> bias,
                               Ort::Custom::Tensor<float>& Y) {
  const std::string where = Where();
  const std::vector<int64_t>& xs = X.Shape();
  if (xs.empty()) Fail(where, "X must have rank >= 1 [..., K], got a scalar");
  if (xs.back() != k_) {
    Fail(where, "X has last dimension " + std::to_string(xs.back()) + " (shape " + ShapeStr(xs) +
                    ") but in_features K = " + std::to_string(k_));
  }
  // The constants were read at kernel creation; their run-time shapes must still agree.
  const std::vector<int64_t> dn{d_, n_};
  const bool has_bias = bias.has_value() && *bias != nullptr;
  CheckConstantShapes(B.Shape(), dn, has_bias ? &(*bias)->Shape() : nullptr, n_out_, where);
  if (G.Shape() != dn || S.Shape() != dn || P.Shape() != dn) {
    Fail(where, "G, S and P must have shape " + ShapeStr(dn) + " at run time");
  }
  std::vector<int64_t> ys(xs.begin(), xs.end() - 1);
  ys.push_back(n_out_);
  int64_t m = 1;
  for (size_t i = 0; i + 1 < xs.size(); ++i) m *= xs[i];
  float* y = Y.Allocate(ys);
  if (m == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);

  Call call;
  call.k = this;
  call.x = X.Data();
  call.y = y;
  call.rows = m;
  // About 64K butterfly element-stages per task: enough work to amortise a task, small enough to balance.
  const int64_t per_row = std::max<int64_t>(1, d_ * n_ * 2);
  call.rows_per_task = std::clamp<int64_t>((int64_t{1} << 16) / per_row, 1, m);
  RunTasks(context, RowsTask, (m + call.rows_per_task - 1) / call.rows_per_task, &call);
  if (call.failed.load()) Fail(where, "a compute task failed (out of memory?)", ORT_FAIL);
}

Ort::Custom::OrtLiteCustomOp* MakeFastfoodMatMulOp() { return new SafeOp<FastfoodMatMulKernel>("FastfoodMatMul"); }

}  // namespace onnxopt
