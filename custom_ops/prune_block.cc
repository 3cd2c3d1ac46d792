// The blocked formats of SparseGemm / SparseConv (prune_block.h): detecting the block shape of a CSR, packing
// it, and the portable kernels.
#include "prune_block.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "kernel_util.h"

namespace onnxopt {
namespace prune {

namespace {

constexpr int64_t kGroupOverhead = 16;  // work of a row group beyond its blocks' multiply-adds (as prune.cc)

struct Blocking {
  int64_t blocks = 0;  // blocks holding any stored entry
  int64_t slots = 0;   // their entries, the real rows of each group only
};

// Distinct aligned (r, c) blocks of the stored entries, counted group by group with one mark per column block.
Blocking CountBlocks(const Csr& csr, int64_t r, int64_t c) {
  Blocking b;
  const int64_t ncb = (csr.cols + c - 1) / c;
  std::vector<int64_t> mark(static_cast<size_t>(ncb), -1);
  for (int64_t g = 0; g * r < csr.rows; ++g) {
    const int64_t r1 = std::min(csr.rows, (g + 1) * r);
    int64_t here = 0;
    for (int64_t row = g * r; row < r1; ++row) {
      for (int64_t j = csr.row_ptr[row]; j < csr.row_ptr[row + 1]; ++j) {
        const int64_t bc = csr.indices[j] / c;
        if (mark[bc] != g) mark[bc] = g, ++here;
      }
    }
    b.blocks += here;
    b.slots += here * (r1 - g * r) * c;
  }
  return b;
}

}  // namespace

BlockShape ChooseBlockShape(const Csr& csr, bool allow_input_blocks, const std::string& where) {
  BlockShape best;  // CSR
  if (const char* env = std::getenv("ONNXOPT_SPARSE_FORMAT"); env != nullptr && env[0] != '\0') {
    const std::string mode(env);
    if (mode == "csr") return best;
    if (mode != "auto") Fail(where, "ONNXOPT_SPARSE_FORMAT must be csr or auto, got '" + mode + "'");
  }
  const int64_t nnz = static_cast<int64_t>(csr.values.size());
  if (nnz == 0) return best;
  // Bytes streamed: 4 per value plus a 16-bit index (the common case; 32-bit ones scale both sides alike).
  double best_bytes = 6.0 * static_cast<double>(nnz);
  const int64_t shapes[3][2] = {{8, 1}, {4, 1}, {1, 4}};
  for (const auto& s : shapes) {
    if (s[1] > 1 && (!allow_input_blocks || csr.cols % s[1] != 0)) continue;
    const Blocking b = CountBlocks(csr, s[0], s[1]);
    const double fill = static_cast<double>(nnz) / static_cast<double>(b.slots);
    const double bytes = static_cast<double>(b.blocks) * (4.0 * static_cast<double>(s[0] * s[1]) + 2.0);
    if (fill >= kMinFill && bytes < best_bytes) best = {s[0], s[1], fill}, best_bytes = bytes;
  }
  return best;
}

template <typename Index>
Blocked<Index> PackBlocked(const Csr& csr, BlockShape shape, int64_t pad, int64_t block_cols) {
  Blocked<Index> p;
  const int64_t R = shape.r, C = shape.c, groups = (csr.rows + R - 1) / R, ncb = (csr.cols + C - 1) / C;
  block_cols = std::max<int64_t>(C, std::min(block_cols, csr.cols) / C * C);
  p.r = R, p.c = C, p.rows = groups, p.blocks = (csr.cols + block_cols - 1) / block_cols;
  // Each group's distinct column blocks, ascending (flat: group g's are [start[g], start[g + 1])).
  std::vector<int64_t> mark(static_cast<size_t>(ncb), -1), start(static_cast<size_t>(groups + 1), 0);
  std::vector<int64_t> list;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t row = g * R; row < std::min(csr.rows, (g + 1) * R); ++row) {
      for (int64_t j = csr.row_ptr[row]; j < csr.row_ptr[row + 1]; ++j) {
        const int64_t bc = csr.indices[j] / C;
        if (mark[bc] != g) mark[bc] = g, list.push_back(bc);
      }
    }
    std::sort(list.begin() + start[g], list.end());
    start[g + 1] = static_cast<int64_t>(list.size());
  }
  const int64_t segments = p.blocks * groups;
  std::vector<int64_t> count(static_cast<size_t>(segments), 0);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = start[g]; i < start[g + 1]; ++i) ++count[list[i] * C / block_cols * groups + g];
  }
  p.ptr.assign(static_cast<size_t>(segments + 1), 0);
  for (int64_t s = 0; s < segments; ++s) p.ptr[s + 1] = p.ptr[s] + (count[s] + pad - 1) / pad * pad;
  p.cost.assign(static_cast<size_t>(groups + 1), 0);
  for (int64_t g = 0; g < groups; ++g) {
    int64_t work = 0;
    for (int64_t b = 0; b < p.blocks; ++b) {
      work += (p.ptr[b * groups + g + 1] - p.ptr[b * groups + g]) * R * C + kGroupOverhead;
    }
    p.cost[g + 1] = p.cost[g] + work;
  }
  // Padding and missing entries: weight 0 (padding blocks at column 0: a valid read that adds nothing).
  p.values.assign(static_cast<size_t>(p.ptr.back() * R * C), 0.0f);
  p.idx.assign(static_cast<size_t>(p.ptr.back()), Index{0});
  std::vector<int64_t> at(p.ptr.begin(), p.ptr.end() - 1), slot(static_cast<size_t>(ncb), 0);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = start[g]; i < start[g + 1]; ++i) {
      const int64_t bc = list[i], d = at[bc * C / block_cols * groups + g]++;
      p.idx[d] = static_cast<Index>(bc * C);
      slot[bc] = d;
    }
    for (int64_t row = g * R; row < std::min(csr.rows, (g + 1) * R); ++row) {
      for (int64_t j = csr.row_ptr[row]; j < csr.row_ptr[row + 1]; ++j) {
        const int64_t col = csr.indices[j];
        p.values[(slot[col / C] * C + col % C) * R + row - g * R] = csr.values[j];
      }
    }
  }
  return p;
}

template Blocked<uint16_t> PackBlocked<uint16_t>(const Csr&, BlockShape, int64_t, int64_t);
template Blocked<int32_t> PackBlocked<int32_t>(const Csr&, BlockShape, int64_t, int64_t);

namespace {

template <typename Index, int R, int C>
void GatherPortable(const Blocked<Index>& p, const float* bias, int64_t n_rows, int64_t g0, int64_t g1,
                    const float* x, int64_t x_stride, int rows, float* y, int64_t y_stride) {
  for (int b = 0; b < rows; ++b) {
    const float* xb = x + b * x_stride;
    for (int64_t g = g0; g < g1; ++g) {
      float acc[R] = {};
      for (int64_t j = p.ptr[g]; j < p.ptr[g + 1]; ++j) {
        const float* w = p.values.data() + j * R * C;
        const float* xc = xb + p.idx[j];
        for (int c = 0; c < C; ++c) {
          for (int i = 0; i < R; ++i) acc[i] += w[c * R + i] * xc[c];
        }
      }
      for (int i = 0; i < R && g * R + i < n_rows; ++i) y[b * y_stride + g * R + i] = bias[g * R + i] + acc[i];
    }
  }
}

template <typename Index, int R, int T>
void TilePortable(const float* v, const Index* idx, int64_t count, const float* bias, bool accumulate,
                  const float* x, int64_t x_stride, int live, float* out, int64_t o_stride) {
  float acc[R][T] = {};
  for (int64_t j = 0; j < count; ++j) {
    const float* __restrict xr = x + static_cast<int64_t>(idx[j]) * x_stride;
    const float* w = v + j * R;
    for (int i = 0; i < R; ++i) {
      for (int l = 0; l < T; ++l) acc[i][l] += w[i] * xr[l];
    }
  }
  for (int i = 0; i < live; ++i) {
    float* o = out + i * o_stride;
    for (int l = 0; l < T; ++l) o[l] = (accumulate ? o[l] : bias[i]) + acc[i][l];
  }
}

}  // namespace

const BlockKernels& PortableBlockKernels() {
  static const BlockKernels k = {
      {GatherPortable<uint16_t, 8, 1>, GatherPortable<uint16_t, 4, 1>, GatherPortable<uint16_t, 1, 4>},
      {GatherPortable<int32_t, 8, 1>, GatherPortable<int32_t, 4, 1>, GatherPortable<int32_t, 1, 4>},
      {TilePortable<uint16_t, 8, 8>, TilePortable<uint16_t, 4, 16>},
      {TilePortable<int32_t, 8, 8>, TilePortable<int32_t, 4, 16>},
      TilePortable<int32_t, 4, 8>,
  };
  return k;
}

const BlockKernels& ChooseBlockKernels() { return HasAvx2Fma() ? Avx2BlockKernels() : PortableBlockKernels(); }

}  // namespace prune
}  // namespace onnxopt
