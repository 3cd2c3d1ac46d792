// SparseGemm and SparseConv: layers pruned by the `prune` method, run over their kept weights only.
//
// Semantics (numpy reference and spec: onnxopt/reference/prune.py). A pruned weight arrives as CSR, one row
// per output (column n of a Gemm weight W [K, N]; filter m of a Conv weight [M, C, kh, kw] flattened to
// C kh kw columns): values float32 [nnz], indices int32 [nnz], row_ptr int64 [R + 1], all constant.
//   SparseGemm:  Y[..., n] = sum_{j in row n} values[j] X[..., indices[j]] + bias[n]
//   SparseConv:  Y = Conv(X, W, bias) (ONNX Conv, NCHW, group 1) with W the dense weight of the CSR.
//
// Both reduce to one primitive, a sparse row times a dense panel:
//     out[p] = bias + sum_{j in row} v[j] * x[idx[j] * stride + p],      p in [0, T)
// computed for a tile of T = 8, 16 or 32 positions held in registers, the nonzeros streamed once per tile.
//   - SparseGemm, batch of 5 or more rows: x is a tile of T input rows transposed to [K][T] (stride T), so each
//     nonzero costs one broadcast and T/8 vector FMAs over the batch rows; the weights are cut into blocks of
//     128 columns (the block's 16 KiB of the tile stay in L1), added block after block, and stored transposed.
//   - SparseGemm, 1 to 4 rows: a gather kernel, 8 nonzeros per register (vgatherdps from x, which stays in
//     L1), several rows sharing each index load; the weights are streamed once, with 16-bit column indices
//     when K <= 65536 (6 bytes per nonzero instead of 8: batch-1 FC is bound by reading them from DRAM).
//   - SparseConv (prune_conv.cc): positions are output pixels. The input is copied once per call into
//     stride-phase planes, zero-padded (the polyphase split there), so that every nonzero (c, dy, dx) becomes
//     ONE fixed offset into that buffer and a tile of consecutive outputs reads consecutive floats: no bounds
//     test and no im2col in the inner loop. 1x1 stride-1 unpadded convs read X in place (XNNPACK-style sparse
//     weight times dense activation).
// Block-pruned weights (aligned R x C blocks: prune.pattern=4x1, 8x1, 4x4, 1x4) are detected from the CSR at
// kernel creation and run by blocked kernels instead (prune_block.h: one index and one input load per block).
// The CSR is checked and packed once at kernel creation (SparseGemm's column-blocked copy for batches at the
// first call that has one); work is split into tasks over output rows balanced by nonzero count, or for
// SparseConv over output positions first (RunTasks: the session's thread pool).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

namespace onnxopt {
namespace prune {

// A checked CSR matrix (rows x cols) as read from the node's constant inputs.
struct Csr {
  int64_t rows = 0, cols = 0;
  std::vector<float> values;
  std::vector<int32_t> indices;
  std::vector<int64_t> row_ptr;  // rows + 1
};

// Reads inputs 1..3 (values, indices, row_ptr) as constants and checks them against `cols` columns: types,
// ranks, lengths, row_ptr[0] = 0, non-decreasing, row_ptr[rows] = nnz, indices in [0, cols) and strictly
// increasing within a row. Every failure names the node (where) and the offending entry.
Csr ReadCsr(const Ort::ConstKernelInfo& info, int64_t cols, const std::string& where);

// The optional constant bias (input 4) of `rows` values, named `dim`; zeros when absent.
std::vector<float> ReadBias(const Ort::ConstKernelInfo& info, size_t present, int64_t rows, const char* dim,
                            const std::string& where);

// At run time: the constant inputs still have the lengths they had at creation.
void CheckCsrShapes(const std::vector<int64_t>& values, const std::vector<int64_t>& indices,
                    const std::vector<int64_t>& row_ptr, const std::vector<int64_t>* bias, int64_t rows,
                    int64_t nnz, const std::string& where);

// A CSR matrix packed for the kernels, cut into `blocks` column blocks of block_cols columns (the last may be
// shorter), stored block after block: the segment of row r in block b is [ptr[b rows + r], ptr[b rows + r + 1]).
// Column blocks keep what a tile reads of its input within L1 (SparseConv with many channels). When `pad` > 1
// every segment is padded with zero weights (index 0) to a multiple of `pad`, so the gather kernel needs no tail.
template <typename Index>
struct Packed {
  int64_t rows = 0, blocks = 1;
  std::vector<float> values;
  std::vector<Index> idx;
  std::vector<int64_t> ptr;   // blocks rows + 1
  std::vector<int64_t> cost;  // rows + 1: cost[r] = work before row r (nonzeros plus a per-segment overhead)
};

template <typename Index>
Packed<Index> Pack(const Csr& csr, int64_t pad, int64_t block_cols);

// [begin, end) of row part `part` of `parts` of the rows.size() - 1 rows whose work before row r is cost[r].
std::pair<int64_t, int64_t> PartByCost(const std::vector<int64_t>& cost, int64_t part, int64_t parts);
// The same over a packing's rows (Packed, or prune_block.h's Blocked: row groups).
template <typename P>
std::pair<int64_t, int64_t> Part(const P& p, int64_t part, int64_t parts) {
  return PartByCost(p.cost, part, parts);
}

// out[0..T) = (accumulate ? out[0..T) : bias) + sum_{j < count} v[j] * x[idx[j] * stride + 0..T), T = 8 << i
// for entry i of a table (8, 16, 32); stride = T in the Gemm tables (rows of a transposed tile), 1 in the
// Conv table (offsets). accumulate: a later column block adds to the sums of the earlier ones.
using TileFn16 = void (*)(const float* v, const uint16_t* idx, int64_t count, float bias, bool accumulate,
                          const float* x, float* out);
using TileFn32 = void (*)(const float* v, const int32_t* idx, int64_t count, float bias, bool accumulate,
                          const float* x, float* out);
// y[r * y_stride + n] = bias[n] + sum_{j in row n} v[j] * x[r * x_stride + idx[j]] for rows r < R (1..4)
// and n in [n0, n1); rows padded to multiples of 8.
using GatherFn16 = void (*)(const Packed<uint16_t>& p, const float* bias, int64_t n0, int64_t n1, const float* x,
                            int64_t x_stride, int rows, float* y, int64_t y_stride);
using GatherFn32 = void (*)(const Packed<int32_t>& p, const float* bias, int64_t n0, int64_t n1, const float* x,
                            int64_t x_stride, int rows, float* y, int64_t y_stride);

struct Kernels {
  TileFn16 tile16[3];  // Gemm, 16-bit column indices: T = 8, 16, 32, stride T
  TileFn32 tile32[3];  // Gemm, 32-bit column indices
  TileFn32 offset[3];  // Conv: idx are offsets (stride 1)
  GatherFn16 gather16;
  GatherFn32 gather32;
};
const Kernels& PortableKernels();
const Kernels& Avx2Kernels();  // prune_avx2.cc; only for CPUs with AVX2 and FMA
const Kernels& ChooseKernels();  // by HasAvx2Fma()

constexpr int64_t kMaxTile = 32;

// Floats on 64-byte boundaries: the rows of a packed tile (32 floats) then never straddle two cache lines,
// which costs a load twice. Throws std::bad_alloc when out of memory.
struct FreeAligned {
  void operator()(float* p) const { std::free(p); }
};
using AlignedFloats = std::unique_ptr<float[], FreeAligned>;
inline AlignedFloats AllocateAligned(int64_t count) {
  const size_t bytes = (static_cast<size_t>(count) * sizeof(float) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes > 0 ? bytes : 64);
  if (p == nullptr) throw std::bad_alloc();
  return AlignedFloats(static_cast<float*>(p));
}
// Columns per block of SparseGemm's tile packing: a block's rows of a transposed tile of 32 (16 KiB) stay in L1.
constexpr int64_t kTileBlockCols = 128;

// The blocked formats (prune_block.h).
template <typename Index>
struct Blocked;
struct BlockKernels;

}  // namespace prune

struct SparseGemmKernel {
  SparseGemmKernel(const OrtApi* api, const OrtKernelInfo* info);
  size_t PresentInputs() const { return present_inputs_; }
  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& values, const Ort::Custom::Tensor<int32_t>& indices,
                      const Ort::Custom::Tensor<int64_t>& row_ptr,
                      std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& Y);

  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
           std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& Y) const;
  std::string Where() const;

  std::string node_name_;
  size_t present_inputs_ = 0;
  // The column-blocked packing of the tile groups (5 or more X rows), made from the gather packing at the
  // first call that has such rows and kept (a batch-1 session never pays its memory): CSR, or R x 1 blocks.
  template <typename Index>
  std::shared_ptr<const prune::Packed<Index>> Tiled(std::shared_ptr<const prune::Packed<Index>>& slot) const;
  template <typename Index>
  std::shared_ptr<const prune::Blocked<Index>> TiledBlocked(
      std::shared_ptr<const prune::Blocked<Index>>& slot) const;
  prune::Csr Nonzeros() const;  // the stored nonzeros again, from the gather packing
  bool BlockedFormat() const { return block_r_ * block_c_ > 1; }

  int64_t k_ = 0, n_ = 0, nnz_ = 0;
  bool narrow_ = false;  // 16-bit indices (K <= 65536)
  prune::Packed<uint16_t> p16_;  // the gather packing: one block, rows padded to multiples of 8
  prune::Packed<int32_t> p32_;
  mutable std::mutex tiled_mu_;
  mutable std::shared_ptr<const prune::Packed<uint16_t>> t16_;
  mutable std::shared_ptr<const prune::Packed<int32_t>> t32_;
  std::vector<float> bias_;
  const prune::Kernels* kernels_ = nullptr;
  // The blocked format, when ChooseBlockShape finds one (then p16_ / p32_ stay empty): R x C blocks, the
  // gather packing (one column block, segments of an even number of blocks), for tiles the column-blocked
  // R x 1 packing (1 x C: the CSR tiles above), the bias padded to a multiple of R.
  int64_t block_r_ = 1, block_c_ = 1;
  std::shared_ptr<const prune::Blocked<uint16_t>> b16_;
  std::shared_ptr<const prune::Blocked<int32_t>> b32_;
  mutable std::shared_ptr<const prune::Blocked<uint16_t>> tb16_;
  mutable std::shared_ptr<const prune::Blocked<int32_t>> tb32_;
  std::vector<float> bias_blocked_;
  const prune::BlockKernels* block_kernels_ = nullptr;
};

struct SparseConvKernel {
  SparseConvKernel(const OrtApi* api, const OrtKernelInfo* info);
  size_t PresentInputs() const { return present_inputs_; }
  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& values, const Ort::Custom::Tensor<int32_t>& indices,
                      const Ort::Custom::Tensor<int64_t>& row_ptr,
                      std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& Y);

  void ReadAttributes(const OrtApi* api, const OrtKernelInfo* info, const std::string& where);
  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
           std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& Y) const;
  int64_t BlockChannels() const;  // input channels per column block
  // Per nonzero its offset plane_ * plane + qy_ * wq + qx_ into one image's input buffer, for planes of
  // `plane` floats and rows of wq: kept for the last input size seen (sessions rarely change it).
  std::shared_ptr<const std::vector<int32_t>> Offsets(int64_t plane, int64_t wq) const;
  std::string Where() const;

  std::string node_name_;
  size_t present_inputs_ = 0;
  int64_t nnz_ = 0;  // as read (for the run-time check of the constants' lengths)
  int64_t c_ = 0, m_ = 0, kh_ = 0, kw_ = 0, sh_ = 1, sw_ = 1, dh_ = 1, dw_ = 1;
  int64_t pads_[4] = {0, 0, 0, 0};  // top, left, bottom, right
  prune::Packed<int32_t> packed_;  // idx: the column (c kh + dy) kw + dx
  std::vector<int32_t> plane_, qy_, qx_;  // per nonzero (packed order): its phase plane and shift
  mutable std::mutex offsets_mu_;
  mutable std::shared_ptr<const std::vector<int32_t>> offsets_;
  mutable int64_t offsets_key_[2] = {-1, -1};
  std::vector<float> bias_;
  const prune::Kernels* kernels_ = nullptr;
  // R x 1 blocks of output channels when ChooseBlockShape finds them (then packed_ stays empty and plane_,
  // qy_, qx_ are per block); the bias padded to a multiple of R.
  std::shared_ptr<const prune::Blocked<int32_t>> blocked_;
  std::vector<float> bias_blocked_;
  const prune::BlockKernels* block_kernels_ = nullptr;
};

}  // namespace onnxopt
