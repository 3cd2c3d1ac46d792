// k-bit activations for BinaryMatMul and BinaryConv (attribute act_bits = k in 2..8; DoReFa-style uniform codes
// in a clipped range; semantics in onnxopt/reference/binary.py), executed bit-serially.
//
// Codes: u = clamp(rint((x - T) r), 0, L), r = 1 / act_scale, L = 2^k - 1, in float32 exactly as the reference
// (x - T, times r, round half to even), so codes agree bit for bit. Bit plane i of the codes is packed like the
// XNOR mode packs signs, and for W = P b + Q:
//   C[n] = sum_k b[k, n] u[k] = sum_i 2^i popcount(a_i & b_n),   U = sum_k u[k],
//   y[n] = s (P[n] C[n] + Q[n] U) + T W[n] + B[n].
// C comes from the AND-popcount loops run once per plane; the planes are combined by Horner's rule on the
// counters (counts doubled before each lower plane), so no per-word shift is needed. Padding holds code 0.
//
// This file and binary_kbit*.cc are the k-bit mode only: they keep their own weight layout and loops, so the
// XNOR mode's kernels (binary*.cc) can change without touching them. The two ops hook in with MakeMatMul /
// MakeConv at creation and Run at compute.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

namespace onnxopt {
struct BinaryMatMulKernel;
struct BinaryConvKernel;

namespace binary {
namespace kbit {

constexpr int kMaxBits = 8;
constexpr int64_t kGroup = 8;  // filters per 512 bits of the regrouped conv weights

// BinaryConv's count loop geometry (the same shape of plan as the XNOR mode's, with bit planes).
struct ConvPlan {
  int64_t cw = 0;          // words per pixel and plane
  int64_t taps = 0;        // kh kw
  int64_t groups = 0;      // filter groups of 8
  int64_t ow = 0;          // output columns
  int64_t pixel_step = 0;  // words between consecutive output pixels of a row (sw)
  int64_t row_step = 0;    // words between consecutive output rows (sh Wp)
  int bits = 0;            // planes
  int64_t bit_stride = 0;  // words between bit planes of one image (cw Hp Wp)
  const uint64_t* wgroups = nullptr;  // [groups][taps][cw][8]
  const int32_t* offsets = nullptr;   // [taps cw]: word offset of (tap, word) from a pixel's first word
};

// Codes of one row of K floats (x - t[k], times r, clamped to [0, 2^bits - 1]) as `bits` planes of `words`
// words at out + i words (bits beyond K 0); returns the sum of the codes.
using PackMatRowFn = int64_t (*)(const float* x, const float* t, int64_t K, float r, int bits, int64_t words,
                                 uint64_t* out);
// counts[n - n0] = sum_i 2^i popcount(a_i & bits[n]) over `words` words, planes a_i = a + i words.
using PlaneCountFn = void (*)(const uint64_t* bits, int64_t words, const uint64_t* a, int planes, int64_t n0,
                              int64_t n1, int32_t* counts);
// Codes of input row iy (NCHW image of C channels, H x W) into word planes: bit c % 64 of
// out[(i cw + c / 64) plane + ix] is bit i of pixel ix's code of channel c; code_sum[ix] = sum_c u.
using PackConvRowFn = void (*)(const float* image, const float* t, int64_t C, int64_t H, int64_t W, int64_t iy,
                               float r, int bits, int64_t cw, int64_t plane, uint64_t* out, int32_t* code_sum);
// counts[m * ow + ox] = sum_i 2^i popcount over the field of output (oy, ox) of a_i & b_m, for every filter of
// the plan (groups of 8); x the packed image (bit plane 0), the row's first pixel at x + oy row_step.
using ConvRowFn = void (*)(const ConvPlan& p, const uint64_t* x, int64_t oy, int32_t* counts);

// y[i] = sp c[i] + (sq u[i] + bias) for i < n: one filter's outputs along a row from its counts and the
// pixels' code sums.
using ScaleRowFn = void (*)(const int32_t* c, const float* u, int64_t n, float sp, float sq, float bias, float* y);

struct Kernels {
  PackMatRowFn pack_mat_row;
  PlaneCountFn plane_count;
  PackConvRowFn pack_conv_row;
  ConvRowFn conv_row;
  ScaleRowFn scale_row;
};

const Kernels& PortableKernels();
const Kernels& Avx2Kernels();
const Kernels& Avx512Kernels();  // VPOPCNTDQ count loops, AVX2 packing
// Like binary::ChooseKernels: AVX-512 VPOPCNTDQ, else AVX2, else portable (ONNXOPT_DISABLE_AVX512=1,
// ONNXOPT_DISABLE_AVX2=1 step down).
const Kernels& ChooseKernels();

// The k-bit form of a BinaryMatMul node, built from the kernel's checked weights (bits, P, Q, bias with T W).
class MatMul;
// The k-bit form of a BinaryConv node, built from the kernel's checked weights and geometry.
class Conv;

// act_bits (1 when absent) and act_scale of a node, checked: act_bits in [1, 8]; act_scale required, finite and
// > 0 (its reciprocal too) for act_bits >= 2, absent otherwise; `reduction` (K, or kh kw Cp) times 2^k - 1
// below 2^31 (the int32 counts).
struct ActAttributes {
  int bits = 1;
  float scale = 0.0f;
};
ActAttributes ReadActAttributes(const OrtApi* api, const OrtKernelInfo* info, int64_t reduction,
                                const std::string& where);

std::shared_ptr<const MatMul> MakeMatMul(const BinaryMatMulKernel& k, const ActAttributes& act);
// Y [m, N] from X [m, K] (rows of the node's input).
void Run(const MatMul& op, OrtKernelContext* context, const float* x, int64_t rows, float* y);

std::shared_ptr<const Conv> MakeConv(const BinaryConvKernel& k, const ActAttributes& act);
// Y [n, M, oh, ow] from X [n, C, h, w].
void Run(const Conv& op, OrtKernelContext* context, const float* x, int64_t n, int64_t h, int64_t w, int64_t oh,
         int64_t ow, float* y);

}  // namespace kbit
}  // namespace binary
}  // namespace onnxopt
