// AVX-512 builds of the batched LowBitMatMul loops (lowbit_gemm.h), chosen at kernel creation where the CPU and
// OS run AVX-512 F/BW/VL/VNNI (HasAvx512Vnni) and ONNXOPT_DISABLE_AVX512 is not set; the AVX2 and portable
// paths stay (tests run all three). Compiled for these instructions by the pragma below, not by the build's
// flags: only this file uses them.
//
// act_bits = 8: up to 8 rows x one block of 4 columns per micro-kernel. The block's chunk (4 columns x 16
// bytes, as packed) is one 512-bit load; an and and a shift split it into the codes k 0..15 (low nibbles) and
// 16..31 (high nibbles) of each column, one column per 128-bit lane. A row's 16 int8 inputs of each half are
// broadcast to the four lanes, and vpdpbusd (u8 codes x s8 inputs, four products per int32 lane) accumulates:
// 2 instructions per row for 4 x 32 weights. Per group the int32 lanes are converted and scaled with a vector
// holding each column's scale in its 4 lanes, and the zero-point term enters as scale_zero (in lane 0 of each
// column) times the row's group sum. Four lanes per column are summed once at the end.
//
// act_bits = 0: lowbit_gemm_f32.h with 32 vector registers (up to 6 row vectors x 4 columns).
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "lowbit_gemm.h"

#define LOWBIT_GEMM_IMPL avx512
constexpr int kMaxVecs = 6;  // 6 row vectors x 4 columns = 24 accumulators of 32 registers
#include "lowbit_gemm_f32.h"

namespace onnxopt {
namespace lowbit {
namespace {

constexpr int kI8Rows = 8;  // rows per act_bits = 8 micro-kernel

// Rows r0 .. r0 + kR - 1 of the block at n over all groups; sc16 / sz16 [groups][16]: the block's scales per
// lane (column c in lanes 4c .. 4c + 3) and scale_zero in lane 4c only. Writes only columns < n1.
template <int kR>
void I8Micro(const Weights& w, const RowsI8& x, const float* b, int64_t r0, int64_t n, int64_t n1,
             const float* sc16, const float* sz16, float* y, int64_t ldy) {
  const int64_t per_group = w.group / kChunk, slab_groups = w.slab_chunks / per_group;
  const __m512i mask = _mm512_set1_epi8(15);
  const int8_t* xr[kR];
  const float* sums[kR];
  __m512 acc[kR];
  for (int r = 0; r < kR; ++r) {
    xr[r] = x.xq + (r0 + r) * w.kp;
    sums[r] = x.sumxq + (r0 + r) * w.groups;
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t gs = 0; gs < w.groups; gs += slab_groups) {
    const int64_t ge = std::min(w.groups, gs + slab_groups);
    const uint8_t* p = w.Chunk(n, gs * per_group);
    for (int64_t g = gs; g < ge; ++g) {
      __m512i dot[kR];
      for (int r = 0; r < kR; ++r) dot[r] = _mm512_setzero_si512();
      for (int64_t j = 0; j < per_group; ++j, p += kBlock * 16) {
        const __m512i v = _mm512_loadu_si512(p);
        const __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
        const int64_t off = (g * per_group + j) * kChunk;
        for (int r = 0; r < kR; ++r) {
          const __m512i xlo = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xr[r] + off)));
          const __m512i xhi =
              _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xr[r] + off + 16)));
          dot[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[r], lo, xlo), hi, xhi);
        }
      }
      const __m512 s = _mm512_loadu_ps(sc16 + g * 16), sz = _mm512_loadu_ps(sz16 + g * 16);
      for (int r = 0; r < kR; ++r) {
        acc[r] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(dot[r]), acc[r]);
        acc[r] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(sums[r][g]), acc[r]);
      }
    }
  }
  for (int r = 0; r < kR; ++r) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc[r]);
    const float xs = x.xscale[r0 + r];
    for (int c = 0; c < kBlock && n + c < n1; ++c) {
      const float v = (lanes[4 * c] + lanes[4 * c + 1]) + (lanes[4 * c + 2] + lanes[4 * c + 3]);
      y[(r0 + r) * ldy + n + c] = xs * v + (b ? b[n + c] : 0.0f);
    }
  }
}

// Per block of 4 columns, every block of up to 8 rows: the block's codes (2 kp bytes) stay in L1 while the
// rows stream past.
void GemmI8(const Weights& w, const RowsI8& x, const float* b, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  thread_local std::vector<float> sc16, sz16;
  sc16.resize(static_cast<size_t>(w.groups * 16));
  sz16.resize(static_cast<size_t>(w.groups * 16));
  for (int64_t n = n0; n < n1; n += kBlock) {
    for (int64_t g = 0; g < w.groups; ++g) {
      for (int c = 0; c < kBlock; ++c) {
        const int64_t i = (n + c) * w.groups + g;
        for (int l = 0; l < 4; ++l) {
          sc16[g * 16 + 4 * c + l] = w.scale[i];
          sz16[g * 16 + 4 * c + l] = l == 0 ? w.scale_zero[i] : 0.0f;
        }
      }
    }
    int64_t r = 0;
    for (; r + kI8Rows <= x.rows; r += kI8Rows) {
      I8Micro<kI8Rows>(w, x, b, r, n, n1, sc16.data(), sz16.data(), y, ldy);
    }
    const float *sc = sc16.data(), *sz = sz16.data();
    switch (x.rows - r) {
      case 7: I8Micro<7>(w, x, b, r, n, n1, sc, sz, y, ldy); break;
      case 6: I8Micro<6>(w, x, b, r, n, n1, sc, sz, y, ldy); break;
      case 5: I8Micro<5>(w, x, b, r, n, n1, sc, sz, y, ldy); break;
      case 4: I8Micro<4>(w, x, b, r, n, n1, sc, sz, y, ldy); break;
      case 3: I8Micro<3>(w, x, b, r, n, n1, sc, sz, y, ldy); break;
      case 2: I8Micro<2>(w, x, b, r, n, n1, sc, sz, y, ldy); break;
      case 1: I8Micro<1>(w, x, b, r, n, n1, sc, sz, y, ldy); break;
      default: break;
    }
  }
}

}  // namespace

const BatchKernels& Avx512BatchKernels() {
  static const BatchKernels k{GemmI8, avx512::GemmF32, Avx2BatchKernels().quantize, avx512::kLanes};
  return k;
}

bool HasAvx512Vnni() {
  const char* off = std::getenv("ONNXOPT_DISABLE_AVX512");
  if (off != nullptr && off[0] != '\0' && std::string(off) != "0") return false;
  static const bool has = [] {
    __builtin_cpu_init();  // its checks include the OS's XCR0 state for the AVX-512 registers
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return has;
}

}  // namespace lowbit
}  // namespace onnxopt

#endif  // x86
