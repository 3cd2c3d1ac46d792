// LowBitMatMul: y = x W + b with W (K x N) stored as group-wise quantized 2-, 3- or 4-bit codes (the `lowbit`
// method; semantics and numpy reference in onnxopt/reference/lowbit.py).
//
// For output n and group g of G consecutive k:  W[k, n] = scale[n, g] (q[k, n] - zero[n, g]),  q < 2^bits.
// K is padded to Kp, a multiple of G (the padded codes meet zero inputs). Codes are stored per output column,
// in chunks of 32 consecutive k (G is a multiple of 32), laid out so that SIMD unpacking needs only and/shift:
//   bits 4: 16 bytes; byte j holds q[j] (low nibble) and q[j + 16] (high nibble);
//   bits 2: 8 bytes; byte j holds q[j + 8 i] in bits 2i, 2i + 1 (i = 0..3);
//   bits 3: the low two bits as a bits-2 chunk (8 bytes), then 4 bytes: bit j of that little-endian uint32
//           is bit 2 of q[j].
//
// Batch 1 (the case that must approach memory speed): per column and group the kernel accumulates
// sum_k q[k] x[k] in registers and applies the group's scale once; the zero points enter through the
// per-group input sums, y[n] = sum_g scale (sum_k q x) - sum_g (scale zero) sum_k x. Larger batches
// run the GEMMs of lowbit_gemm.h (codes read once per block of rows) on AVX2 / AVX-512; the portable build
// dequantizes 8 columns at a time into a float tile [8][Kp] and runs every input row over it.
//
// At kernel creation the codes are repacked so that batch 1 reads ONE sequential stream: columns in blocks of
// four (N padded to a multiple of 4 with zero columns), and within a block the chunks of its four columns
// interleaved, chunk by chunk: [N/4][Kp/32][4][chunk bytes]. (Four separate column streams of 2 KiB each left
// the hardware prefetcher behind and ran at half the memory bandwidth.) Wide layers are cut along K into slabs
// of 4096 inputs (x of a slab stays in L1), stored slab after slab, so that one batch-1 task (64 columns) still
// reads its codes of a slab as one contiguous run. Scales and zero points follow the same blocks of four columns
// (Weights::ScaleIndex). Codes of 4 MiB and more sit on 2 MiB pages (AllocateCodes).
//
// act_bits = 8 (bits 4): x is quantized per row to int8 and the dot products are integer: vpmaddubsw in the
// AVX2 build, vpdpbusd over a whole block (4 columns x 32 codes per 512-bit load) in the AVX-512 VNNI build
// (lowbit_avx512.cc), chosen at kernel creation where the CPU runs it (BestKernels).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace onnxopt {
namespace lowbit {

constexpr int64_t kChunk = 32;  // codes per packed chunk
constexpr int64_t kTile = 8;    // columns of a dequantized tile
constexpr int64_t kBlock = 4;   // columns interleaved in the packed codes

// Memory for the packed codes. Blocks of 4 MiB and up are 2 MiB-aligned and marked for transparent huge pages
// (madvise, Linux), before they are first touched: batch 1 streams the codes once per call, and with 4 KiB
// pages the streaming reads ran at ~22 GB/s on this machine against ~33 GB/s with 2 MiB pages (TLB misses,
// and hardware prefetchers that stop at every 4 KiB page; benchmarks/bandwidth.py). The rounding costs at most
// 2 MiB per node, and only nodes whose codes are at least 4 MiB.
void* AllocateCodes(size_t bytes);
void FreeCodes(void* p) noexcept;
template <typename T>
struct CodeAllocator {
  using value_type = T;
  CodeAllocator() = default;
  template <typename U>
  CodeAllocator(const CodeAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(AllocateCodes(n * sizeof(T))); }
  void deallocate(T* p, size_t) noexcept { FreeCodes(p); }
  template <typename U>
  bool operator==(const CodeAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CodeAllocator<U>&) const { return false; }
};

// The checked, packed weights of one node.
struct Weights {
  int64_t k = 0, kp = 0, n = 0, bits = 0, group = 0, groups = 0;
  int64_t col_bytes = 0;          // bytes of one column's codes: kp * bits / 8
  int64_t np = 0;                 // n rounded up to kBlock
  std::vector<uint8_t, CodeAllocator<uint8_t>> codes;  // [np / 4][kp / 32][4][4 bits]: see above
  // Per (column, group), in blocks of four columns like the codes, [np / 4][groups][4] (ScaleIndex), so that
  // a batch-1 block reads its scales as one sequential stream and one 16-byte load per group.
  std::vector<float> scale;       // padded columns: 0
  std::vector<float> scale_zero;  // scale * zero, so the zero term is one product per group
  std::vector<uint8_t> zero;      // the zero points themselves: the AVX-512 a8 loop reads 1 byte, not 4
  int64_t ScaleIndex(int64_t n, int64_t g) const { return ((n / kBlock) * groups + g) * kBlock + n % kBlock; }

  int64_t ChunkBytes() const { return 4 * bits; }
  int64_t slab_chunks = 0;  // chunks per K slab (a whole number of groups)
  // Offset in `codes` of the packed chunk ch of column n, and the chunk itself. Slab-major: slab s holds
  // chunks [s slab_chunks, ...) of every column, as [np / 4][chunks of the slab][4][chunk bytes].
  int64_t ChunkOffset(int64_t n, int64_t ch) const {
    const int64_t chunks = kp / kChunk, s = ch / slab_chunks, first = s * slab_chunks;
    const int64_t in_slab = std::min(slab_chunks, chunks - first);
    return np * first * ChunkBytes() + (((n / kBlock) * in_slab + ch - first) * kBlock + n % kBlock) * ChunkBytes();
  }
  const uint8_t* Chunk(int64_t n, int64_t ch) const { return codes.data() + ChunkOffset(n, ch); }
};

// Columns [n0, n1) of one input row over groups [g0, g1): y[n] (= if g0 == 0, else +=) sum_g scale (sum_k q x)
// - sum_g scale_zero sumx[g]; x padded to kp with zeros, sumx[g] the sum of x over group g. The caller cuts K
// into slabs of groups whose x fits in L1 (a 25088-wide x read once per 4 columns would stream from L2).
using GemvFn = void (*)(const Weights& w, const float* x, const float* sumx, int64_t n0, int64_t n1, int64_t g0,
                        int64_t g1, float* y);
// Dequantizes columns [n0, n0 + cols) (cols <= kTile) into tile[cols][kp].
using DequantFn = void (*)(const Weights& w, int64_t n0, int64_t cols, float* tile);
// y[r * ldy + c] = sum_k x[r * ldx + k] tile[c][k] for r < rows, c < cols (kp a multiple of 32).
using TileFn = void (*)(const float* x, int64_t ldx, int64_t rows, const float* tile, int64_t kp, float* y,
                        int64_t ldy, int64_t cols);

// LowBitConv: for the filters of a panel (dequantized weights, filter f's row at panel + f * ldp) and the
// pixels [p0, p1) of im2col rows col[k * ldc + p]: y[f * ldy + p] = (first ? init[f] : y[f * ldy + p])
// + sum_{k in [k0, k1)} panel[f * ldp + k] col[k * ldc + p], for f < filters (init null: 0).
using ConvTileFn = void (*)(const float* panel, int64_t ldp, const float* col, int64_t ldc, int64_t k0, int64_t k1,
                            int64_t p0, int64_t p1, int64_t filters, const float* init, bool first, float* y,
                            int64_t ldy);
constexpr int64_t kPanel = 8;  // filters per LowBitConv panel

// act_bits = 8 (bits 4 only): columns [n0, n1) of one row quantized to int8, xq (padded to kp with zeros), over
// groups [g0, g1): y[n] (= if g0 == 0, else +=) sum_g scale (sum_k q xq) - sum_g scale_zero sumxq[g], sumxq[g]
// the (integer-valued) sum of xq over group g. The row's scale multiplies y afterwards.
using GemvI8Fn = void (*)(const Weights& w, const int8_t* xq, const float* sumxq, int64_t n0, int64_t n1, int64_t g0,
                          int64_t g1, float* y);

// act_bits = 8: row x (kp floats, zero-padded) as int8 codes xq = round(x * 127 / max|x|) (ties to even, in
// float32 as onnxopt.reference.lowbit), their per-group sums, and the row's scale max|x| / 127 in *scale
// (all-zero row: codes 0, scale 1). Returns false (and leaves the outputs undefined) if x[0..k) holds a NaN or
// an infinity.
using QuantizeFn = bool (*)(const Weights& w, const float* x, int8_t* xq, float* sums, float* scale);

struct Kernels {
  GemvFn gemv4;    // bits 4
  GemvFn gemv;     // any bits (2 and 3 use it)
  GemvI8Fn gemv_i8;  // bits 4, int8 activations
  QuantizeFn quantize;  // act_bits = 8: the row before gemv_i8
  DequantFn dequant;
  TileFn tile;
  ConvTileFn conv_tile;
};

const Kernels& PortableKernels();
const Kernels& Avx2Kernels();
// The AVX-512 VNNI build (lowbit_avx512.cc): gemv_i8 and gemv4 on 512-bit vectors, the rest as Avx2Kernels.
// Chosen where HasAvx512(kAvx512Vnni) (kernel_util.h) says the CPU and OS run it.
const Kernels& Avx512Kernels();
// The best build this CPU runs: AVX-512 VNNI, else AVX2 + FMA, else portable (read at each kernel creation, so
// that ONNXOPT_DISABLE_AVX512 / ONNXOPT_DISABLE_AVX2 in the environment force the slower ones).
const Kernels& BestKernels();

// The 32 codes of one packed chunk (layout above) into q[0..32).
inline void UnpackChunk(const uint8_t* p, int64_t bits, uint8_t* q) {
  if (bits == 4) {
    for (int j = 0; j < 16; ++j) {
      q[j] = p[j] & 15;
      q[j + 16] = p[j] >> 4;
    }
    return;
  }
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 8; ++j) q[j + 8 * i] = (p[j] >> (2 * i)) & 3;
  }
  if (bits == 3) {
    const uint32_t hi = uint32_t{p[8]} | uint32_t{p[9]} << 8 | uint32_t{p[10]} << 16 | uint32_t{p[11]} << 24;
    for (int j = 0; j < 32; ++j) q[j] |= static_cast<uint8_t>(((hi >> j) & 1u) << 2);
  }
}

}  // namespace lowbit
}  // namespace onnxopt
