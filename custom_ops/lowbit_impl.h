// The LowBitMatMul loops written once in plain C++ and compiled twice: lowbit.cc (portable) and
// lowbit_avx2.cc (-mavx2 -mfma, where the compiler vectorizes them). Included inside a namespace of each.
#pragma once

#include <algorithm>
#include <cmath>

#include "lowbit.h"

namespace onnxopt {
namespace lowbit {
namespace LOWBIT_IMPL {

// Any bit width: per chunk, unpack to bytes, then a float dot product with x.
inline void GemvGeneric(const Weights& w, const float* x, const float* sumx, int64_t n0, int64_t n1, int64_t g0,
                        int64_t g1, float* y) {
  const int64_t per_group = w.group / kChunk;
  uint8_t q[kChunk];
  for (int64_t n = n0; n < n1; ++n) {
    float total = 0.0f;
    for (int64_t g = g0; g < g1; ++g) {
      float acc[kChunk] = {};
      for (int64_t c = 0; c < per_group; ++c) {
        const int64_t ch = g * per_group + c;
        UnpackChunk(w.Chunk(n, ch), w.bits, q);
        const float* xc = x + ch * kChunk;
        for (int j = 0; j < kChunk; ++j) acc[j] += static_cast<float>(q[j]) * xc[j];
      }
      float s = 0.0f;
      for (int j = 0; j < kChunk; ++j) s += acc[j];
      const int64_t at = w.ScaleIndex(n, g);
      total += w.scale[at] * s - w.scale_zero[at] * sumx[g];
    }
    y[n] = g0 == 0 ? total : y[n] + total;
  }
}

// act_bits = 8: per chunk, unpack to bytes, then an integer dot product with xq, exact in int32 per group.
inline void GemvI8(const Weights& w, const int8_t* xq, const float* sumxq, int64_t n0, int64_t n1, int64_t g0,
                   int64_t g1, float* y) {
  const int64_t per_group = w.group / kChunk;
  uint8_t q[kChunk];
  for (int64_t n = n0; n < n1; ++n) {
    float total = 0.0f;
    for (int64_t g = g0; g < g1; ++g) {
      int32_t dot = 0;
      for (int64_t c = 0; c < per_group; ++c) {
        const int64_t ch = g * per_group + c;
        UnpackChunk(w.Chunk(n, ch), w.bits, q);
        const int8_t* xc = xq + ch * kChunk;
        for (int j = 0; j < kChunk; ++j) dot += int32_t{q[j]} * int32_t{xc[j]};
      }
      const int64_t at = w.ScaleIndex(n, g);
      total += w.scale[at] * static_cast<float>(dot) - w.scale_zero[at] * sumxq[g];
    }
    y[n] = g0 == 0 ? total : y[n] + total;
  }
}

inline bool Quantize(const Weights& w, const float* x, int8_t* xq, float* sums, float* scale) {
  float a = 0.0f;
  for (int64_t k = 0; k < w.k; ++k) {
    if (!std::isfinite(x[k])) return false;
    a = std::max(a, std::fabs(x[k]));
  }
  const float inv = a > 0.0f ? 127.0f / a : 0.0f;
  for (int64_t k = 0; k < w.kp; ++k) {
    xq[k] = static_cast<int8_t>(std::clamp(std::nearbyint(x[k] * inv), -127.0f, 127.0f));
  }
  for (int64_t g = 0; g < w.groups; ++g) {
    int32_t s = 0;
    for (int64_t j = 0; j < w.group; ++j) s += xq[g * w.group + j];
    sums[g] = static_cast<float>(s);
  }
  *scale = a > 0.0f ? a / 127.0f : 1.0f;
  return true;
}

inline void Dequant(const Weights& w, int64_t n0, int64_t cols, float* tile) {
  const int64_t chunks = w.kp / kChunk, per_group = w.group / kChunk;
  uint8_t q[kChunk];
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t n = n0 + c;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      UnpackChunk(w.Chunk(n, ch), w.bits, q);
      const int64_t at = w.ScaleIndex(n, ch / per_group);
      const float s = w.scale[at], sz = w.scale_zero[at];
      float* t = tile + c * w.kp + ch * kChunk;
      for (int j = 0; j < kChunk; ++j) t[j] = s * static_cast<float>(q[j]) - sz;
    }
  }
}

inline void Tile(const float* x, int64_t ldx, int64_t rows, const float* tile, int64_t kp, float* y, int64_t ldy,
                 int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    for (int64_t c = 0; c < cols; ++c) {
      const float* t = tile + c * kp;
      float acc[8] = {};
      for (int64_t k = 0; k < kp; k += 8) {
        for (int j = 0; j < 8; ++j) acc[j] += xr[k + j] * t[k + j];
      }
      float s = 0.0f;
      for (int j = 0; j < 8; ++j) s += acc[j];
      y[r * ldy + c] = s;
    }
  }
}

inline void ConvTile(const float* panel, int64_t ldp, const float* col, int64_t ldc, int64_t k0, int64_t k1,
                     int64_t p0, int64_t p1, int64_t filters, const float* init, bool first, float* y, int64_t ldy) {
  for (int64_t f = 0; f < filters; ++f) {
    float* yf = y + f * ldy;
    if (first) {
      for (int64_t p = p0; p < p1; ++p) yf[p] = init ? init[f] : 0.0f;
    }
    for (int64_t k = k0; k < k1; ++k) {
      const float w = panel[f * ldp + k];
      const float* c = col + k * ldc;
      for (int64_t p = p0; p < p1; ++p) yf[p] += w * c[p];
    }
  }
}

}  // namespace LOWBIT_IMPL
}  // namespace lowbit
}  // namespace onnxopt
