// WinogradConv kernel: F(2x2, 3x3) Winograd convolution (see winograd.h for the semantics and the math).
//
// Work is split into blocks of at most kMaxBlockTiles output tiles (flattened over images and tile rows/cols).
// Each block is one task of onnxruntime's ParallelFor; it transforms its input tiles into its own scratch
// ([16][C][tiles]), runs the 16 GEMMs [M x C] x [C x tiles] into [16][M][tiles], and writes its output tiles.
// Scratch per task is bounded by the block size, never by the image size.
#include "winograd.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <utility>

#include "kernel_util.h"
#include "ops.h"

namespace onnxopt {
namespace winograd {

namespace {

// G for F(2x2, 3x3) and F(4x4, 3x3), rows of 3 (see the reference module).
constexpr double kG2[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
constexpr double kG4[6][3] = {{1.0 / 4, 0, 0},           {-1.0 / 6, -1.0 / 6, -1.0 / 6}, {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                              {1.0 / 24, 1.0 / 12, 1.0 / 6}, {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0, 0, 1}};

}  // namespace

std::vector<float> PackWeights(const float* w, int64_t m, int64_t c, int tile) {
  const int a = tile + 2, elems = Elems(tile);
  const double(*G)[3] = tile == 4 ? kG4 : kG2;
  const int64_t mb = (m + kRowBlock - 1) / kRowBlock;
  std::vector<float> u(static_cast<size_t>(elems * mb * c * kRowBlock), 0.0f);
  for (int64_t mi = 0; mi < m; ++mi) {
    for (int64_t ci = 0; ci < c; ++ci) {
      const float* g = w + (mi * c + ci) * 9;
      double t[6][3];  // G g, in double so that U is g's exact transform rounded once
      for (int i = 0; i < a; ++i) {
        for (int j = 0; j < 3; ++j) t[i][j] = G[i][0] * g[j] + G[i][1] * g[3 + j] + G[i][2] * g[6 + j];
      }
      for (int i = 0; i < a; ++i) {
        for (int j = 0; j < a; ++j) {  // (G g) G^T
          const double v = t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2];
          const int64_t e = i * a + j;
          const int64_t c0 = ci / kSliceC * kSliceC, kc = std::min(kSliceC, c - c0);
          const int64_t offset = e * mb * c + c0 * mb + (mi / kRowBlock) * kc + (ci - c0);
          u[static_cast<size_t>(offset * kRowBlock + mi % kRowBlock)] = static_cast<float>(v);
        }
      }
    }
  }
  return u;
}

size_t RFloats(const ConvGeometry& g, int64_t tiles, int64_t m_chunk) {
  const int64_t groups = (tiles + 7) / 8;
  const int64_t rows = (m_chunk + kRowBlock - 1) / kRowBlock * kRowBlock;
  return static_cast<size_t>(Elems(g.tile) * groups * 8 * rows);
}

int64_t BlockTiles(const ConvGeometry& g) {
  // About 384 KiB of scratch (V and R) per task, to stay in L2; at least 16 tiles, the micro-kernel's width.
  const int64_t budget_floats = int64_t{96} << 10;
  int64_t tb = budget_floats / (Elems(g.tile) * (g.c + std::min<int64_t>(g.m, 64)));
  tb = std::clamp<int64_t>(tb, 16, kMaxBlockTiles) / 16 * 16;
  const int64_t total = g.n * g.TilesPerImage();
  const int64_t for_8_tasks = ((total + 7) / 8 + 15) / 16 * 16;  // aim at >= 8 tasks when there are enough tiles
  tb = std::min(tb, std::max<int64_t>(16, for_8_tasks));
  return std::max<int64_t>(1, std::min(tb, total));
}

int64_t OutputChunks(const ConvGeometry& g, int64_t tile_blocks) {
  const int64_t want = std::max<int64_t>(1, (8 + tile_blocks - 1) / tile_blocks);  // >= 8 tasks in all
  const int64_t row_blocks = (g.m + kRowBlock - 1) / kRowBlock;
  // At least 4 row blocks (24 rows) per chunk: below that the per-task overhead outweighs the GEMM.
  return std::max<int64_t>(1, std::min(want, row_blocks / 4));
}

void OutputChunkRange(const ConvGeometry& g, int64_t chunks, int64_t chunk, int64_t* m_begin, int64_t* m_end) {
  // Row blocks shared out as evenly as possible: chunk sizes differ by at most one block of 6 rows, so that
  // no thread waits long on the last, larger task.
  const int64_t row_blocks = (g.m + kRowBlock - 1) / kRowBlock;
  *m_begin = std::min(g.m, row_blocks * chunk / chunks * kRowBlock);
  *m_end = std::min(g.m, row_blocks * (chunk + 1) / chunks * kRowBlock);
}

}  // namespace winograd

namespace {

using Ort::Custom::Tensor;

// One call's work: blocks of tiles x chunks of output channels. With one chunk per block (large images), a
// task transforms its block's input into its own scratch and multiplies it; with several (few tiles, deep
// layers), the blocks' inputs are first transformed once into `shared_v`, split over input channels, so that
// the chunks of a block do not each redo it.
struct Plan {
  const winograd::ConvGeometry* g;
  const float* x;
  const float* u;
  const float* bias;
  float* y;
  winograd::Stages stages;
  int64_t total_tiles, block_tiles, blocks;
  int64_t m_chunks;           // tasks per block: chunks of output channels
  int64_t c_chunk, c_chunks;  // input channels per transform task, and transform tasks per block
  float* shared_v = nullptr;  // blocks x VFloats(block_tiles), or null
  std::atomic<bool> failed{false};

  int64_t Begin(int64_t block) const { return block * block_tiles; }
  int64_t End(int64_t block) const { return std::min(total_tiles, Begin(block) + block_tiles); }
  float* SharedV(int64_t block) const { return shared_v + block * winograd::VFloats(*g, block_tiles); }
};

// Nothing may escape into onnxruntime's thread pool: an allocation failure is reported after the loop.
void TransformTask(void* data, size_t index) {
  auto* p = static_cast<Plan*>(data);
  try {
    const int64_t block = static_cast<int64_t>(index) / p->c_chunks;
    const int64_t c_begin = static_cast<int64_t>(index) % p->c_chunks * p->c_chunk;
    const int64_t c_end = std::min(p->g->c, c_begin + p->c_chunk);
    if (c_begin >= c_end) return;
    p->stages.transform(*p->g, p->x, p->Begin(block), p->End(block), c_begin, c_end, p->SharedV(block));
  } catch (...) {
    p->failed.store(true);
  }
}

void MultiplyTask(void* data, size_t index) {
  auto* p = static_cast<Plan*>(data);
  try {
    const int64_t block = static_cast<int64_t>(index) / p->m_chunks;
    int64_t m_begin = 0, m_end = 0;
    winograd::OutputChunkRange(*p->g, p->m_chunks, static_cast<int64_t>(index) % p->m_chunks, &m_begin, &m_end);
    const int64_t begin = p->Begin(block), end = p->End(block);
    if (begin >= end || m_begin >= m_end) return;
    std::unique_ptr<float[]> own_v;
    const float* v = p->shared_v ? p->SharedV(block) : nullptr;
    if (v == nullptr) {
      own_v.reset(new float[winograd::VFloats(*p->g, end - begin)]);
      p->stages.transform(*p->g, p->x, begin, end, 0, p->g->c, own_v.get());
      v = own_v.get();
    }
    std::unique_ptr<float[]> r(new float[winograd::RFloats(*p->g, end - begin, m_end - m_begin)]);
    p->stages.multiply(*p->g, v, p->u, p->bias, p->y, begin, end, m_begin, m_end, r.get());
  } catch (...) {
    p->failed.store(true);
  }
}

}  // namespace

WinogradConvKernel::WinogradConvKernel(const OrtApi* api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();

  present_inputs_ = ConvInputs(kinfo, where);

  // Attributes.
  pads_ = ReadPads(api, info, where);
  RequireAllOnes(api, info, "strides", where);
  RequireAllOnes(api, info, "dilations", where);
  const int64_t group = IntAttribute(api, info, "group", where).value_or(1);
  if (group != 1) Fail(where, "only group = 1 is supported, got " + std::to_string(group));
  tile_ = static_cast<int>(IntAttribute(api, info, "tile", where).value_or(2));
  if (tile_ != 2 && tile_ != 4) {
    Fail(where, "attribute 'tile' must be 2 or 4 (F(2x2,3x3) or F(4x4,3x3)), got " + std::to_string(tile_));
  }
  stages_ = HasAvx2Fma() ? winograd::Stages{winograd::avx2::TransformInput, winograd::avx2::MultiplyOutput}
                        : winograd::Stages{winograd::portable::TransformInput, winograd::portable::MultiplyOutput};
  if (auto ks = IntsAttribute(api, info, "kernel_shape", where)) {
    if (*ks != std::vector<int64_t>{3, 3}) Fail(where, "kernel_shape must be [3, 3], got " + ShapeStr(*ks));
  }

  // W: constant [M, C, 3, 3], transformed once.
  const ConstantTensor w = ConstantFloatInput(kinfo, 1, "W", where);
  if (w.shape.size() != 4 || w.shape[0] < 1 || w.shape[1] < 1 || w.shape[2] != 3 || w.shape[3] != 3) {
    Fail(where, "W must have shape [M, C, 3, 3] with M, C >= 1, got " + ShapeStr(w.shape));
  }
  m_ = w.shape[0];
  c_ = w.shape[1];
  u_ = winograd::PackWeights(w.data.data(), m_, c_, tile_);

  // B: optional constant [M].
  bias_ = ConstantBias(kinfo, present_inputs_, m_, "M", where);
}

std::string WinogradConvKernel::Where() const { return onnxopt::Where("WinogradConv", node_name_); }

Ort::Status WinogradConvKernel::Compute(OrtKernelContext* context, const Tensor<float>& X, const Tensor<float>& W,
                                        std::optional<const Tensor<float>*> B, Tensor<float>& Y) {
  return Guarded(Where(), [&] { Run(context, X, W, B, Y); });
}

void WinogradConvKernel::Run(OrtKernelContext* context, const Tensor<float>& X, const Tensor<float>& W,
                             std::optional<const Tensor<float>*> B, Tensor<float>& Y) const {
  const std::string where = Where();
  const std::vector<int64_t>& xs = X.Shape();
  if (xs.size() != 4) Fail(where, "X must have rank 4 [N, C, H, W], got shape " + ShapeStr(xs));
  if (xs[1] != c_) {
    Fail(where, "X has " + std::to_string(xs[1]) + " channels (shape " + ShapeStr(xs) + ") but W expects C = " +
                    std::to_string(c_) + " (W shape [" + std::to_string(m_) + ", " + std::to_string(c_) +
                    ", 3, 3])");
  }
  // W and B are the constants read at kernel creation; their run-time shapes must still agree.
  const bool has_b = B.has_value() && *B != nullptr;
  CheckConstantShapes(W.Shape(), {m_, c_, 3, 3}, has_b ? &(*B)->Shape() : nullptr, m_, where);

  winograd::ConvGeometry g;
  g.n = xs[0];
  g.c = xs[1];
  g.h = xs[2];
  g.w = xs[3];
  g.m = m_;
  g.pad_top = pads_[0];
  g.pad_left = pads_[1];
  g.oh = g.h + pads_[0] + pads_[2] - 2;
  g.ow = g.w + pads_[1] + pads_[3] - 2;
  if (g.n < 0 || g.h < 0 || g.w < 0) Fail(where, "X has a negative dimension: " + ShapeStr(xs));
  if (g.oh <= 0 || g.ow <= 0) {
    Fail(where, "output would be empty: X spatial " + std::to_string(g.h) + "x" + std::to_string(g.w) +
                    " with pads " + ShapeStr({pads_[0], pads_[1], pads_[2], pads_[3]}) +
                    " gives output " + std::to_string(g.oh) + "x" + std::to_string(g.ow) +
                    " for a 3x3 kernel");
  }
  g.tile = tile_;
  g.tiles_h = (g.oh + tile_ - 1) / tile_;
  g.tiles_w = (g.ow + tile_ - 1) / tile_;

  float* y = Y.Allocate({g.n, g.m, g.oh, g.ow});
  const int64_t total = g.n * g.TilesPerImage();
  if (total == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);

  Plan p;
  p.g = &g;
  p.x = X.Data();
  p.u = u_.data();
  p.bias = bias_.empty() ? nullptr : bias_.data();
  p.y = y;
  p.stages = stages_;
  p.total_tiles = total;
  p.block_tiles = winograd::BlockTiles(g);
  p.blocks = (total + p.block_tiles - 1) / p.block_tiles;
  p.m_chunks = winograd::OutputChunks(g, p.blocks);
  std::unique_ptr<float[]> shared_v;
  if (p.m_chunks > 1) {
    shared_v.reset(new float[p.blocks * winograd::VFloats(g, p.block_tiles)]);
    p.shared_v = shared_v.get();
    const int64_t want = std::max<int64_t>(1, (8 + p.blocks - 1) / p.blocks);  // >= 8 tasks in all
    p.c_chunk = std::max<int64_t>(8, (g.c + want - 1) / want);
    p.c_chunks = (g.c + p.c_chunk - 1) / p.c_chunk;
    RunTasks(context, TransformTask, p.blocks * p.c_chunks, &p);
  }
  if (!p.failed.load()) RunTasks(context, MultiplyTask, p.blocks * p.m_chunks, &p);
  if (p.failed.load()) Fail(where, "out of memory for the scratch of a block of tiles", ORT_FAIL);
}

Ort::Custom::OrtLiteCustomOp* MakeWinogradConvOp() { return new SafeOp<WinogradConvKernel>("WinogradConv"); }

}  // namespace onnxopt
