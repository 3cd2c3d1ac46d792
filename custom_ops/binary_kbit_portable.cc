// The portable build of the k-bit loops (binary_kbit.h): plain C++, __builtin_popcountll.
#include <cmath>
#include <cstring>

#include "binary.h"
#include "binary_kbit.h"

namespace onnxopt {
namespace binary {
namespace kbit {
namespace {

// The code of one value: (x - t) r clamped to [0, levels] (a NaN to 0), rounded half to even (nearbyint in the
// default rounding mode), as the reference's float32 steps.
inline uint32_t Code(float x, float t, float r, float levels) {
  float v = (x - t) * r;
  v = v > 0.0f ? v : 0.0f;
  v = v < levels ? v : levels;
  return static_cast<uint32_t>(std::nearbyint(v));
}

int64_t PackMatRow(const float* x, const float* t, int64_t K, float r, int bits, int64_t words, uint64_t* out) {
  std::memset(out, 0, static_cast<size_t>(bits * words) * sizeof(uint64_t));
  const float levels = static_cast<float>((1 << bits) - 1);
  int64_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    const uint32_t u = Code(x[k], t[k], r, levels);
    sum += u;
    for (int i = 0; i < bits; ++i) out[i * words + k / kWord] |= uint64_t{(u >> i) & 1u} << (k % kWord);
  }
  return sum;
}

void PlaneCount(const uint64_t* bits, int64_t words, const uint64_t* a, int planes, int64_t n0, int64_t n1,
                int32_t* counts) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* b = bits + n * words;
    int64_t c = 0;
    for (int i = planes - 1; i >= 0; --i) {  // Horner: double, then add the lower plane
      int64_t ci = 0;
      for (int64_t w = 0; w < words; ++w) ci += __builtin_popcountll(a[i * words + w] & b[w]);
      c = 2 * c + ci;
    }
    counts[n - n0] = static_cast<int32_t>(c);
  }
}

void PackConvRow(const float* image, const float* t, int64_t C, int64_t H, int64_t W, int64_t iy, float r, int bits,
                 int64_t cw, int64_t plane, uint64_t* out, int32_t* code_sum) {
  for (int64_t w = 0; w < bits * cw; ++w) std::memset(out + w * plane, 0, static_cast<size_t>(W) * sizeof(uint64_t));
  for (int64_t ix = 0; ix < W; ++ix) code_sum[ix] = 0;
  const float levels = static_cast<float>((1 << bits) - 1);
  for (int64_t c = 0; c < C; ++c) {
    const float* row = image + (c * H + iy) * W;
    for (int64_t ix = 0; ix < W; ++ix) {
      const uint32_t u = Code(row[ix], t[c], r, levels);
      code_sum[ix] += static_cast<int32_t>(u);
      for (int i = 0; i < bits; ++i) {
        out[(i * cw + c / kWord) * plane + ix] |= uint64_t{(u >> i) & 1u} << (c % kWord);
      }
    }
  }
}

void ConvRow(const ConvPlan& p, const uint64_t* x, int64_t oy, int32_t* counts) {
  const int64_t span = p.taps * p.cw;
  for (int64_t ox = 0; ox < p.ow; ++ox) {
    const uint64_t* px = x + oy * p.row_step + ox * p.pixel_step;
    for (int64_t g = 0; g < p.groups; ++g) {
      const uint64_t* wg = p.wgroups + g * span * kGroup;
      int64_t c[kGroup] = {};
      for (int i = p.bits - 1; i >= 0; --i) {
        const uint64_t* xi = px + i * p.bit_stride;
        for (int f = 0; f < kGroup; ++f) c[f] *= 2;
        for (int64_t j = 0; j < span; ++j) {
          const uint64_t v = xi[p.offsets[j]];
          for (int f = 0; f < kGroup; ++f) c[f] += __builtin_popcountll(v & wg[j * kGroup + f]);
        }
      }
      for (int f = 0; f < kGroup; ++f) counts[(g * kGroup + f) * p.ow + ox] = static_cast<int32_t>(c[f]);
    }
  }
}

void ScaleRow(const int32_t* c, const float* u, int64_t n, float sp, float sq, float bias, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = sp * static_cast<float>(c[i]) + (sq * u[i] + bias);
}

}  // namespace

const Kernels& PortableKernels() {
  static const Kernels k{PackMatRow, PlaneCount, PackConvRow, ConvRow, ScaleRow};
  return k;
}

#if !(defined(__x86_64__) || defined(__i386__))
const Kernels& Avx2Kernels() { return PortableKernels(); }  // never chosen: HasAvx2Fma() is false
const Kernels& Avx512Kernels() { return PortableKernels(); }
#endif

}  // namespace kbit
}  // namespace binary
}  // namespace onnxopt
