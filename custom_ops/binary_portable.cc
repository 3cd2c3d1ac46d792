// The portable build of the binary kernels' loops (binary.h): plain C++, __builtin_popcountll.
#include <cmath>
#include <cstring>

#include "binary.h"
#include "kernel_util.h"

namespace onnxopt {
namespace binary {
namespace {

void Partial(const uint64_t* bits, int64_t words, const float* x, int64_t ldx, int rows, int64_t n0, int64_t n1,
             float* s1, int64_t lds) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* b = bits + n * words;
    for (int r = 0; r < rows; ++r) {
      const float* xr = x + r * ldx;
      float sum = 0.0f;
      for (int64_t w = 0; w < words; ++w) {
        for (uint64_t v = b[w]; v != 0; v &= v - 1) sum += xr[w * kWord + __builtin_ctzll(v)];
      }
      s1[r * lds + n - n0] = sum;
    }
  }
}

void AndCount(const uint64_t* bits, int64_t words, const uint64_t* a, int64_t n0, int64_t n1, int32_t* counts) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* b = bits + n * words;
    int64_t c = 0;
    for (int64_t w = 0; w < words; ++w) c += __builtin_popcountll(a[w] & b[w]);
    counts[n - n0] = static_cast<int32_t>(c);
  }
}

void ConvRow(const ConvPlan& p, const uint64_t* x, int64_t oy, int32_t* counts) {
  const int64_t span = p.taps * p.cw;
  for (int64_t ox = 0; ox < p.ow; ++ox) {
    const uint64_t* px = x + oy * p.row_step + ox * p.pixel_step;
    for (int64_t g = 0; g < p.groups; ++g) {
      const uint64_t* wg = p.wgroups + g * span * kGroup;
      int64_t c[kGroup] = {};
      for (int64_t j = 0; j < span; ++j) {
        const uint64_t v = px[p.offsets[j]];
        for (int f = 0; f < kGroup; ++f) c[f] += __builtin_popcountll(v & wg[j * kGroup + f]);
      }
      for (int f = 0; f < kGroup; ++f) counts[(g * kGroup + f) * p.ow + ox] = static_cast<int32_t>(c[f]);
    }
  }
}

void PackRow(const float* image, const float* t, int64_t C, int64_t H, int64_t W, int64_t iy, int64_t cw,
             int64_t plane, uint64_t* out, float* abs_sum, int32_t* ones) {
  for (int64_t w = 0; w < cw; ++w) std::memset(out + w * plane, 0, static_cast<size_t>(W) * sizeof(uint64_t));
  for (int64_t ix = 0; ix < W; ++ix) abs_sum[ix] = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    const float* row = image + (c * H + iy) * W;
    const uint64_t bit = uint64_t{1} << (c % kWord);
    uint64_t* o = out + c / kWord * plane;
    for (int64_t ix = 0; ix < W; ++ix) {
      if (row[ix] >= t[c]) o[ix] |= bit;
      abs_sum[ix] += std::fabs(row[ix] - t[c]);
    }
  }
  for (int64_t ix = 0; ix < W; ++ix) {
    int64_t c = 0;
    for (int64_t w = 0; w < cw; ++w) c += __builtin_popcountll(out[w * plane + ix]);
    ones[ix] = static_cast<int32_t>(c);
  }
}

void ScaleRow(const int32_t* c, const float* kappa, const float* d0, int64_t n, float two_p, float q, float pb,
              float bias, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = kappa[i] * (two_p * static_cast<float>(c[i]) + q * d0[i] - pb) + bias;
}

}  // namespace

const Kernels& PortableKernels() {
  static const Kernels k{Partial, AndCount, ConvRow, PackRow, ScaleRow, ConvThenScale<ConvRow, ScaleRow>};
  return k;
}

#if !(defined(__x86_64__) || defined(__i386__))
const Kernels& Avx2Kernels() { return PortableKernels(); }  // never chosen: HasAvx2Fma() is false
const Kernels& Avx512Kernels() { return PortableKernels(); }
bool HasAvx512Popcount() { return false; }
#endif

const Kernels& ChooseKernels() {
  if (!HasAvx2Fma()) return PortableKernels();
  return HasAvx512Popcount() ? Avx512Kernels() : Avx2Kernels();
}

}  // namespace binary
}  // namespace onnxopt
