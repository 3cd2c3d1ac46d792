// BinaryMatMul kernel, and what BinaryConv shares with it: creation-time checks and packing of the bit
// weights (binary.h for the math, onnxopt/reference/binary.py for the semantics).
//
// Batch rows are handled together per task: tasks own 64 output columns, whose bits (64 rows of K / 8 bytes)
// stay in cache while every input row passes over them. Full mode binarizes and packs each input row once per
// call (its sign bits, popcount and mean |x|) before the tasks start.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "binary.h"
#include "kernel_util.h"
#include "ops.h"

namespace onnxopt {
namespace binary {

BitWeights ReadBitWeights(const OrtApi* api, const OrtKernelInfo* info, int64_t rows, int64_t bits,
                          bool (*valid)(int64_t bit, const void* ctx), const void* ctx, const std::string& where) {
  Ort::ConstKernelInfo kinfo{info};
  BitWeights w;
  w.rows = rows;
  w.words = Words(bits);
  int is_constant = 0;
  Ort::ConstValue v = kinfo.GetTensorConstantInput(1, &is_constant);
  if (!is_constant || v == nullptr) {
    Fail(where, "Wbits (input 1) must be a constant initializer: the kernel packs it once at session creation");
  }
  auto ts = v.GetTensorTypeAndShapeInfo();
  if (ts.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) Fail(where, "Wbits (input 1) must be uint8");
  const std::vector<int64_t> want{rows, w.words * 8};
  if (ts.GetShape() != want) {
    Fail(where, "Wbits must have shape " + ShapeStr(want) + " (the packed bits, 64-bit padded), got " +
                    ShapeStr(ts.GetShape()));
  }
  const uint8_t* data = v.GetTensorData<uint8_t>();
  w.bits.assign(static_cast<size_t>(rows * w.words), 0);
  w.ones.assign(static_cast<size_t>(rows), 0);
  std::vector<uint64_t> padding(static_cast<size_t>(w.words), 0);  // the bits that hold no weight
  for (int64_t k = 0; k < w.words * kWord; ++k) {
    if (!valid(k, ctx)) padding[k / kWord] |= uint64_t{1} << (k % kWord);
  }
  for (int64_t r = 0; r < rows; ++r) {
    uint64_t* dst = w.bits.data() + r * w.words;
    std::memcpy(dst, data + r * w.words * 8, static_cast<size_t>(w.words * 8));  // little-endian words
    for (int64_t k = 0; k < w.words; ++k) {
      if (dst[k] & padding[k]) {
        Fail(where, "Wbits row " + std::to_string(r) + " sets padding bit " +
                        std::to_string(k * kWord + __builtin_ctzll(dst[k] & padding[k])) + " (padded bits must be 0)");
      }
    }
    int64_t ones = 0;
    for (int64_t k = 0; k < w.words; ++k) ones += __builtin_popcountll(dst[k]);
    w.ones[r] = static_cast<int32_t>(ones);
  }
  const auto kind = StringAttribute(api, info, "weights", where).value_or("sign");
  if (kind != "sign" && kind != "01") Fail(where, "attribute 'weights' must be 'sign' or '01', got '" + kind + "'");
  const int64_t cols = kind == "sign" ? 1 : 2;
  const ConstantTensor s = ConstantFloatInput(kinfo, 2, "S", where);
  if (s.shape != std::vector<int64_t>{rows, cols}) {
    Fail(where, "S must have shape [" + std::to_string(rows) + ", " + std::to_string(cols) + "] for weights='" +
                    kind + "', got " + ShapeStr(s.shape));
  }
  for (size_t i = 0; i < s.data.size(); ++i) {
    if (!std::isfinite(s.data[i])) Fail(where, "S[" + std::to_string(i) + "] is not finite");
  }
  w.s_shape = s.shape;
  w.p.resize(static_cast<size_t>(rows));
  w.q.resize(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    w.p[r] = kind == "sign" ? 2.0f * s.data[r] : s.data[2 * r];
    w.q[r] = kind == "sign" ? -s.data[r] : s.data[2 * r + 1];
  }
  return w;
}

std::vector<float> ReadCentering(const Ort::ConstKernelInfo& info, size_t present, int64_t count, const char* dim,
                                 const std::string& where) {
  if (present < 5) return {};
  ConstantTensor t = ConstantFloatInput(info, 4, "T", where);
  if (t.shape != std::vector<int64_t>{count}) {
    Fail(where, std::string("T must have shape [") + dim + "] = [" + std::to_string(count) + "], got " +
                    ShapeStr(t.shape));
  }
  for (size_t i = 0; i < t.data.size(); ++i) {
    if (!std::isfinite(t.data[i])) Fail(where, "T[" + std::to_string(i) + "] is not finite");
  }
  return std::move(t.data);
}

}  // namespace binary

namespace {

constexpr int64_t kCols = 64;  // output columns per task

int64_t PositiveInt(const OrtApi* api, const OrtKernelInfo* info, const char* name, const std::string& where) {
  const auto v = IntAttribute(api, info, name, where);
  if (!v || *v < 1 || *v > (int64_t{1} << 28)) {
    Fail(where, std::string("attribute '") + name + "' must be an int in [1, 2^28]" +
                    (v ? ", got " + std::to_string(*v) : std::string(", and is required")));
  }
  return *v;
}

struct MatMulCall {
  const BinaryMatMulKernel* k = nullptr;
  const float* x = nullptr;   // partial: rows of words 64 floats (zero beyond K)
  const float* sumx = nullptr;
  const uint64_t* a = nullptr;  // full: rows of packed sign bits
  const float* kappa = nullptr;
  const int32_t* d0 = nullptr;
  int64_t rows = 0;
  float* y = nullptr;
  std::atomic<bool> failed{false};
};

void PartialTask(void* data, size_t t) {
  auto* call = static_cast<MatMulCall*>(data);
  const BinaryMatMulKernel& k = *call->k;
  const binary::BitWeights& w = k.w_;
  const int64_t n0 = static_cast<int64_t>(t) * kCols, n1 = std::min(k.n_, n0 + kCols);
  const int64_t ldx = w.words * binary::kWord;
  float s1[4 * kCols];
  for (int64_t r0 = 0; r0 < call->rows; r0 += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, call->rows - r0));
    k.kern_->partial(w.bits.data(), w.words, call->x + r0 * ldx, ldx, rows, n0, n1, s1, kCols);
    for (int r = 0; r < rows; ++r) {
      float* y = call->y + (r0 + r) * k.n_;
      const float sx = call->sumx[r0 + r];
      for (int64_t n = n0; n < n1; ++n) y[n] = w.p[n] * s1[r * kCols + n - n0] + w.q[n] * sx + k.bias_[n];
    }
  }
}

void FullTask(void* data, size_t t) {
  auto* call = static_cast<MatMulCall*>(data);
  const BinaryMatMulKernel& k = *call->k;
  const binary::BitWeights& w = k.w_;
  const int64_t n0 = static_cast<int64_t>(t) * kCols, n1 = std::min(k.n_, n0 + kCols);
  int32_t counts[kCols];
  for (int64_t r = 0; r < call->rows; ++r) {
    k.kern_->and_count(w.bits.data(), w.words, call->a + r * w.words, n0, n1, counts);
    float* y = call->y + r * k.n_;
    const float kappa = call->kappa[r], d0 = static_cast<float>(call->d0[r]);
    for (int64_t n = n0; n < n1; ++n) {
      const float d1 = static_cast<float>(2 * counts[n - n0] - w.ones[n]);
      y[n] = kappa * (w.p[n] * d1 + w.q[n] * d0) + k.bias_[n];
    }
  }
}

struct KLimit {
  int64_t k;
};
bool InsideK(int64_t bit, const void* ctx) { return bit < static_cast<const KLimit*>(ctx)->k; }

}  // namespace

std::string BinaryMatMulKernel::Where() const { return onnxopt::Where("BinaryMatMul", node_name_); }

BinaryMatMulKernel::BinaryMatMulKernel(const OrtApi* api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();
  present_inputs_ = onnxopt::PresentInputs(kinfo);
  if (present_inputs_ < 3 || present_inputs_ > 5) {
    Fail(where, "expects inputs (X, Wbits, S), (X, Wbits, S, B) or (X, Wbits, S, B, T), got " +
                    std::to_string(present_inputs_));
  }
  k_ = PositiveInt(api, info, "K", where);
  n_ = PositiveInt(api, info, "N", where);
  const auto mode = StringAttribute(api, info, "mode", where).value_or("full");
  if (mode != "full" && mode != "partial") Fail(where, "attribute 'mode' must be 'full' or 'partial', got '" + mode + "'");
  full_ = mode == "full";
  const KLimit limit{k_};
  w_ = binary::ReadBitWeights(api, info, n_, k_, InsideK, &limit, where);
  bias_.assign(static_cast<size_t>(n_), 0.0f);
  if (present_inputs_ == 5 && kinfo.GetInputName(3).empty()) {
    Fail(where, "T (centering, input 4) needs the bias B (input 3): zeros if none");
  }
  if (present_inputs_ >= 4) {
    const ConstantTensor b = ConstantFloatInput(kinfo, 3, "B", where);
    if (b.shape != std::vector<int64_t>{n_}) {
      Fail(where, "B must have shape [N] = [" + std::to_string(n_) + "], got " + ShapeStr(b.shape));
    }
    bias_ = b.data;
  }
  t_ = binary::ReadCentering(kinfo, present_inputs_, k_, "K", where);
  if (!t_.empty() && !full_) Fail(where, "T (centering) applies to mode 'full' only");
  if (!t_.empty()) {
    // The centering's constant T W = p sum_{b=1} T + q sum T, folded into the bias once.
    double t_sum = 0.0;
    for (const float v : t_) t_sum += v;
    for (int64_t n = 0; n < n_; ++n) {
      const uint64_t* row = w_.bits.data() + n * w_.words;
      double on = 0.0;
      for (int64_t i = 0; i < w_.words; ++i) {
        for (uint64_t v = row[i]; v != 0; v &= v - 1) on += t_[i * binary::kWord + __builtin_ctzll(v)];
      }
      bias_[n] += static_cast<float>(w_.p[n] * on + w_.q[n] * t_sum);
    }
  }
  kern_ = &binary::ChooseKernels();
  const auto act = binary::kbit::ReadActAttributes(api, info, w_.words * binary::kWord, where);
  if (act.bits > 1) {
    if (!full_) Fail(where, "act_bits >= 2 needs mode 'full' (it quantizes the activations), got 'partial'");
    kbit_ = binary::kbit::MakeMatMul(*this, act);
  }
}

Ort::Status BinaryMatMulKernel::Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                                        const Ort::Custom::Tensor<uint8_t>& Wbits, const Ort::Custom::Tensor<float>& S,
                                        std::optional<const Ort::Custom::Tensor<float>*> B,
                                        std::optional<const Ort::Custom::Tensor<float>*> T,
                                        Ort::Custom::Tensor<float>& Y) {
  return Guarded(Where(), [&] { Run(context, X, Wbits, S, B, T, Y); });
}

void BinaryMatMulKernel::Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                             const Ort::Custom::Tensor<uint8_t>& Wbits, const Ort::Custom::Tensor<float>& S,
                             std::optional<const Ort::Custom::Tensor<float>*> B,
                             std::optional<const Ort::Custom::Tensor<float>*> T, Ort::Custom::Tensor<float>& Y) const {
  const std::string where = Where();
  const std::vector<int64_t>& xs = X.Shape();
  if (xs.empty() || xs.back() != k_) {
    Fail(where, "X must have shape [..., K] with K = " + std::to_string(k_) + ", got " + ShapeStr(xs));
  }
  if (Wbits.Shape() != std::vector<int64_t>{n_, w_.words * 8} || S.Shape() != w_.s_shape) {
    Fail(where, "Wbits or S changed shape since kernel creation");
  }
  if (B.has_value() && *B != nullptr && (*B)->Shape() != std::vector<int64_t>{n_}) {
    Fail(where, "B must have shape [" + std::to_string(n_) + "], got " + ShapeStr((*B)->Shape()));
  }
  if (T.has_value() && *T != nullptr && (*T)->Shape() != std::vector<int64_t>{k_}) {
    Fail(where, "T must have shape [" + std::to_string(k_) + "], got " + ShapeStr((*T)->Shape()));
  }
  std::vector<int64_t> ys(xs.begin(), xs.end() - 1);
  ys.push_back(n_);
  int64_t m = 1;
  for (size_t d = 0; d + 1 < xs.size(); ++d) m *= xs[d];
  float* y = Y.Allocate(ys);
  if (m == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);
  const float* x = X.Data();
  if (kbit_) return binary::kbit::Run(*kbit_, context, x, m, y);
  const int64_t words = w_.words, kp = words * binary::kWord;
  MatMulCall call;
  call.k = this;
  call.rows = m;
  call.y = y;
  std::vector<float> padded, sums;
  std::vector<uint64_t> a;
  std::vector<int32_t> d0;
  if (!full_) {
    if (kp != k_) {  // rows padded with zeros to whole words (the kernels read words 64 floats)
      padded.assign(static_cast<size_t>(m * kp), 0.0f);
      for (int64_t r = 0; r < m; ++r) std::memcpy(&padded[r * kp], x + r * k_, sizeof(float) * k_);
    }
    sums.resize(static_cast<size_t>(m));
    for (int64_t r = 0; r < m; ++r) {
      double s = 0.0;
      for (int64_t i = 0; i < k_; ++i) s += x[r * k_ + i];
      sums[r] = static_cast<float>(s);
    }
    call.x = kp != k_ ? padded.data() : x;
    call.sumx = sums.data();
  } else {
    a.assign(static_cast<size_t>(m * words), 0);
    sums.resize(static_cast<size_t>(m));
    d0.resize(static_cast<size_t>(m));
    for (int64_t r = 0; r < m; ++r) {
      const float* xr = x + r * k_;
      uint64_t* ar = a.data() + r * words;
      double abs_sum = 0.0;
      for (int64_t i = 0; i < k_; ++i) {
        const float t = t_.empty() ? 0.0f : t_[i];
        ar[i / binary::kWord] |= uint64_t{xr[i] >= t} << (i % binary::kWord);
        abs_sum += std::fabs(xr[i] - t);
      }
      int64_t ones = 0;
      for (int64_t i = 0; i < words; ++i) ones += __builtin_popcountll(ar[i]);
      sums[r] = static_cast<float>(abs_sum / static_cast<double>(k_));
      d0[r] = static_cast<int32_t>(2 * ones - k_);
    }
    call.a = a.data();
    call.kappa = sums.data();
    call.d0 = d0.data();
  }
  RunTasks(context, full_ ? FullTask : PartialTask, (n_ + kCols - 1) / kCols, &call);
}

Ort::Custom::OrtLiteCustomOp* MakeBinaryMatMulOp() { return new SafeOp<BinaryMatMulKernel>("BinaryMatMul"); }

}  // namespace onnxopt
