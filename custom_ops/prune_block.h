// Blocked (BSR) fast paths of SparseGemm and SparseConv, chosen at kernel creation from the CSR alone (the
// node interface is unchanged, so every existing model takes them where its weights allow).
//
// A block is R consecutive rows (outputs) by C consecutive columns (inputs), aligned: rows [g R, g R + R),
// columns [c0, c0 + C) with c0 a multiple of C. A CSR whose stored entries all lie in such blocks, with
// fill = stored entries / slots of the blocks that hold any (the last row group counts only its real rows)
// at least kMinFill, is packed block by block; the missing entries of a block are stored as explicit zeros.
// Shapes tried: (R, C) = (8, 1), (4, 1), (1, 4). What each saves over CSR:
//   R x 1 (output blocks, `prune.pattern=4x1`, `4x4`, and XNNPACK's sparse inference): one index and one
//     load or broadcast of the input feed R outputs; batch 1-4 FC needs no gather at all (one broadcast
//     x[c] times R weights), and the tile kernels (batched FC; SparseConv, 1x1 in place and kxk through its
//     per-block offsets) load each input row once for R rows.
//   1 x C (input blocks, `prune.pattern=1x4`): one index per C weights and one contiguous load of C inputs
//     instead of a gather (batch 1-4 FC only; the tile kernels keep CSR for it, where a block would be C
//     separate nonzeros anyway).
// The bytes streamed per stored weight fall from 4 + 2 (16-bit CSR index) to 4 + 2 / (R C), the reason the
// DRAM-bound batch-1 FC gains. Choice: among the shapes whose fill >= kMinFill, the one with the fewest bytes
// (values of all slots plus indices); none: CSR. kMinFill = 0.75 is where a block's slots (zeros included)
// stream as many bytes as CSR's nonzeros at R C = 4: below it blocks read more memory than they save.
// Measured (benchmarks/prune_blocked.py --fill, FC 4096 x 4096 4x1 at 90%, batch 1, 1 thread): CSR ms /
// blocked ms 1.46 at fill 1, 1.32 at 0.875, 1.20 at 0.75, 0.82 at 0.5, 0.69 at 0.375: the switch pays down
// to a fill of about 0.6 (no gathers), so 0.75 keeps a margin. Density itself does not enter: blocks pay at
// every density the CSR kernels run (70-95% measured), and the `prune` pass decides sparse against dense.
// ONNXOPT_SPARSE_FORMAT=csr (read at kernel creation) forces CSR, to compare the two; `auto` (the default)
// chooses as above.
//
// Layout: values per block R C floats, column-major inside the block ([C][R]: for each input column, its R
// outputs, so R x 1 blocks are one vector of R weights); idx the block's first column. Like prune::Packed
// the row groups are cut into column blocks for the tile kernels (a group's segment in column block b is
// [ptr[b groups + g], ptr[b groups + g + 1])) and segments are padded with zero blocks to a multiple of `pad`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "prune.h"

namespace onnxopt {
namespace prune {

constexpr double kMinFill = 0.75;

struct BlockShape {
  int64_t r = 1, c = 1;  // (1, 1): CSR
  double fill = 1.0;
  bool Blocked() const { return r * c > 1; }
};

// The shape the kernels run (see above); `allow_input_blocks` false: R x 1 only (SparseConv, whose tile
// kernels gain nothing from 1 x C).
// Honours ONNXOPT_SPARSE_FORMAT; fails naming `where` for any other value than csr or auto.
BlockShape ChooseBlockShape(const Csr& csr, bool allow_input_blocks, const std::string& where);

template <typename Index>
struct Blocked {
  int64_t r = 1, c = 1;
  int64_t rows = 0;     // row groups (ceil(csr.rows / r)); the name Part expects
  int64_t blocks = 1;   // column blocks
  std::vector<float> values;
  std::vector<Index> idx;
  std::vector<int64_t> ptr;   // blocks rows + 1, in blocks of r c values
  std::vector<int64_t> cost;  // rows + 1: work before group g
};

template <typename Index>
Blocked<Index> PackBlocked(const Csr& csr, BlockShape shape, int64_t pad, int64_t block_cols);

// y[b * y_stride + n] = bias[n] + sum over the blocks of groups [g0, g1) for batch rows b < rows (1..4);
// segments padded to an even number of blocks; bias padded to a multiple of r.
template <typename Index>
using BlockGatherFn = void (*)(const Blocked<Index>& p, const float* bias, int64_t n_rows, int64_t g0, int64_t g1,
                               const float* x, int64_t x_stride, int rows, float* y, int64_t y_stride);
// R x 1 blocks over a tile of T positions: out[i * o_stride + 0..T) for i < live (<= R) =
// (accumulate ? out : bias[i]) + sum_j v[j R + i] x[idx[j] x_stride + 0..T).
template <typename Index>
using BlockTileFn = void (*)(const float* v, const Index* idx, int64_t count, const float* bias, bool accumulate,
                             const float* x, int64_t x_stride, int live, float* out, int64_t o_stride);

struct BlockKernels {
  // Shapes 8x1, 4x1, 1x4 (GatherIndex of R), 16- and 32-bit indices.
  BlockGatherFn<uint16_t> gather16[3];
  BlockGatherFn<int32_t> gather32[3];
  // R x 1 tiles of T positions: [R = 8: T = 8, R = 4: T = 16]; every tile of the callers is a multiple of 8,
  // R = 4 at 8 positions: tile_r4_8.
  BlockTileFn<uint16_t> tile16[2];
  BlockTileFn<int32_t> tile32[2];
  BlockTileFn<int32_t> tile32_r4_8;
};
const BlockKernels& PortableBlockKernels();
const BlockKernels& Avx2BlockKernels();  // prune_block_avx2.cc
const BlockKernels& ChooseBlockKernels();
inline int GatherIndex(int64_t r) { return r == 8 ? 0 : r == 4 ? 1 : 2; }
// Positions per call of the R x 1 tile kernel.
inline int64_t BlockTileWidth(int64_t r) { return r == 8 ? 8 : 16; }

}  // namespace prune
}  // namespace onnxopt
