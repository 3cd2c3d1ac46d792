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

// d (4x4, row-major) -> B^T d B.
inline void InputTransform(const float* d, float* v) {
  float t[16];  // B^T d
  for (int j = 0; j < 4; ++j) {
    const float d0 = d[0 * 4 + j], d1 = d[1 * 4 + j], d2 = d[2 * 4 + j], d3 = d[3 * 4 + j];
    t[0 * 4 + j] = d0 - d2;
    t[1 * 4 + j] = d1 + d2;
    t[2 * 4 + j] = d2 - d1;
    t[3 * 4 + j] = d1 - d3;
  }
  for (int i = 0; i < 4; ++i) {  // (B^T d) B: the same combination along each row
    const float t0 = t[i * 4 + 0], t1 = t[i * 4 + 1], t2 = t[i * 4 + 2], t3 = t[i * 4 + 3];
    v[i * 4 + 0] = t0 - t2;
    v[i * 4 + 1] = t1 + t2;
    v[i * 4 + 2] = t2 - t1;
    v[i * 4 + 3] = t1 - t3;
  }
}

// m (4x4, row-major) -> A^T m A (2x2, row-major).
inline void OutputTransform(const float* m, float* y) {
  float t[8];  // A^T m, 2x4
  for (int j = 0; j < 4; ++j) {
    const float m0 = m[0 * 4 + j], m1 = m[1 * 4 + j], m2 = m[2 * 4 + j], m3 = m[3 * 4 + j];
    t[0 * 4 + j] = m0 + m1 + m2;
    t[1 * 4 + j] = m1 - m2 - m3;
  }
  for (int i = 0; i < 2; ++i) {
    const float t0 = t[i * 4 + 0], t1 = t[i * 4 + 1], t2 = t[i * 4 + 2], t3 = t[i * 4 + 3];
    y[i * 2 + 0] = t0 + t1 + t2;
    y[i * 2 + 1] = t1 - t2 - t3;
  }
}

// The 4x4 input window whose top-left corner is (y0, x0) in an h x w plane; zero outside the plane.
inline void LoadTile(const float* plane, int64_t h, int64_t w, int64_t y0, int64_t x0, float* d) {
  if (y0 >= 0 && x0 >= 0 && y0 + kTileIn <= h && x0 + kTileIn <= w) {
    const float* p = plane + y0 * w + x0;
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) d[i * 4 + j] = p[i * w + j];
    }
    return;
  }
  for (int i = 0; i < 4; ++i) {
    const int64_t yy = y0 + i;
    for (int j = 0; j < 4; ++j) {
      const int64_t xx = x0 + j;
      d[i * 4 + j] = (yy >= 0 && yy < h && xx >= 0 && xx < w) ? plane[yy * w + xx] : 0.0f;
    }
  }
}

// The GEMM stage: out[r][t] = sum_c a[r][c] * b[c][t] for t < nt; a is [rows x k], b is [k x nt], out is
// [rows x nt]. Register-blocked: a 4-row x 8-column block of out is accumulated in eight 4-float registers over
// the whole k loop, so each b element loaded serves four rows and out is written once.
//
// The 4-float values are GCC/Clang generic vectors (one SSE register on x86-64, NEON on ARM, plain scalars on
// targets without SIMD): portable C++, no intrinsics. (g++ 12 left to itself spills fixed-size accumulator
// arrays to the stack here, which measured 2.5x slower than this; a row-streaming loop it does vectorize
// measured ~15% slower.)
constexpr int kColBlock = 8;

typedef float F4 __attribute__((vector_size(16)));

inline F4 Load4(const float* p) {
  F4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store4(float* p, F4 v) { std::memcpy(p, &v, sizeof(v)); }

// Four rows of out, columns [t0, t0 + 8): the 4 x 8 block is accumulated in registers over the whole k loop.
inline void Gemm4x8(const float* __restrict a, const float* __restrict b, float* __restrict out, int64_t k,
                    int64_t nt, int64_t t0) {
  F4 c0l = {}, c0h = {}, c1l = {}, c1h = {}, c2l = {}, c2h = {}, c3l = {}, c3h = {};
  const float* a0 = a;
  const float* a1 = a + k;
  const float* a2 = a + 2 * k;
  const float* a3 = a + 3 * k;
  for (int64_t c = 0; c < k; ++c) {
    const float* bc = b + c * nt + t0;
    const F4 vl = Load4(bc), vh = Load4(bc + 4);
    const float s0 = a0[c], s1 = a1[c], s2 = a2[c], s3 = a3[c];
    c0l += s0 * vl;
    c0h += s0 * vh;
    c1l += s1 * vl;
    c1h += s1 * vh;
    c2l += s2 * vl;
    c2h += s2 * vh;
    c3l += s3 * vl;
    c3h += s3 * vh;
  }
  Store4(out + 0 * nt + t0, c0l);
  Store4(out + 0 * nt + t0 + 4, c0h);
  Store4(out + 1 * nt + t0, c1l);
  Store4(out + 1 * nt + t0 + 4, c1h);
  Store4(out + 2 * nt + t0, c2l);
  Store4(out + 2 * nt + t0 + 4, c2h);
  Store4(out + 3 * nt + t0, c3l);
  Store4(out + 3 * nt + t0 + 4, c3h);
}

// Not inlined into ComputeTiles: there, register pressure made g++ spill the accumulators.
__attribute__((noinline)) void Gemm(const float* __restrict a, const float* __restrict b, float* __restrict out,
                                    int64_t rows, int64_t k, int64_t nt) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    int64_t t0 = 0;
    for (; t0 + kColBlock <= nt; t0 += kColBlock) Gemm4x8(a + r * k, b, out + r * nt, k, nt, t0);
    for (; t0 < nt; ++t0) {  // last columns
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
      for (int64_t c = 0; c < k; ++c) {
        const float v = b[c * nt + t0];
        s0 += a[(r + 0) * k + c] * v;
        s1 += a[(r + 1) * k + c] * v;
        s2 += a[(r + 2) * k + c] * v;
        s3 += a[(r + 3) * k + c] * v;
      }
      out[(r + 0) * nt + t0] = s0;
      out[(r + 1) * nt + t0] = s1;
      out[(r + 2) * nt + t0] = s2;
      out[(r + 3) * nt + t0] = s3;
    }
  }
  for (; r < rows; ++r) {  // last rows, one at a time
    float* __restrict o = out + r * nt;
    const float* ar = a + r * k;
    for (int64_t t = 0; t < nt; ++t) o[t] = 0.0f;
    for (int64_t c = 0; c < k; ++c) {
      const float s = ar[c];
      const float* __restrict bc = b + c * nt;
      for (int64_t t = 0; t < nt; ++t) o[t] += s * bc[t];
    }
  }
}

}  // namespace

void TransformWeights(const float* w, int64_t m, int64_t c, float* u) {
  for (int64_t mi = 0; mi < m; ++mi) {
    for (int64_t ci = 0; ci < c; ++ci) {
      const float* g = w + (mi * c + ci) * 9;
      double t[4][3];  // G g, in double so that U is g's exact transform rounded once
      for (int j = 0; j < 3; ++j) {
        const double g0 = g[0 * 3 + j], g1 = g[1 * 3 + j], g2 = g[2 * 3 + j];
        t[0][j] = g0;
        t[1][j] = 0.5 * (g0 + g1 + g2);
        t[2][j] = 0.5 * (g0 - g1 + g2);
        t[3][j] = g2;
      }
      for (int i = 0; i < 4; ++i) {  // (G g) G^T
        const double r[4] = {t[i][0], 0.5 * (t[i][0] + t[i][1] + t[i][2]), 0.5 * (t[i][0] - t[i][1] + t[i][2]),
                             t[i][2]};
        for (int j = 0; j < 4; ++j) u[((i * 4 + j) * m + mi) * c + ci] = static_cast<float>(r[j]);
      }
    }
  }
}

size_t ScratchFloats(const ConvGeometry& g, int64_t block_tiles) {
  const int64_t tb = std::min(block_tiles, kMaxBlockTiles);
  return static_cast<size_t>(kElems * (g.c + g.m) * tb);
}

int64_t BlockTiles(const ConvGeometry& g) {
  const int64_t budget_floats = int64_t{1} << 17;  // 512 KiB of scratch per task where channels allow
  int64_t tb = budget_floats / (kElems * (g.c + g.m));
  tb = std::clamp<int64_t>(tb, 8, kMaxBlockTiles) / 8 * 8;  // a multiple of the GEMM's 8 columns
  const int64_t total = g.n * g.TilesPerImage();
  const int64_t for_8_tasks = ((total + 7) / 8 + 7) / 8 * 8;  // aim at >= 8 tasks when there are enough tiles
  tb = std::min(tb, std::max<int64_t>(8, for_8_tasks));
  return std::max<int64_t>(1, std::min(tb, total));
}

int64_t OutputChunk(const ConvGeometry& g, int64_t tile_blocks) {
  const int64_t want = std::max<int64_t>(1, (8 + tile_blocks - 1) / tile_blocks);  // >= 8 tasks in all
  int64_t chunk = (g.m + want - 1) / want;
  chunk = (chunk + 3) / 4 * 4;
  return std::clamp<int64_t>(chunk, std::min<int64_t>(g.m, 16), std::max<int64_t>(g.m, 1));
}

void ComputeTiles(const ConvGeometry& g, const float* x, const float* u, const float* bias, float* y,
                  int64_t tile_begin, int64_t tile_end, int64_t m_begin, int64_t m_end, float* scratch) {
  const int64_t C = g.c, M = g.m, H = g.h, W = g.w, OH = g.oh, OW = g.ow;
  const int64_t per_image = g.TilesPerImage();
  for (int64_t begin = tile_begin; begin < tile_end; begin += kMaxBlockTiles) {
    const int64_t tb = std::min(kMaxBlockTiles, tile_end - begin);
    float* v = scratch;                    // [16][C][tb]
    float* r = scratch + kElems * C * tb;  // [16][Mc][tb]
    int64_t img[kMaxBlockTiles], oy[kMaxBlockTiles], ox[kMaxBlockTiles];
    for (int64_t i = 0; i < tb; ++i) {
      const int64_t t = begin + i;
      const int64_t rem = t % per_image;
      img[i] = t / per_image;
      oy[i] = (rem / g.tiles_w) * kTileOut;
      ox[i] = (rem % g.tiles_w) * kTileOut;
    }

    // 1. Input transform: V[e][c][i] = (B^T d B)[e] of tile i, channel c.
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < tb; ++i) {
        const float* plane = x + (img[i] * C + c) * H * W;
        float d[16], vt[16];
        LoadTile(plane, H, W, oy[i] - g.pad_top, ox[i] - g.pad_left, d);
        InputTransform(d, vt);
        for (int e = 0; e < kElems; ++e) v[(e * C + c) * tb + i] = vt[e];
      }
    }

    // 2. Sixteen independent GEMMs over this task's output channels: R[e] = U[e][m_begin:m_end] * V[e].
    const int64_t Mc = m_end - m_begin;
    for (int e = 0; e < kElems; ++e) {
      Gemm(u + (e * M + m_begin) * C, v + e * C * tb, r + e * Mc * tb, Mc, C, tb);
    }

    // 3. Output transform and bias; partial tiles at the right and bottom edges write only what exists.
    for (int64_t mm = m_begin; mm < m_end; ++mm) {
      const float b = bias ? bias[mm] : 0.0f;
      for (int64_t i = 0; i < tb; ++i) {
        float mt[16], yt[4];
        for (int e = 0; e < kElems; ++e) mt[e] = r[(e * Mc + (mm - m_begin)) * tb + i];
        OutputTransform(mt, yt);
        float* out = y + ((img[i] * M + mm) * OH + oy[i]) * OW + ox[i];
        const bool has_row1 = oy[i] + 1 < OH, has_col1 = ox[i] + 1 < OW;
        out[0] = yt[0] + b;
        if (has_col1) out[1] = yt[1] + b;
        if (has_row1) {
          out[OW] = yt[2] + b;
          if (has_col1) out[OW + 1] = yt[3] + b;
        }
      }
    }
  }
}

}  // namespace winograd

namespace {

using Ort::Custom::Tensor;

struct ParallelTask {
  const winograd::ConvGeometry* g;
  const float* x;
  const float* u;
  const float* bias;
  float* y;
  int64_t total_tiles;
  int64_t block_tiles;
  int64_t m_chunk;   // output channels per task
  int64_t m_chunks;  // tasks per block of tiles
  std::atomic<bool> failed{false};
};

void RunBlock(void* data, size_t index) {
  auto* task = static_cast<ParallelTask*>(data);
  // Nothing may escape into onnxruntime's thread pool: an allocation failure is reported after the loop.
  try {
    const int64_t block = static_cast<int64_t>(index) / task->m_chunks;
    const int64_t chunk = static_cast<int64_t>(index) % task->m_chunks;
    const int64_t begin = block * task->block_tiles;
    const int64_t end = std::min(task->total_tiles, begin + task->block_tiles);
    const int64_t m_begin = chunk * task->m_chunk;
    const int64_t m_end = std::min(task->g->m, m_begin + task->m_chunk);
    if (begin >= end || m_begin >= m_end) return;
    std::unique_ptr<float[]> scratch(new float[winograd::ScratchFloats(*task->g, end - begin)]);
    winograd::ComputeTiles(*task->g, task->x, task->u, task->bias, task->y, begin, end, m_begin, m_end,
                           scratch.get());
  } catch (...) {
    task->failed.store(true);
  }
}

}  // namespace

WinogradConvKernel::WinogradConvKernel(const OrtApi* api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();

  // Inputs actually present: a trailing optional input given as "" is absent.
  present_inputs_ = onnxopt::PresentInputs(kinfo);
  if (present_inputs_ < 2 || present_inputs_ > 3) {
    Fail(where, "expects inputs (X, W) or (X, W, B), got " + std::to_string(present_inputs_) + " inputs");
  }
  if (kinfo.GetInputName(0).empty()) Fail(where, "input X (0) is missing");
  if (kinfo.GetInputName(1).empty()) Fail(where, "input W (1) is missing");

  // Attributes.
  if (auto pads = IntsAttribute(api, info, "pads", where)) {
    if (pads->size() != 4) {
      Fail(where, "attribute 'pads' must have 4 values [top, left, bottom, right], got " + ShapeStr(*pads));
    }
    for (size_t i = 0; i < 4; ++i) {
      if ((*pads)[i] < 0) Fail(where, "attribute 'pads' must be non-negative, got " + ShapeStr(*pads));
      pads_[i] = (*pads)[i];
    }
  }
  RequireAllOnes(api, info, "strides", where);
  RequireAllOnes(api, info, "dilations", where);
  const int64_t group = IntAttribute(api, info, "group", where).value_or(1);
  if (group != 1) Fail(where, "only group = 1 is supported, got " + std::to_string(group));
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
  u_.resize(static_cast<size_t>(winograd::kElems * m_ * c_));
  winograd::TransformWeights(w.data.data(), m_, c_, u_.data());

  // B: optional constant [M].
  if (present_inputs_ == 3) {
    ConstantTensor b = ConstantFloatInput(kinfo, 2, "B", where);
    if (b.shape.size() != 1 || b.shape[0] != m_) {
      Fail(where, "B must have shape [M] = [" + std::to_string(m_) + "], got " + ShapeStr(b.shape));
    }
    bias_ = std::move(b.data);
  }
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
  if (W.Shape() != std::vector<int64_t>{m_, c_, 3, 3}) {
    Fail(where, "W has shape " + ShapeStr(W.Shape()) + " at run time, but " +
                    ShapeStr({m_, c_, 3, 3}) + " at kernel creation");
  }
  if (B.has_value() && *B != nullptr && (*B)->Shape() != std::vector<int64_t>{m_}) {
    Fail(where, "B must have shape [" + std::to_string(m_) + "], got " + ShapeStr((*B)->Shape()));
  }

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
  g.tiles_h = (g.oh + 1) / 2;
  g.tiles_w = (g.ow + 1) / 2;

  float* y = Y.Allocate({g.n, g.m, g.oh, g.ow});
  const int64_t total = g.n * g.TilesPerImage();
  if (total == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);

  ParallelTask task;
  task.g = &g;
  task.x = X.Data();
  task.u = u_.data();
  task.bias = bias_.empty() ? nullptr : bias_.data();
  task.y = y;
  task.total_tiles = total;
  task.block_tiles = winograd::BlockTiles(g);
  const int64_t blocks = (total + task.block_tiles - 1) / task.block_tiles;
  task.m_chunk = winograd::OutputChunk(g, blocks);
  task.m_chunks = (g.m + task.m_chunk - 1) / task.m_chunk;
  const int64_t tasks = blocks * task.m_chunks;
  if (tasks == 1) {
    RunBlock(&task, 0);
  } else {
    Ort::KernelContext ctx{context};
    ctx.ParallelFor(RunBlock, static_cast<size_t>(tasks), 0, &task);
  }
  if (task.failed.load()) Fail(where, "out of memory for the scratch of a block of tiles", ORT_FAIL);
}

Ort::Custom::OrtLiteCustomOp* MakeWinogradConvOp() { return new SafeOp<WinogradConvKernel>("WinogradConv"); }

}  // namespace onnxopt
