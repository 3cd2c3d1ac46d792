// CirculantMatMul kernel: Y = (X * S) P + B with P a (K/b) x (N/b) grid of b x b circulant blocks (see
// onnxopt/reference/circulant.py for the semantics and the math).
//
// Block (i, j) of P is circ(c_ij), the matrix with first column c_ij: circ(c)[m][n] = c[(m - n) mod b]. A row
// vector times it is a circular correlation, so per output block j
//     y_j = irfft( sum_i conj(rfft(c_ij)) . rfft(z_i) ),   z = x * s,
// with the weight spectra conj(rfft(c_ij)) / b (1 / b: the FFT's inverse is unnormalised) computed ONCE at
// kernel creation, in double by a direct DFT (K N / 2 complex products: a few million for 4096 x 4096).
//
// Per call, rows are taken in chunks (their input spectra stay within a fixed budget) and each chunk runs two
// ParallelFor loops over "items":
//   1. forward: items (row, input block i); 8 items share one fft::Plan(1, b) forward transform, one per
//      vector lane, so a single row with K/b >= 8 input blocks fills every lane (batch 1 is the case that
//      must be fast). The spectra are stored per item, re[nbw] then im[nbw].
//   2. product + inverse: items (row, output block j); per item, the complex multiply-accumulate over i runs
//      along the frequency axis (contiguous in both the weight and the input spectra, so it vectorises without
//      reassociating a sum), then 8 items share one inverse transform and are written out with the bias.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "fft.h"
#include "kernel_util.h"
#include "ops.h"

namespace onnxopt {

namespace {

constexpr int64_t kL = fft::kLanes;
// Input spectra of one row chunk: at most this many floats (16 MiB), so memory is bounded by it, not by M.
constexpr int64_t kChunkFloats = int64_t{1} << 22;

// acc += conj-folded weight spectrum w (re[n], im[n]) times the input spectrum x (re[n], im[n]), over n bins.
// Written once, compiled twice below: the AVX2 copy is chosen at run time.
inline __attribute__((always_inline)) void MacBody(const float* __restrict w, const float* __restrict x,
                                                   float* __restrict ar, float* __restrict ai, int64_t n) {
  const float* wr = w;
  const float* wi = w + n;
  const float* xr = x;
  const float* xi = x + n;
  for (int64_t f = 0; f < n; ++f) {
    ar[f] += wr[f] * xr[f] - wi[f] * xi[f];
    ai[f] += wr[f] * xi[f] + wi[f] * xr[f];
  }
}

void MacPortable(const float* w, const float* x, float* ar, float* ai, int64_t n) { MacBody(w, x, ar, ai, n); }

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) void MacAvx2(const float* w, const float* x, float* ar, float* ai,
                                                  int64_t n) {
  MacBody(w, x, ar, ai, n);
}
#endif

using MacFn = void (*)(const float*, const float*, float*, float*, int64_t);

}  // namespace

struct CirculantMatMulKernel;

namespace {

// One call's state shared by the tasks (which must not throw: failures are recorded in `failed`).
struct Call {
  const CirculantMatMulKernel* k = nullptr;
  const float* x = nullptr;  // first row of the chunk
  float* y = nullptr;        // first output row of the chunk
  float* xs = nullptr;       // input spectra [rows][kb][2 nbw]
  int64_t rows = 0;
  std::atomic<bool> failed{false};
};

}  // namespace

struct CirculantMatMulKernel {
  CirculantMatMulKernel(const OrtApi* api, const OrtKernelInfo* info);

  size_t PresentInputs() const { return present_inputs_; }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& C, const Ort::Custom::Tensor<float>& S,
                      std::optional<const Ort::Custom::Tensor<float>*> B, Ort::Custom::Tensor<float>& Y);

  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X, const Ort::Custom::Tensor<float>& C,
           const Ort::Custom::Tensor<float>& S, std::optional<const Ort::Custom::Tensor<float>*> B,
           Ort::Custom::Tensor<float>& Y);
  std::string Where() const { return onnxopt::Where("CirculantMatMul", node_name_); }

  std::string node_name_;
  size_t present_inputs_ = 0;
  int64_t b_ = 0, kb_ = 0, nb_ = 0, k_ = 0, n_ = 0, nbw_ = 0;
  std::vector<float> w_;     // [nb][kb][re nbw, im nbw]: conj(rfft(c_ij)) / b
  std::vector<float> s_;     // [K] signs
  std::vector<float> bias_;  // [N] or empty
  std::unique_ptr<fft::Plan> plan_;
  const fft::Kernels* fk_ = nullptr;
  MacFn mac_ = MacPortable;
};

namespace {

bool IsPow2(int64_t v) { return v >= 1 && (v & (v - 1)) == 0; }

// Task `g` of the forward loop: items [8 g, 8 g + 8) of (row, input block), one per lane.
void ForwardTask(void* data, size_t g) {
  auto* call = static_cast<Call*>(data);
  if (call->failed.load(std::memory_order_relaxed)) return;
  try {
    const CirculantMatMulKernel& k = *call->k;
    const fft::Plan& p = *k.plan_;
    const int64_t b = k.b_, nbw = k.nbw_;
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>((b + 2 * nbw) * kL));
    float* tile = buf.data();
    float* re = tile + b * kL;
    float* im = re + nbw * kL;
    const int64_t first = static_cast<int64_t>(g) * kL;
    const int64_t lanes = std::min<int64_t>(kL, call->rows * k.kb_ - first);
    if (lanes < kL) std::fill(tile, tile + b * kL, 0.0f);
    for (int64_t l = 0; l < lanes; ++l) {
      const int64_t item = first + l, r = item / k.kb_, i = item % k.kb_;
      const float* x = call->x + r * k.k_ + i * b;
      const float* s = k.s_.data() + i * b;
      for (int64_t t = 0; t < b; ++t) tile[t * kL + l] = x[t] * s[t];
    }
    k.fk_->forward(p, tile, re, im);
    for (int64_t l = 0; l < lanes; ++l) {
      float* d = call->xs + (first + l) * 2 * nbw;
      for (int64_t f = 0; f < nbw; ++f) {
        d[f] = re[f * kL + l];
        d[nbw + f] = im[f * kL + l];
      }
    }
  } catch (...) {
    call->failed.store(true);
  }
}

// Task `g` of the product loop: items [8 g, 8 g + 8) of (row, output block): the sums over the input blocks,
// one inverse transform for the 8 of them, the bias, the output.
void ProductTask(void* data, size_t g) {
  auto* call = static_cast<Call*>(data);
  if (call->failed.load(std::memory_order_relaxed)) return;
  try {
    const CirculantMatMulKernel& k = *call->k;
    const fft::Plan& p = *k.plan_;
    const int64_t b = k.b_, nbw = k.nbw_;
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>((b + 2 * nbw) * kL + 2 * nbw));
    float* out = buf.data();
    float* re = out + b * kL;
    float* im = re + nbw * kL;
    float* ar = im + nbw * kL;
    float* ai = ar + nbw;
    const int64_t first = static_cast<int64_t>(g) * kL;
    const int64_t lanes = std::min<int64_t>(kL, call->rows * k.nb_ - first);
    if (lanes < kL) {
      std::fill(re, re + 2 * nbw * kL, 0.0f);  // unused lanes: zeros in, ignored out
    }
    for (int64_t l = 0; l < lanes; ++l) {
      const int64_t item = first + l, r = item / k.nb_, j = item % k.nb_;
      std::fill(ar, ar + 2 * nbw, 0.0f);
      const float* w = k.w_.data() + j * k.kb_ * 2 * nbw;
      const float* x = call->xs + r * k.kb_ * 2 * nbw;
      for (int64_t i = 0; i < k.kb_; ++i) k.mac_(w + i * 2 * nbw, x + i * 2 * nbw, ar, ai, nbw);
      for (int64_t f = 0; f < nbw; ++f) {
        re[f * kL + l] = ar[f];
        im[f * kL + l] = ai[f];
      }
    }
    k.fk_->inverse_rows(p, re, im, 0, 1, out, b, static_cast<int>(b));
    for (int64_t l = 0; l < lanes; ++l) {
      const int64_t item = first + l, r = item / k.nb_, j = item % k.nb_;
      float* y = call->y + r * k.n_ + j * b;
      const float* bias = k.bias_.empty() ? nullptr : k.bias_.data() + j * b;
      if (bias != nullptr) {
        for (int64_t t = 0; t < b; ++t) y[t] = out[t * kL + l] + bias[t];
      } else {
        for (int64_t t = 0; t < b; ++t) y[t] = out[t * kL + l];
      }
    }
  } catch (...) {
    call->failed.store(true);
  }
}

}  // namespace

CirculantMatMulKernel::CirculantMatMulKernel(const OrtApi* api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();
  present_inputs_ = onnxopt::PresentInputs(kinfo);
  if (present_inputs_ != 3 && present_inputs_ != 4) {
    Fail(where, "expects inputs (X, C, S) or (X, C, S, B), got " + std::to_string(present_inputs_));
  }
  const auto block = IntAttribute(api, info, "block", where);
  if (!block) Fail(where, "attribute 'block' (the circulant block size, a power of two >= 2) is required");
  b_ = *block;
  if (!IsPow2(b_) || b_ < 2 || b_ > (int64_t{1} << 24)) {
    Fail(where, "attribute 'block' must be a power of two >= 2, got " + std::to_string(b_));
  }

  const ConstantTensor c = ConstantFloatInput(kinfo, 1, "C", where);
  if (c.shape.size() != 3 || c.shape[0] < 1 || c.shape[1] < 1 || c.shape[2] != b_) {
    Fail(where, "C must have shape [K/b, N/b, b] with b = block = " + std::to_string(b_) + ", got " +
                    ShapeStr(c.shape));
  }
  kb_ = c.shape[0];
  nb_ = c.shape[1];
  k_ = kb_ * b_;
  n_ = nb_ * b_;
  nbw_ = b_ / 2 + 1;

  const ConstantTensor s = ConstantFloatInput(kinfo, 2, "S", where);
  if (s.shape != std::vector<int64_t>{k_}) {
    Fail(where, "S must have shape [K] = [" + std::to_string(k_) + "], got " + ShapeStr(s.shape));
  }
  s_ = s.data;
  if (present_inputs_ == 4) {
    const ConstantTensor bt = ConstantFloatInput(kinfo, 3, "B", where);
    if (bt.shape != std::vector<int64_t>{n_}) {
      Fail(where, "B must have shape [N] = [" + std::to_string(n_) + "], got " + ShapeStr(bt.shape));
    }
    bias_ = bt.data;
  }

  plan_ = std::make_unique<fft::Plan>(1, static_cast<int>(b_));
  const bool avx2 = HasAvx2Fma();
  fk_ = avx2 ? &fft::Avx2Kernels() : &fft::PortableKernels();
#if defined(__x86_64__) || defined(__i386__)
  mac_ = avx2 ? MacAvx2 : MacPortable;
#endif

  // Weight spectra by a direct DFT in double: W_ij[f] = conj(sum_t c_ij[t] e^{-2 pi i f t / b}) / b.
  std::vector<double> cs(static_cast<size_t>(b_)), sn(static_cast<size_t>(b_));
  for (int64_t t = 0; t < b_; ++t) {
    const double a = 2.0 * M_PI * static_cast<double>(t) / static_cast<double>(b_);
    cs[t] = std::cos(a);
    sn[t] = std::sin(a);
  }
  w_.assign(static_cast<size_t>(nb_ * kb_ * 2 * nbw_), 0.0f);
  const double scale = 1.0 / static_cast<double>(b_);
  for (int64_t i = 0; i < kb_; ++i) {
    for (int64_t j = 0; j < nb_; ++j) {
      const float* col = c.data.data() + (i * nb_ + j) * b_;
      float* d = w_.data() + (j * kb_ + i) * 2 * nbw_;
      for (int64_t f = 0; f < nbw_; ++f) {
        double sr = 0.0, si = 0.0;
        for (int64_t t = 0, idx = 0; t < b_; ++t, idx = (idx + f) & (b_ - 1)) {
          sr += col[t] * cs[idx];
          si -= col[t] * sn[idx];
        }
        d[f] = static_cast<float>(sr * scale);
        d[nbw_ + f] = static_cast<float>(-si * scale);  // the conjugate: correlation
      }
    }
  }
}

Ort::Status CirculantMatMulKernel::Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                                           const Ort::Custom::Tensor<float>& C,
                                           const Ort::Custom::Tensor<float>& S,
                                           std::optional<const Ort::Custom::Tensor<float>*> B,
                                           Ort::Custom::Tensor<float>& Y) {
  return Guarded(Where(), [&] { Run(context, X, C, S, B, Y); });
}

void CirculantMatMulKernel::Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                                const Ort::Custom::Tensor<float>& C, const Ort::Custom::Tensor<float>& S,
                                std::optional<const Ort::Custom::Tensor<float>*> B,
                                Ort::Custom::Tensor<float>& Y) {
  const std::string where = Where();
  const std::vector<int64_t>& xs = X.Shape();
  if (xs.empty()) Fail(where, "X must have rank >= 1 [..., K], got a scalar");
  if (xs.back() != k_) {
    Fail(where, "X has last dimension " + std::to_string(xs.back()) + " (shape " + ShapeStr(xs) +
                    ") but C expects K = " + std::to_string(k_) + " (C shape " + ShapeStr({kb_, nb_, b_}) + ")");
  }
  // C, S and B were read as constants at kernel creation; their run-time shapes must still agree.
  const bool has_b = B.has_value() && *B != nullptr;
  CheckConstantShapes(C.Shape(), {kb_, nb_, b_}, has_b ? &(*B)->Shape() : nullptr, n_, where);
  if (S.Shape() != std::vector<int64_t>{k_}) {
    Fail(where, "S must have shape [" + std::to_string(k_) + "], got " + ShapeStr(S.Shape()));
  }
  std::vector<int64_t> ys(xs.begin(), xs.end() - 1);
  ys.push_back(n_);
  int64_t m = 1;
  for (size_t d = 0; d + 1 < xs.size(); ++d) m *= xs[d];
  float* y = Y.Allocate(ys);
  if (m == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);

  const int64_t row_floats = kb_ * 2 * nbw_;
  const int64_t chunk = std::clamp<int64_t>(kChunkFloats / row_floats, 1, m);
  std::unique_ptr<float[]> xspec(new float[static_cast<size_t>(chunk * row_floats)]);
  for (int64_t r0 = 0; r0 < m; r0 += chunk) {
    Call call;
    call.k = this;
    call.rows = std::min(chunk, m - r0);
    call.x = X.Data() + r0 * k_;
    call.y = y + r0 * n_;
    call.xs = xspec.get();
    RunTasks(context, ForwardTask, (call.rows * kb_ + kL - 1) / kL, &call);
    if (!call.failed.load()) RunTasks(context, ProductTask, (call.rows * nb_ + kL - 1) / kL, &call);
    if (call.failed.load()) Fail(where, "a compute task failed (out of memory?)", ORT_FAIL);
  }
}

Ort::Custom::OrtLiteCustomOp* MakeCirculantMatMulOp() {
  return new SafeOp<CirculantMatMulKernel>("CirculantMatMul");
}

}  // namespace onnxopt
