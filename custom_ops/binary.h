// BinaryMatMul and BinaryConv: layers with one bit per weight (the `binary` method; semantics, bit layout and
// numpy reference in onnxopt/reference/binary.py).
//
// Every weight is W = P[n] b + Q[n], b in {0, 1} (sign weights: P = 2 alpha, Q = -alpha; {0,1} weights of Kim
// et al.: P = a, Q = c). So one kernel family serves both kinds:
//   partial (float activations):  y[n] = P S1 + Q Sx,  S1 = sum of x where b = 1, Sx = sum of x;
//   full (XNOR-Net):              y[n] = kappa (P (2 popcount(a & b) - popcount(b)) + Q (2 popcount(a) - K)),
//                                  a the sign bits of x, kappa = mean |x| over the receptive field.
// For sign weights the full form equals XNOR-Net's kappa alpha (K - 2 popcount(a ^ b)); the AND form needs the
// same one popcount per word, with popcount(a) shared by every output.
//
// Weights are copied at kernel creation into uint64 words (bit k % 64 of word k / 64: the input's byte order).
// BinaryConv's words are regrouped by eight filters, [M / 8][taps][Cw][8], so that one 512-bit load (two
// 256-bit loads) holds the same (tap, word) of eight filters, ANDed with one broadcast input word per pixel.
// Its input is binarized into channel-packed words per pixel, stored as word planes [Cw][rows][Wp] (Cw = C / 64
// rounded up; word w of every pixel in plane w, so consecutive pixels' words are consecutive and the AVX-512
// loop loads eight pixels at once), over the zero-padded grid, a window of rows per task (binary_conv.cc):
// padded pixels and channels are 0 bits, so they add nothing to popcount(a & b); the popcount(b) term then
// counts only the taps inside the image (per-tap counts kept per filter, summed per border class).
//
// Popcounts: AVX2 with the nibble lookup (vpshufb) on 256-bit words, byte counts summed with vpsadbw at most
// every 31 words (8 x 31 < 256); where the CPU has AVX-512 VPOPCNTDQ (and VL), BinaryConv's count loop uses
// vpopcntq with the scaling fused into its stores, its packing compares 16 floats into a mask, and the partial
// sums use 16-bit masked adds (binary_avx512.cc); the portable build uses __builtin_popcountll.
//
// Centering (optional input T, full mode): bits are [x >= T], kappa the mean of |x - T|, and the constant
// T W~ is added (BinaryMatMul: folded into the bias; BinaryConv: per filter and tap, summed over the taps
// inside the image like the popcounts of b).
#pragma once

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "binary_kbit.h"
#include "onnxruntime_lite_custom_op.h"

namespace onnxopt {
namespace binary {

constexpr int64_t kWord = 64;
constexpr int64_t kGroup = 8;  // filters per 512 bits of BinaryConv's regrouped weights

inline int64_t Words(int64_t bits) { return (bits + kWord - 1) / kWord; }

// [first, last) of the taps along one axis that fall inside the input, for output coordinate o.
inline std::pair<int64_t, int64_t> ValidTaps(
    int64_t o, int64_t stride, int64_t pad, int64_t dil, int64_t taps, int64_t size) {
  int64_t first = taps, last = 0;
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t i = o * stride - pad + t * dil;
    if (i >= 0 && i < size) first = std::min(first, t), last = t + 1;
  }
  return {first, std::max(first, last)};
}

// What BinaryConv's count loop needs of one call's geometry.
struct ConvPlan {
  int64_t cw = 0;               // words per pixel
  int64_t taps = 0;             // kh kw
  int64_t groups = 0;           // filter groups of 8
  int64_t ow = 0;               // output columns
  int64_t pixel_step = 0;       // words between consecutive output pixels of a row (sw)
  int64_t row_step = 0;         // words between consecutive output rows (sh Wp)
  const uint64_t* wgroups = nullptr;  // [groups][taps][cw][8]
  const int32_t* offsets = nullptr;   // [taps cw]: word offset of (tap, word) from a pixel's first word
};

// s1[r * lds + n - n0] = sum_{k: b[n, k] = 1} x[r * ldx + k] for rows r < rows (1..4), n in [n0, n1); rows of
// x hold `words` * 64 floats (zero beyond K).
using PartialFn = void (*)(const uint64_t* bits, int64_t words, const float* x, int64_t ldx, int rows, int64_t n0,
                           int64_t n1, float* s1, int64_t lds);
// counts[n - n0] = popcount(a & bits[n]) over `words` words, n in [n0, n1).
using AndCountFn = void (*)(const uint64_t* bits, int64_t words, const uint64_t* a, int64_t n0, int64_t n1,
                            int32_t* counts);
// counts[m * ow + ox] = popcount over the receptive field of output (oy, ox) of a & b_m for every filter m of
// the plan (groups of 8), x the packed image, the row's first pixel at x + oy row_step.
using ConvRowFn = void (*)(const ConvPlan& p, const uint64_t* x, int64_t oy, int32_t* counts);
// Bits [x >= t[c]] of the channels of input row iy (of an NCHW image of C channels, H x W) into
// out[(c / 64) plane + ix] (bit c % 64), the pad channels 0; abs_sum[ix] = sum_c |x - t[c]|; ones[ix] the
// pixel's popcount.
using PackRowFn = void (*)(const float* image, const float* t, int64_t C, int64_t H, int64_t W, int64_t iy,
                           int64_t cw, int64_t plane, uint64_t* out, float* abs_sum, int32_t* ones);

// y[i] = kappa[i] (two_p c[i] + q d0[i] - pb) + bias for i < n: BinaryConv's scaling of one filter's counts
// along an output row, kappa (p (2 c - popcount(b)) + q d0) + bias with pb = p popcount(b).
using ScaleRowFn = void (*)(const int32_t* c, const float* kappa, const float* d0, int64_t n, float two_p, float q,
                            float pb, float bias, float* y);

// BinaryConv's scaling of one output row, fused into the count loop where the build can (AVX-512):
// y[m][ox] = kappa[ox] (two_p[m] count + q[m] d0[ox] - pb[m]) + bias[m] for every filter m, with pb and bias
// those of a receptive field whose tap columns all lie inside the image (binary_conv.cc corrects the pixels
// whose columns are cut afterwards, by a constant per border class).
struct RowScale {
  const float* kappa = nullptr;  // [ow]: mean |x - T| over the field
  const float* d0 = nullptr;     // [ow]: 2 popcount(a) - (taps inside) C
  const float* two_p = nullptr;  // [M]
  const float* q = nullptr;      // [M]
  const float* pb = nullptr;     // [M]: p popcount(b) over the row's taps inside
  const float* bias = nullptr;   // [M]: B + T W over the row's taps inside
  int64_t m = 0;                 // filters
  float* y = nullptr;            // output row oy of filter 0
  int64_t y_step = 0;            // floats between consecutive filters' rows (OH OW)
};
// Y's row oy for every filter (RowScale), the counts as conv_row's; `counts` is scratch of [groups 8][ow].
using ConvScaledFn = void (*)(const ConvPlan& p, const uint64_t* x, int64_t oy, const RowScale& s,
                              int32_t* counts);

struct Kernels {
  PartialFn partial;
  AndCountFn and_count;
  ConvRowFn conv_row;
  PackRowFn pack_row;
  ScaleRowFn scale_row;
  ConvScaledFn conv_scaled;
};

// conv_scaled from a build's own conv_row and scale_row: the counts of the row, then one scaling pass per
// filter (the AVX2 and portable builds).
template <ConvRowFn kConv, ScaleRowFn kScale>
void ConvThenScale(const ConvPlan& p, const uint64_t* x, int64_t oy, const RowScale& s, int32_t* counts) {
  kConv(p, x, oy, counts);
  for (int64_t m = 0; m < s.m; ++m) {
    kScale(counts + m * p.ow, s.kappa, s.d0, p.ow, s.two_p[m], s.q[m], s.pb[m], s.bias[m], s.y + m * s.y_step);
  }
}

const Kernels& PortableKernels();
const Kernels& Avx2Kernels();
// The AVX2 kernels with BinaryConv's count loop, scaling and packing and the partial sums on AVX-512
// (binary_avx512.cc).
const Kernels& Avx512Kernels();
bool HasAvx512Popcount();  // CPU and OS run AVX-512F, VL, VPOPCNTDQ, and ONNXOPT_DISABLE_AVX512 is not set
// AVX-512 where HasAvx512Popcount(), else AVX2 where HasAvx2Fma(), else portable. ONNXOPT_DISABLE_AVX512=1
// forces the AVX2 path (tests run all three), ONNXOPT_DISABLE_AVX2=1 the portable one.
const Kernels& ChooseKernels();

// The optional centering input T (input 4, float32 [count], constant), checked; empty when absent. It needs
// the bias input B (input 3) present.
std::vector<float> ReadCentering(const Ort::ConstKernelInfo& info, size_t present, int64_t count, const char* dim,
                                 const std::string& where);

// What both ops read at creation: the packed bits of `rows` rows of `bits` bits (input 1, uint8
// [rows, words 8]) as words, checked (constant, dtype, shape, padded bits 0), the per-row popcount, and
// P, Q from S (input 2) for the `weights` attribute.
struct BitWeights {
  int64_t rows = 0, words = 0;
  std::vector<uint64_t> bits;     // [rows][words]
  std::vector<int32_t> ones;      // popcount of each row
  std::vector<float> p, q;        // W = p b + q
  std::vector<int64_t> s_shape;   // S's shape (checked again at run time)
};
// `valid(row, bit)`: whether a bit position holds a weight (false: padding, must be 0).
BitWeights ReadBitWeights(const OrtApi* api, const OrtKernelInfo* info, int64_t rows, int64_t bits,
                          bool (*valid)(int64_t bit, const void* ctx), const void* ctx, const std::string& where);

}  // namespace binary

struct BinaryMatMulKernel {
  BinaryMatMulKernel(const OrtApi* api, const OrtKernelInfo* info);
  size_t PresentInputs() const { return present_inputs_; }
  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<uint8_t>& Wbits, const Ort::Custom::Tensor<float>& S,
                      std::optional<const Ort::Custom::Tensor<float>*> B,
                      std::optional<const Ort::Custom::Tensor<float>*> T, Ort::Custom::Tensor<float>& Y);
  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X, const Ort::Custom::Tensor<uint8_t>& Wbits,
           const Ort::Custom::Tensor<float>& S, std::optional<const Ort::Custom::Tensor<float>*> B,
           std::optional<const Ort::Custom::Tensor<float>*> T, Ort::Custom::Tensor<float>& Y) const;
  std::string Where() const;

  std::string node_name_;
  size_t present_inputs_ = 0;
  int64_t k_ = 0, n_ = 0;
  bool full_ = true;
  binary::BitWeights w_;
  std::vector<float> bias_;  // [N]: B (zeros when absent) plus T W (the centering's constant)
  std::vector<float> t_;     // [K] centering, empty when absent
  const binary::Kernels* kern_ = nullptr;
  std::shared_ptr<const binary::kbit::MatMul> kbit_;  // act_bits >= 2: the k-bit mode (binary_kbit.cc)
};

struct BinaryConvKernel {
  BinaryConvKernel(const OrtApi* api, const OrtKernelInfo* info);
  size_t PresentInputs() const { return present_inputs_; }
  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<uint8_t>& Wbits, const Ort::Custom::Tensor<float>& S,
                      std::optional<const Ort::Custom::Tensor<float>*> B,
                      std::optional<const Ort::Custom::Tensor<float>*> T, Ort::Custom::Tensor<float>& Y);
  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X, const Ort::Custom::Tensor<uint8_t>& Wbits,
           const Ort::Custom::Tensor<float>& S, std::optional<const Ort::Custom::Tensor<float>*> B,
           std::optional<const Ort::Custom::Tensor<float>*> T, Ort::Custom::Tensor<float>& Y) const;
  std::string Where() const;

  std::string node_name_;
  size_t present_inputs_ = 0;
  int64_t c_ = 0, m_ = 0, kh_ = 0, kw_ = 0, sh_ = 1, sw_ = 1, dh_ = 1, dw_ = 1, cw_ = 0;
  int64_t pads_[4] = {0, 0, 0, 0};  // top, left, bottom, right
  binary::BitWeights w_;
  std::vector<uint64_t> groups_;   // [M / 8][taps][cw][8] (padded filters: 0)
  std::vector<int32_t> tap_ones_;  // [M][taps]: popcount of each filter's bits at each tap
  std::vector<float> t_;           // [C] centering (zeros when absent)
  std::vector<float> tap_tw_;      // [M][taps]: sum_c T[c] W[m, c, tap] (empty without T)
  std::vector<float> bias_;        // [M] B (zeros when absent)
  std::vector<float> two_p_;       // [M] 2 P: the count's factor in the scaling
  const binary::Kernels* kern_ = nullptr;
  std::shared_ptr<const binary::kbit::Conv> kbit_;  // act_bits >= 2: the k-bit mode (binary_kbit_conv.cc)
};
}  // namespace onnxopt
