// SparseGemm kernel: Y = X W + B with W^T in CSR (see prune.h for the semantics and the kernels).
//
// The X rows of a call are taken in groups: groups of 5 and more rows are tiles of T = 8, 16 or 32 rows,
// transposed once per call into [K][T] (zero rows pad the last tile) so that the tile kernel does one vector
// FMA over the batch rows per nonzero. They run on a second packing of the weights cut into column blocks of
// kTileBlockCols (a block's rows of the tile, 16 KiB at T = 32, stay in L1 while every output row adds its
// nonzeros of that block; with the whole 512 KiB tile in L2 instead, batch 32 at 70% sparsity ran 1.4x
// slower), made from the gather packing the first time a call has such rows. A last group of 1 to 4 rows
// (batch 1, the case where a pruned FC has to beat a dense one streaming its weights from DRAM) goes to the
// gather kernel instead, which reads the weights once for all its rows. Each group's output rows n are split
// into parts of equal nonzero count; one task per (group, part), through the session's thread pool.
#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernel_util.h"
#include "ops.h"
#include "prune.h"
#include "prune_block.h"

namespace onnxopt {

namespace {

using Ort::Custom::Tensor;

constexpr int64_t kMinTaskWork = int64_t{1} << 15;  // multiply-adds below which a task is not worth a split
constexpr int64_t kMaxParts = 64;

struct Group {
  int64_t row0 = 0, rows = 0;  // X rows [row0, row0 + rows)
  int64_t tile = 0;            // T for a tile group, 0 for a gather group
  float* xt = nullptr;         // [K][T] transposed rows (tile groups)
};

struct GemmCall {
  const SparseGemmKernel* k = nullptr;
  const float* x = nullptr;
  float* y = nullptr;
  std::vector<Group> groups;
  int64_t parts = 1;
  std::shared_ptr<const prune::Packed<uint16_t>> t16;  // the column-blocked packing, when there are tile groups
  std::shared_ptr<const prune::Packed<int32_t>> t32;
  std::shared_ptr<const prune::Blocked<uint16_t>> tb16;  // the same in R x 1 blocks
  std::shared_ptr<const prune::Blocked<int32_t>> tb32;
  std::atomic<bool> failed{false};
};

template <typename Index>
void RunGather(const SparseGemmKernel& k, const prune::Packed<Index>& p, const GemmCall& call, const Group& g,
               int64_t n0, int64_t n1) {
  const float* x = call.x + g.row0 * k.k_;
  float* y = call.y + g.row0 * k.n_;
  if constexpr (sizeof(Index) == 2) {
    k.kernels_->gather16(p, k.bias_.data(), n0, n1, x, k.k_, static_cast<int>(g.rows), y, k.n_);
  } else {
    k.kernels_->gather32(p, k.bias_.data(), n0, n1, x, k.k_, static_cast<int>(g.rows), y, k.n_);
  }
}

// A tile group's rows [n0, n1): column block after column block (the block's rows of the transposed tile,
// kTileBlockCols x T floats, stay in L1), the sums gathered in `sums` [n1 - n0][T], then stored transposed.
template <typename Index>
void RunTile(const SparseGemmKernel& k, const prune::Packed<Index>& p, const GemmCall& call, const Group& g,
             int64_t n0, int64_t n1, float* sums) {
  const int log_t = g.tile == 8 ? 0 : g.tile == 16 ? 1 : 2;
  const int64_t T = g.tile, rows = p.rows;
  for (int64_t b = 0; b < p.blocks; ++b) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t j = p.ptr[b * rows + n], count = p.ptr[b * rows + n + 1] - j;
      float* out = sums + (n - n0) * T;
      if constexpr (sizeof(Index) == 2) {
        k.kernels_->tile16[log_t](p.values.data() + j, p.idx.data() + j, count, k.bias_[n], b > 0, g.xt, out);
      } else {
        k.kernels_->tile32[log_t](p.values.data() + j, p.idx.data() + j, count, k.bias_[n], b > 0, g.xt, out);
      }
    }
  }
  float* y = call.y + g.row0 * k.n_;
  for (int64_t l = 0; l < g.rows; ++l) {
    for (int64_t n = n0; n < n1; ++n) y[l * k.n_ + n] = sums[(n - n0) * T + l];
  }
}

template <typename Index>
void RunPart(const SparseGemmKernel& k, const prune::Packed<Index>& gather, const prune::Packed<Index>* tiled,
             const GemmCall& call, size_t task) {
  const Group& g = call.groups[task / call.parts];
  const int64_t part = static_cast<int64_t>(task) % call.parts;
  if (g.tile == 0) {
    const auto [n0, n1] = prune::Part(gather, part, call.parts);
    RunGather(k, gather, call, g, n0, n1);
  } else {
    const auto [n0, n1] = prune::Part(*tiled, part, call.parts);
    prune::AlignedFloats sums = prune::AllocateAligned((n1 - n0) * g.tile);
    RunTile(k, *tiled, call, g, n0, n1, sums.get());
  }
}

// A tile group's output groups [g0, g1) in R x 1 blocks: like RunTile, the tile kernel called on slices of
// BlockTileWidth(R) of the T rows; sums [(g1 - g0) R][T].
template <typename Index>
void RunTileBlocked(const SparseGemmKernel& k, const prune::Blocked<Index>& p, const GemmCall& call, const Group& g,
                    int64_t g0, int64_t g1, float* sums) {
  const int64_t T = g.tile, R = p.r, W = prune::BlockTileWidth(R), groups = p.rows;
  prune::BlockTileFn<Index> tile;
  if constexpr (sizeof(Index) == 2) {
    tile = k.block_kernels_->tile16[R == 8 ? 0 : 1];
  } else {
    tile = k.block_kernels_->tile32[R == 8 ? 0 : 1];
  }
  for (int64_t b = 0; b < p.blocks; ++b) {
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t j = p.ptr[b * groups + grp], count = p.ptr[b * groups + grp + 1] - j;
      const int live = static_cast<int>(std::min(R, k.n_ - grp * R));
      for (int64_t s = 0; s < T; s += W) {
        tile(p.values.data() + j * R, p.idx.data() + j, count, k.bias_blocked_.data() + grp * R, b > 0, g.xt + s, T,
             live, sums + (grp - g0) * R * T + s, T);
      }
    }
  }
  float* y = call.y + g.row0 * k.n_;
  const int64_t n0 = g0 * R, n1 = std::min(g1 * R, k.n_);
  for (int64_t l = 0; l < g.rows; ++l) {
    for (int64_t n = n0; n < n1; ++n) y[l * k.n_ + n] = sums[(n - n0) * T + l];
  }
}

// RunPart for the blocked format: gather groups on the blocked packing, tile groups on its R x 1 tiled
// packing, or (1 x C blocks) on the CSR tiles.
template <typename Index>
void RunBlockedPart(const SparseGemmKernel& k, const prune::Blocked<Index>& gather,
                    const prune::Blocked<Index>* tiled_blocks, const prune::Packed<Index>* tiled_csr,
                    const GemmCall& call, size_t task) {
  const Group& g = call.groups[task / call.parts];
  const int64_t part = static_cast<int64_t>(task) % call.parts;
  if (g.tile == 0) {
    const auto [g0, g1] = prune::Part(gather, part, call.parts);
    const float* x = call.x + g.row0 * k.k_;
    float* y = call.y + g.row0 * k.n_;
    const int which = prune::GatherIndex(gather.r);
    if constexpr (sizeof(Index) == 2) {
      k.block_kernels_->gather16[which](gather, k.bias_blocked_.data(), k.n_, g0, g1, x, k.k_,
                                        static_cast<int>(g.rows), y, k.n_);
    } else {
      k.block_kernels_->gather32[which](gather, k.bias_blocked_.data(), k.n_, g0, g1, x, k.k_,
                                        static_cast<int>(g.rows), y, k.n_);
    }
  } else if (tiled_blocks != nullptr) {
    const auto [g0, g1] = prune::Part(*tiled_blocks, part, call.parts);
    prune::AlignedFloats sums = prune::AllocateAligned((g1 - g0) * tiled_blocks->r * g.tile);
    RunTileBlocked(k, *tiled_blocks, call, g, g0, g1, sums.get());
  } else {
    const auto [n0, n1] = prune::Part(*tiled_csr, part, call.parts);
    prune::AlignedFloats sums = prune::AllocateAligned((n1 - n0) * g.tile);
    RunTile(k, *tiled_csr, call, g, n0, n1, sums.get());
  }
}

void PartTask(void* data, size_t task) {
  auto* call = static_cast<GemmCall*>(data);
  const SparseGemmKernel& k = *call->k;
  // Nothing may escape into onnxruntime's thread pool: an allocation failure is reported after the loop.
  try {
    if (k.BlockedFormat()) {
      if (k.narrow_) {
        RunBlockedPart(k, *k.b16_, call->tb16.get(), call->t16.get(), *call, task);
      } else {
        RunBlockedPart(k, *k.b32_, call->tb32.get(), call->t32.get(), *call, task);
      }
    } else if (k.narrow_) {
      RunPart(k, k.p16_, call->t16.get(), *call, task);
    } else {
      RunPart(k, k.p32_, call->t32.get(), *call, task);
    }
  } catch (...) {
    call->failed.store(true);
  }
}

// Transposes tile group `i`'s rows into its [K][T] buffer, zero rows past the last.
void TransposeTask(void* data, size_t i) {
  auto* call = static_cast<GemmCall*>(data);
  const Group& g = call->groups[i];
  if (g.tile == 0) return;
  const int64_t K = call->k->k_, T = g.tile;
  const float* x = call->x + g.row0 * K;
  for (int64_t c = 0; c < K; ++c) {
    float* dst = g.xt + c * T;
    for (int64_t l = 0; l < g.rows; ++l) dst[l] = x[l * K + c];
    for (int64_t l = g.rows; l < T; ++l) dst[l] = 0.0f;
  }
}

// Groups of X's `rows` rows: tiles of 32 while more than 16 rows remain, then one of 16 or 8, or a gather
// group of the last 1 to 4 rows.
std::vector<Group> MakeGroups(int64_t rows) {
  std::vector<Group> groups;
  for (int64_t r = 0; r < rows;) {
    const int64_t left = rows - r;
    Group g;
    g.row0 = r;
    g.tile = left > 16 ? 32 : left > 8 ? 16 : left > 4 ? 8 : 0;
    g.rows = g.tile == 0 ? left : std::min(left, g.tile);
    groups.push_back(g);
    r += g.rows;
  }
  return groups;
}

}  // namespace

SparseGemmKernel::SparseGemmKernel(const OrtApi* api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();
  present_inputs_ = onnxopt::PresentInputs(kinfo);
  if (present_inputs_ != 4 && present_inputs_ != 5) {
    Fail(where, "expects inputs (X, values, indices, row_ptr) or (X, values, indices, row_ptr, bias), got " +
                    std::to_string(present_inputs_));
  }
  const auto k = IntAttribute(api, info, "K", where);
  if (!k) Fail(where, "attribute 'K' (the input width) is required");
  if (*k <= 0 || *k > (int64_t{1} << 30)) Fail(where, "attribute 'K' must be in [1, 2^30], got " + std::to_string(*k));
  k_ = *k;
  const prune::Csr csr = prune::ReadCsr(kinfo, k_, where);
  n_ = csr.rows;
  nnz_ = static_cast<int64_t>(csr.values.size());
  bias_ = prune::ReadBias(kinfo, present_inputs_, n_, "N", where);
  narrow_ = k_ <= 65536;
  kernels_ = &prune::ChooseKernels();
  const prune::BlockShape shape = prune::ChooseBlockShape(csr, true, where);
  if (shape.Blocked()) {
    // Segments of an even number of blocks: the AVX2 gathers take two blocks per register.
    block_r_ = shape.r, block_c_ = shape.c;
    if (narrow_) {
      b16_ = std::make_shared<const prune::Blocked<uint16_t>>(prune::PackBlocked<uint16_t>(csr, shape, 2, k_));
    } else {
      b32_ = std::make_shared<const prune::Blocked<int32_t>>(prune::PackBlocked<int32_t>(csr, shape, 2, k_));
    }
    bias_blocked_ = bias_;
    bias_blocked_.resize(static_cast<size_t>((n_ + block_r_ - 1) / block_r_ * block_r_), 0.0f);
    block_kernels_ = &prune::ChooseBlockKernels();
    return;
  }
  // Rows padded to multiples of 8: the gather kernel takes 8 nonzeros per register.
  if (narrow_) {
    p16_ = prune::Pack<uint16_t>(csr, 8, k_);
  } else {
    p32_ = prune::Pack<int32_t>(csr, 8, k_);
  }
}

namespace {

// The nonzeros of a gather packing, row by row (its zero padding, and any stored zero, add nothing).
template <typename Index>
void AppendNonzeros(const prune::Packed<Index>& p, prune::Csr& csr) {
  for (int64_t n = 0; n < csr.rows; ++n) {
    for (int64_t j = p.ptr[n]; j < p.ptr[n + 1]; ++j) {
      if (p.values[j] == 0.0f) continue;
      csr.values.push_back(p.values[j]);
      csr.indices.push_back(static_cast<int32_t>(p.idx[j]));
    }
    csr.row_ptr[n + 1] = static_cast<int64_t>(csr.values.size());
  }
}

template <typename Index>
void AppendNonzeros(const prune::Blocked<Index>& p, prune::Csr& csr) {
  const int64_t R = p.r, C = p.c;
  for (int64_t n = 0; n < csr.rows; ++n) {
    const int64_t g = n / R, i = n % R;
    for (int64_t j = p.ptr[g]; j < p.ptr[g + 1]; ++j) {  // blocks in ascending columns
      for (int64_t c = 0; c < C; ++c) {
        const float v = p.values[(j * C + c) * R + i];
        if (v == 0.0f) continue;
        csr.values.push_back(v);
        csr.indices.push_back(static_cast<int32_t>(p.idx[j] + c));
      }
    }
    csr.row_ptr[n + 1] = static_cast<int64_t>(csr.values.size());
  }
}

}  // namespace

prune::Csr SparseGemmKernel::Nonzeros() const {
  prune::Csr csr;
  csr.rows = n_, csr.cols = k_;
  csr.row_ptr.assign(static_cast<size_t>(n_ + 1), 0);
  if (BlockedFormat()) {
    narrow_ ? AppendNonzeros(*b16_, csr) : AppendNonzeros(*b32_, csr);
  } else {
    narrow_ ? AppendNonzeros(p16_, csr) : AppendNonzeros(p32_, csr);
  }
  return csr;
}

template <typename Index>
std::shared_ptr<const prune::Packed<Index>> SparseGemmKernel::Tiled(
    std::shared_ptr<const prune::Packed<Index>>& slot) const {
  std::lock_guard<std::mutex> lock(tiled_mu_);
  if (!slot) slot = std::make_shared<const prune::Packed<Index>>(prune::Pack<Index>(Nonzeros(), 1, prune::kTileBlockCols));
  return slot;
}

template <typename Index>
std::shared_ptr<const prune::Blocked<Index>> SparseGemmKernel::TiledBlocked(
    std::shared_ptr<const prune::Blocked<Index>>& slot) const {
  std::lock_guard<std::mutex> lock(tiled_mu_);
  if (!slot) {
    const prune::BlockShape shape{block_r_, block_c_, 1.0};
    slot = std::make_shared<const prune::Blocked<Index>>(
        prune::PackBlocked<Index>(Nonzeros(), shape, 1, prune::kTileBlockCols));
  }
  return slot;
}

std::string SparseGemmKernel::Where() const { return onnxopt::Where("SparseGemm", node_name_); }

Ort::Status SparseGemmKernel::Compute(OrtKernelContext* context, const Tensor<float>& X,
                                      const Tensor<float>& values, const Tensor<int32_t>& indices,
                                      const Tensor<int64_t>& row_ptr, std::optional<const Tensor<float>*> bias,
                                      Tensor<float>& Y) {
  return Guarded(Where(), [&] {
    const bool has_b = bias.has_value() && *bias != nullptr;
    prune::CheckCsrShapes(values.Shape(), indices.Shape(), row_ptr.Shape(), has_b ? &(*bias)->Shape() : nullptr,
                          n_, nnz_, Where());
    Run(context, X, bias, Y);
  });
}

void SparseGemmKernel::Run(OrtKernelContext* context, const Tensor<float>& X,
                           std::optional<const Tensor<float>*>, Tensor<float>& Y) const {
  const std::string where = Where();
  const std::vector<int64_t>& xs = X.Shape();
  if (xs.empty()) Fail(where, "X must have rank >= 1 [..., K], got a scalar");
  if (xs.back() != k_) {
    Fail(where, "X has last dimension " + std::to_string(xs.back()) + " (shape " + ShapeStr(xs) +
                    ") but the op has K = " + std::to_string(k_));
  }
  std::vector<int64_t> ys(xs.begin(), xs.end() - 1);
  ys.push_back(n_);
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < xs.size(); ++i) rows *= xs[i];
  float* y = Y.Allocate(ys);
  if (rows == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);

  GemmCall call;
  call.k = this;
  call.x = X.Data();
  call.y = y;
  call.groups = MakeGroups(rows);
  int64_t xt_floats = 0;
  for (const Group& g : call.groups) xt_floats += g.tile * k_;
  prune::AlignedFloats xt = prune::AllocateAligned(xt_floats);
  for (int64_t i = 0, at = 0; i < static_cast<int64_t>(call.groups.size()); ++i) {
    call.groups[i].xt = xt.get() + at;
    at += call.groups[i].tile * k_;
  }
  int64_t padded = 0;
  if (BlockedFormat()) {
    padded = (narrow_ ? b16_->ptr.back() : b32_->ptr.back()) * block_r_ * block_c_;
  } else {
    padded = narrow_ ? p16_.ptr.back() : p32_.ptr.back();
  }
  const int64_t work = std::max<int64_t>(padded, n_) * std::min<int64_t>(rows, prune::kMaxTile);
  call.parts = std::clamp<int64_t>(work / kMinTaskWork, 1, kMaxParts);
  const int64_t groups = static_cast<int64_t>(call.groups.size());
  if (xt_floats > 0) {
    if (block_r_ > 1) {
      if (narrow_) {
        call.tb16 = TiledBlocked(tb16_);
      } else {
        call.tb32 = TiledBlocked(tb32_);
      }
    } else if (narrow_) {
      call.t16 = Tiled(t16_);
    } else {
      call.t32 = Tiled(t32_);
    }
    RunTasks(context, TransposeTask, groups, &call);
  }
  RunTasks(context, PartTask, groups * call.parts, &call);
  if (call.failed.load()) Fail(where, "out of memory for the sums of a task", ORT_FAIL);
}

Ort::Custom::OrtLiteCustomOp* MakeSparseGemmOp() { return new SafeOp<SparseGemmKernel>("SparseGemm"); }

}  // namespace onnxopt
