// ACDCMatMul kernel: Y = stack(X)[..., :N] + B, a stack of L ACDC layers h -> A_l C^T D_l C P_l h on R^n (see
// onnxopt/reference/acdc.py for the semantics; C the orthonormal DCT-II, n a power of two).
//
// The orthonormal scalings cancel inside each layer: C = S Cu with Cu the unnormalised DCT-II
// (X_k = sum_i x_i cos(pi (2i+1) k / 2n)) and S diagonal, so C^T D C = Cu^-1 S^-1 D S Cu = Cu^-1 D Cu (diagonals
// commute). The kernel therefore runs Cu and its exact inverse and folds every constant factor into D once.
//
// Cu by Makhoul's method through a real FFT of length n, itself a complex FFT of length h = n / 2:
//   v[k] = x[2k], v[n-1-k] = x[2k+1]  (k < h);   V = FFT_n(v);   X_k = Re(e^{-i pi k / 2n} V_k),
//   and with c = cos(pi k / 2n), s = sin(pi k / 2n), for 0 <= k <= h:
//     X_k = c Re V_k + s Im V_k,   X_{n-k} = s Re V_k - c Im V_k   (V_{n-k} = conj V_k: v is real).
//   V_k (k <= h) from z[m] = v[2m] + i v[2m+1], Z = FFT_h(z): V_k = E_k + w^k O_k, w = e^{-2 pi i / n},
//     E_k = (Z_k + conj Z_{h-k}) / 2, O_k = -i (Z_k - conj Z_{h-k}) / 2  (indices mod h).
// The inverse runs the same steps backwards: with Y = D X (Y_n = 0),
//   V_k = e^{i pi k / 2n} (Y_k - i Y_{n-k}) = (c Y_k + s Y_{n-k}) + i (s Y_k - c Y_{n-k}),
//   E_k = (V_k + conj V_{h-k}) / 2, O_k = w^-k (V_k - conj V_{h-k}) / 2, Z_k = E_k + i O_k,
//   z = IFFT_h(Z), v[2m] = Re z_m, v[2m+1] = Im z_m, x[2k] = v[k], x[2k+1] = v[n-1-k].
// Constant factors are folded into D once: the kernel drops the forward split's 1/2 (its V is 2 V) and the
// inverse split's 1/2 (its Z is 2 Z), and its inverse FFT is unnormalised (h z): 2 * 2 * h = 2 n, so the
// kernel scales by D' = D / (2 n).
//
// The complex FFT is radix-2 decimation in time on split re/im arrays (input in bit-reversed order, which the
// gathers produce for free: the permutation P_l, Makhoul's reordering, the even/odd packing and the bit
// reversal are one precomputed index table per layer). Twiddles are computed in double, stored in float.
// One row per task (RunTasks: the session's pool); the row code is compiled twice, portable and AVX2+FMA,
// from one always-inline body, and picked at kernel creation (ONNXOPT_DISABLE_AVX2=1 forces portable).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernel_util.h"
#include "ops.h"

namespace onnxopt {

struct ACDCMatMulKernel;

namespace {

bool IsPow2(int64_t v) { return v >= 1 && (v & (v - 1)) == 0; }

// The constants of one kernel, read by the row code.
struct Tables {
  int64_t n = 0, h = 0, layers = 0, out = 0;
  std::vector<float> tw_re, tw_im;  // stage-concatenated e^{-2 pi i j / (2 half)}, j < half, half = 1, 2, .., h/2
  std::vector<float> w_re, w_im;    // e^{-2 pi i k / n}, k = 0 .. h
  std::vector<float> c, s;          // cos, sin(pi k / 2n), k = 0 .. h
  std::vector<float> a;             // [L][n]
  std::vector<float> d;             // [L][n]: D / (2 n)
  std::vector<int32_t> gre, gim;    // [L][h]: z_re[j] = x[gre[j]], z_im[j] = x[gim[j]] (bit-reversed j)
  std::vector<int32_t> bitrev;      // [h]
  std::vector<float> bias;          // [out] or empty
};

// In-place radix-2 DIT FFT of length h on split arrays, input bit-reversed, output natural; INV: conjugate
// twiddles (the unnormalised inverse).
template <bool INV>
inline __attribute__((always_inline)) void FftBody(const Tables& t, float* __restrict re, float* __restrict im) {
  const int64_t h = t.h;
  for (int64_t half = 1; half < h; half *= 2) {
    const float* wr = t.tw_re.data() + half - 1;
    const float* wi = t.tw_im.data() + half - 1;
    for (int64_t s0 = 0; s0 < h; s0 += 2 * half) {
      float* ar = re + s0;
      float* ai = im + s0;
      float* br = ar + half;
      float* bi = ai + half;
      for (int64_t j = 0; j < half; ++j) {
        const float ci = INV ? -wi[j] : wi[j];
        const float tr = br[j] * wr[j] - bi[j] * ci;
        const float tj = br[j] * ci + bi[j] * wr[j];
        br[j] = ar[j] - tr;
        bi[j] = ai[j] - tj;
        ar[j] += tr;
        ai[j] += tj;
      }
    }
  }
}

// One row through the whole stack. work: 2 h (z) + 2 (h + 1) (V) + n (signal) + n (cosine domain) floats.
inline __attribute__((always_inline)) void RowBody(const Tables& t, const float* x, float* y, float* work) {
  const int64_t n = t.n, h = t.h;
  float* zr = work;
  float* zi = zr + h;
  float* vr = zi + h;
  float* vi = vr + h + 1;
  float* sig = vi + h + 1;
  float* cod = sig + n;
  std::memcpy(sig, x, sizeof(float) * n);
  for (int64_t l = 0; l < t.layers; ++l) {
    const int32_t* gre = t.gre.data() + l * h;
    const int32_t* gim = t.gim.data() + l * h;
    for (int64_t j = 0; j < h; ++j) {
      zr[j] = sig[gre[j]];
      zi[j] = sig[gim[j]];
    }
    FftBody<false>(t, zr, zi);
    // Real split (halves dropped) and Makhoul's twiddle, into the cosine domain, times D'.
    const float* d = t.d.data() + l * n;
    for (int64_t k = 0; k <= h; ++k) {
      const int64_t p = k == h ? 0 : k, q = k == 0 ? 0 : h - k;
      const float er = zr[p] + zr[q], ei = zi[p] - zi[q];  // 2 E_k
      const float orr = zi[p] + zi[q], oi = zr[q] - zr[p];  // 2 O_k = -i (Z_k - conj Z_{h-k})
      const float wr = t.w_re[k], wi = t.w_im[k];
      const float Vr = er + wr * orr - wi * oi, Vi = ei + wr * oi + wi * orr;
      cod[k] = (t.c[k] * Vr + t.s[k] * Vi) * d[k];
      if (k > 0 && k < h) cod[n - k] = (t.s[k] * Vr - t.c[k] * Vi) * d[n - k];
    }
    // Back: V_k = e^{i pi k / 2n} (Y_k - i Y_{n-k}) for k <= h.
    vr[0] = cod[0];
    vi[0] = 0.0f;
    for (int64_t k = 1; k <= h; ++k) {
      const float yk = cod[k], ynk = cod[n - k];
      vr[k] = t.c[k] * yk + t.s[k] * ynk;
      vi[k] = t.s[k] * yk - t.c[k] * ynk;
    }
    // Z_k = E_k + i O_k (halves folded into D'), written bit-reversed for the DIT inverse.
    for (int64_t k = 0; k < h; ++k) {
      const int64_t q = h - k;
      const float er = vr[k] + vr[q], ei = vi[k] - vi[q];
      const float dr = vr[k] - vr[q], di = vi[k] + vi[q];
      const float wr = t.w_re[k], wi = -t.w_im[k];  // w^-k
      const float orr = dr * wr - di * wi, oi = dr * wi + di * wr;
      const int32_t b = t.bitrev[k];
      zr[b] = er - oi;
      zi[b] = ei + orr;
    }
    FftBody<true>(t, zr, zi);
    // v[2m] = zr[m], v[2m+1] = zi[m]; x[2k] = v[k], x[2k+1] = v[n-1-k]; times A.
    const float* a = t.a.data() + l * n;
    for (int64_t k = 0; k < h; ++k) {
      const float ve = (k & 1) ? zi[k >> 1] : zr[k >> 1];
      const int64_t r = n - 1 - k;
      const float vo = (r & 1) ? zi[r >> 1] : zr[r >> 1];
      sig[2 * k] = ve * a[2 * k];
      sig[2 * k + 1] = vo * a[2 * k + 1];
    }
  }
  if (t.bias.empty()) {
    std::memcpy(y, sig, sizeof(float) * t.out);
  } else {
    for (int64_t j = 0; j < t.out; ++j) y[j] = sig[j] + t.bias[j];
  }
}

void RowPortable(const Tables& t, const float* x, float* y, float* work) { RowBody(t, x, y, work); }

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) void RowAvx2(const Tables& t, const float* x, float* y, float* work) {
  RowBody(t, x, y, work);
}
#endif

using RowFn = void (*)(const Tables&, const float*, float*, float*);

// One call's state shared by the tasks (which must not throw: failures are recorded in `failed`).
struct Call {
  const Tables* t = nullptr;
  RowFn row = nullptr;
  const float* x = nullptr;
  float* y = nullptr;
  std::atomic<bool> failed{false};
};

void RowTask(void* data, size_t r) {
  auto* call = static_cast<Call*>(data);
  if (call->failed.load(std::memory_order_relaxed)) return;
  try {
    const Tables& t = *call->t;
    thread_local std::vector<float> work;
    work.resize(static_cast<size_t>(4 * t.h + 2 + 2 * t.n));
    call->row(t, call->x + static_cast<int64_t>(r) * t.n, call->y + static_cast<int64_t>(r) * t.out,
              work.data());
  } catch (...) {
    call->failed.store(true);
  }
}


}  // namespace

struct ACDCMatMulKernel {
  ACDCMatMulKernel(const OrtApi* api, const OrtKernelInfo* info);

  size_t PresentInputs() const { return present_inputs_; }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& A, const Ort::Custom::Tensor<float>& D,
                      std::optional<const Ort::Custom::Tensor<int64_t>*> P,
                      std::optional<const Ort::Custom::Tensor<float>*> B, Ort::Custom::Tensor<float>& Y) {
    return Guarded(Where(), [&] { Run(context, X, A, D, P, B, Y); });
  }

  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X, const Ort::Custom::Tensor<float>& A,
           const Ort::Custom::Tensor<float>& D, std::optional<const Ort::Custom::Tensor<int64_t>*> P,
           std::optional<const Ort::Custom::Tensor<float>*> B, Ort::Custom::Tensor<float>& Y);
  std::string Where() const { return onnxopt::Where("ACDCMatMul", node_name_); }

  std::string node_name_;
  size_t present_inputs_ = 0;
  Tables t_;
  RowFn row_ = RowPortable;
};

ACDCMatMulKernel::ACDCMatMulKernel(const OrtApi* /*api*/, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();
  present_inputs_ = onnxopt::PresentInputs(kinfo);
  if (present_inputs_ < 3 || present_inputs_ > 5) {
    Fail(where, "expects inputs (X, A, D[, P[, B]]), got " + std::to_string(present_inputs_));
  }
  if (present_inputs_ == 5 && kinfo.GetInputName(3).empty()) {
    // The lite API cannot read an absent input in the middle; identity rows say the same thing.
    Fail(where, "P (input 3) is absent while B is given: give P (identity rows for no permutation)");
  }
  const ConstantTensor a = ConstantFloatInput(kinfo, 1, "A", where);
  if (a.shape.size() != 2 || a.shape[0] < 1 || !IsPow2(a.shape[1]) || a.shape[1] < 2 ||
      a.shape[1] > (int64_t{1} << 24)) {
    Fail(where, "A must have shape [L, n] with L >= 1 and n a power of two >= 2, got " + ShapeStr(a.shape));
  }
  const int64_t L = a.shape[0], n = a.shape[1], h = n / 2;
  const ConstantTensor d = ConstantFloatInput(kinfo, 2, "D", where);
  if (d.shape != a.shape) Fail(where, "D must have shape " + ShapeStr(a.shape) + " (A's), got " + ShapeStr(d.shape));
  std::vector<int64_t> perm;
  if (present_inputs_ >= 4) {
    perm = ConstantPermutations(kinfo, 3, "P", a.shape, where);
  }
  t_.out = n;
  if (present_inputs_ == 5) {
    const ConstantTensor b = ConstantFloatInput(kinfo, 4, "B", where);
    if (b.shape.size() != 1 || b.shape[0] < 1 || b.shape[0] > n) {
      Fail(where, "B must have shape [N] with 1 <= N <= n = " + std::to_string(n) + ", got " + ShapeStr(b.shape));
    }
    t_.out = b.shape[0];
    t_.bias = b.data;
  }
  t_.n = n;
  t_.h = h;
  t_.layers = L;
  t_.a = a.data;
  t_.d.resize(d.data.size());
  for (size_t i = 0; i < d.data.size(); ++i) {
    t_.d[i] = static_cast<float>(static_cast<double>(d.data[i]) / (2.0 * static_cast<double>(n)));
  }

  int bits = 0;
  while ((int64_t{1} << bits) < h) ++bits;
  t_.bitrev.resize(static_cast<size_t>(h));
  for (int64_t j = 0; j < h; ++j) {
    int64_t r = 0;
    for (int b = 0; b < bits; ++b) r |= ((j >> b) & 1) << (bits - 1 - b);
    t_.bitrev[j] = static_cast<int32_t>(r);
  }
  for (int64_t half = 1; half < h; half *= 2) {
    for (int64_t j = 0; j < half; ++j) {
      const double ang = -M_PI * static_cast<double>(j) / static_cast<double>(half);
      t_.tw_re.push_back(static_cast<float>(std::cos(ang)));
      t_.tw_im.push_back(static_cast<float>(std::sin(ang)));
    }
  }
  for (int64_t k = 0; k <= h; ++k) {
    const double ang = -2.0 * M_PI * static_cast<double>(k) / static_cast<double>(n);
    t_.w_re.push_back(static_cast<float>(std::cos(ang)));
    t_.w_im.push_back(static_cast<float>(std::sin(ang)));
    const double th = M_PI * static_cast<double>(k) / (2.0 * static_cast<double>(n));
    t_.c.push_back(static_cast<float>(std::cos(th)));
    t_.s.push_back(static_cast<float>(std::sin(th)));
  }
  // Gathers: u = x[perm]; v[k] = u[2k], v[n-1-k] = u[2k+1]; z[m] = v[2m] + i v[2m+1] at bit-reversed m.
  t_.gre.resize(static_cast<size_t>(L * h));
  t_.gim.resize(static_cast<size_t>(L * h));
  std::vector<int64_t> vsrc(static_cast<size_t>(n));
  for (int64_t l = 0; l < L; ++l) {
    auto u = [&](int64_t i) { return perm.empty() ? i : perm[l * n + i]; };
    for (int64_t k = 0; k < h; ++k) {
      vsrc[k] = u(2 * k);
      vsrc[n - 1 - k] = u(2 * k + 1);
    }
    for (int64_t m = 0; m < h; ++m) {
      t_.gre[l * h + t_.bitrev[m]] = static_cast<int32_t>(vsrc[2 * m]);
      t_.gim[l * h + t_.bitrev[m]] = static_cast<int32_t>(vsrc[2 * m + 1]);
    }
  }
#if defined(__x86_64__) || defined(__i386__)
  row_ = HasAvx2Fma() ? RowAvx2 : RowPortable;
#endif
}

void ACDCMatMulKernel::Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                           const Ort::Custom::Tensor<float>& A, const Ort::Custom::Tensor<float>& D,
                           std::optional<const Ort::Custom::Tensor<int64_t>*> P,
                           std::optional<const Ort::Custom::Tensor<float>*> B, Ort::Custom::Tensor<float>& Y) {
  const std::string where = Where();
  const std::vector<int64_t>& xs = X.Shape();
  const std::vector<int64_t> ad{t_.layers, t_.n};
  if (xs.empty()) Fail(where, "X must have rank >= 1 [..., n], got a scalar");
  if (xs.back() != t_.n) {
    Fail(where, "X has last dimension " + std::to_string(xs.back()) + " (shape " + ShapeStr(xs) +
                    ") but A expects n = " + std::to_string(t_.n) + " (A shape " + ShapeStr(ad) + ")");
  }
  // A, D, P, B were read as constants at kernel creation; their run-time shapes must still agree.
  if (A.Shape() != ad || D.Shape() != ad) {
    Fail(where, "A and D must have shape " + ShapeStr(ad) + ", got " + ShapeStr(A.Shape()) + " and " +
                    ShapeStr(D.Shape()));
  }
  if (P.has_value() && *P != nullptr && (*P)->Shape() != ad) {
    Fail(where, "P must have shape " + ShapeStr(ad) + ", got " + ShapeStr((*P)->Shape()));
  }
  if (B.has_value() && *B != nullptr && (*B)->Shape() != std::vector<int64_t>{t_.out}) {
    Fail(where, "B must have shape [" + std::to_string(t_.out) + "], got " + ShapeStr((*B)->Shape()));
  }
  std::vector<int64_t> ys(xs.begin(), xs.end() - 1);
  ys.push_back(t_.out);
  int64_t m = 1;
  for (size_t i = 0; i + 1 < xs.size(); ++i) m *= xs[i];
  float* y = Y.Allocate(ys);
  if (m == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);
  Call call;
  call.t = &t_;
  call.row = row_;
  call.x = X.Data();
  call.y = y;
  RunTasks(context, RowTask, m, &call);
  if (call.failed.load()) Fail(where, "a compute task failed (out of memory?)", ORT_FAIL);
}

Ort::Custom::OrtLiteCustomOp* MakeACDCMatMulOp() { return new SafeOp<ACDCMatMulKernel>("ACDCMatMul"); }

}  // namespace onnxopt
