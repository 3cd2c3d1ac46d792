// SparseConv kernel: ONNX Conv (NCHW, group 1) with a pruned weight in CSR (see prune.h).
//
// The scheme: make every nonzero one offset into a buffer, so that a tile of consecutive outputs is the
// prune.h tile kernel (out[p] = bias + sum_j v[j] x[off_j + p]) with no bounds test, no im2col and no index
// arithmetic in the inner loop.
//
// Polyphase split. With strides (sh, sw), output (oy, ox) reads padded input row sh oy + dy dh and column
// sw ox + dx dw. Write ry = dy dh = sh qy + py and rx = dx dw = sw qx + px (py < sh, px < sw). The input is
// copied once per call into sh sw phase planes per channel, plane (c, py, px) holding the zero-padded input at
// rows sh r + py and columns sw q + px, as a grid of Hq = OH + qy_max rows by Wq = OW + qx_max columns. Then
// output (oy, ox) reads plane (c, py, px) at (oy + qy, ox + qx): a stride-1 correlation. Flattening each plane
// row-major with row length Wq, output position p = oy Wq + ox reads plane_offset + qy Wq + qx + p, so every
// nonzero (c, dy, dx) has ONE offset off_j = plane (Hq Wq) + qy Wq + qx, and outputs are computed on the
// flattened positions p < P = OH Wq; the qx_max columns of each output row past OW are computed and dropped
// when the rows are copied to Y (7% extra work for 3x3 on 28x28). For stride 1 the planes are just the
// zero-padded input. The copy costs C H W per image against nnz OH OW multiply-adds.
//
// 1x1 convolutions with stride 1 and no padding skip the copy: X itself is the plane (Wq = W), Y the output
// (XNNPACK's sparse-weight times dense-activation layout: for output channel m, Y[m, tile] += w X[c, tile]).
// Each tile's columns of X are first packed into a 64-byte aligned [C][T] buffer (the rows of X lie a plane
// apart: at 56x56 that stride put a tile's channels on few L1 sets, 1.3x slower), the tile after next
// prefetched (C streams are too many for the hardware prefetcher).
//
// Loops: tasks are (image, chunk of positions, part of the output channels balanced by nonzeros; parts only
// when a plane has too few tiles to keep the threads busy). A task walks its tiles of T = 32 positions and,
// for each, all of its output channels, so the input the tile reads stays in cache across the channels. The
// channels of C are cut into column blocks (prune::Pack) whose part of a tile's input fits in L1 (kL1Bytes);
// the blocks add into the tile's outputs in turn. A ragged last tile is computed with the narrowest tile of
// 8, 16 or 32 that covers it, into a scratch tile, so no output is written twice.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
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
constexpr int64_t kMaxTasks = 64;
constexpr int64_t kMinTasks = 16;  // fewer position chunks than this: output channels are split too
// Input bytes the channels of one column block may read per tile: within the 32 KiB L1 with room for the
// weights and outputs streaming through it (one block for all 256 channels of a 1x1 conv ran 1.4x slower).
constexpr int64_t kL1Bytes = 20 << 10;
// Bound of C, kernel sizes, strides, dilations and pads: far beyond any real layer, and products of them stay
// well within int64 (the buffer sizes are then checked against 2^31).
constexpr int64_t kMaxAttribute = int64_t{1} << 24;

struct Geometry {
  int64_t n = 0, c = 0, h = 0, w = 0, m = 0, oh = 0, ow = 0;
  bool direct = false;  // read X in place (1x1, stride 1, no padding)
  int64_t sh = 1, sw = 1, pad_top = 0, pad_left = 0;
  int64_t hq = 0, wq = 0;     // phase plane rows and row length
  int64_t plane = 0;          // floats per plane
  int64_t image = 0;          // floats of one image's buffer (its planes, then slack)
  int64_t positions = 0;      // P = OH Wq outputs computed per channel
  int64_t tile = 0;           // T
  bool compact = false;       // computed rows are longer than OW: compute into a buffer, copy to Y
};

struct ConvCall {
  const SparseConvKernel* k = nullptr;
  const Geometry* g = nullptr;
  const float* x = nullptr;
  float* buf = nullptr;      // phase planes [N][image] (not direct)
  float* out = nullptr;      // [N][M][P]: Y itself unless compact
  float* y = nullptr;
  const int32_t* offsets = nullptr;  // per nonzero, into one image's input
  int64_t chunks = 1, chunk_tiles = 1;  // position chunks of chunk_tiles tiles
  int64_t parts = 1;                    // output-channel parts
  std::atomic<bool> failed{false};
};

// Copies channel `task` (over N C) of X into its sh sw zero-padded phase planes; the last channel of an image
// also zeroes the image's slack (read by tiles that run past the last plane, whose outputs are dropped).
void CopyTask(void* data, size_t task) {
  const auto* call = static_cast<const ConvCall*>(data);
  const Geometry& g = *call->g;
  const int64_t n = static_cast<int64_t>(task) / g.c, c = static_cast<int64_t>(task) % g.c;
  const float* src = call->x + (n * g.c + c) * g.h * g.w;
  float* image = call->buf + n * g.image;
  for (int64_t py = 0; py < g.sh; ++py) {
    for (int64_t px = 0; px < g.sw; ++px) {
      float* dst = image + ((c * g.sh + py) * g.sw + px) * g.plane;
      for (int64_t r = 0; r < g.hq; ++r, dst += g.wq) {
        const int64_t iy = g.sh * r + py - g.pad_top;
        if (iy < 0 || iy >= g.h) {
          std::memset(dst, 0, static_cast<size_t>(g.wq) * sizeof(float));
          continue;
        }
        const float* row = src + iy * g.w;
        for (int64_t q = 0; q < g.wq; ++q) {
          const int64_t ix = g.sw * q + px - g.pad_left;
          dst[q] = ix >= 0 && ix < g.w ? row[ix] : 0.0f;
        }
      }
    }
  }
  if (c == g.c - 1) {
    const int64_t used = g.c * g.sh * g.sw * g.plane;
    std::memset(image + used, 0, static_cast<size_t>(g.image - used) * sizeof(float));
  }
}

// The input of the tile at position s: in place (offsets), or for 1x1 convs read in place, its columns of X
// packed contiguously as [C][width] (read with idx = c, stride width): X's rows lie a plane apart, and at
// 56x56 that stride maps a tile's channels onto few L1 sets (measured 1.3x slower than packed).
const float* TileInput(const Geometry& g, const float* x, int64_t s, int64_t width, float* xt) {
  if (!g.direct) return x + s;
  // The tile after next is requested now: a tile's columns are C separate streams, too many for the
  // hardware prefetcher, and after a cache flush every one would otherwise wait on DRAM.
  const int64_t P = g.positions, ahead = std::min(s + 2 * g.tile, P - 1);
  for (int64_t c = 0; c < g.c; ++c) {
    const float* row = x + c * P;
    __builtin_prefetch(row + ahead);
    __builtin_prefetch(row + std::min(ahead + 16, P - 1));
    std::memcpy(xt + c * width, row + s, static_cast<size_t>(width) * sizeof(float));
  }
  return xt;
}

// ComputeTile over R x 1 blocks of output channels (prune_block.h), groups [g0, g1): each load of a tile's
// input row feeds R channels. Tiles of T are run in slices of BlockTileWidth(R) positions.
void ComputeTileBlocked(const ConvCall& call, int64_t n, int64_t p0, int64_t p1, int64_t g0, int64_t g1,
                        float* xt) {
  const Geometry& g = *call.g;
  const SparseConvKernel& k = *call.k;
  const prune::Blocked<int32_t>& p = *k.blocked_;
  const prune::BlockKernels& bk = *k.block_kernels_;
  const float* x = g.direct ? call.x + n * g.c * g.h * g.w : call.buf + n * g.image;
  float* out = call.out + n * g.m * g.positions;
  const int64_t P = g.positions, T = g.tile, R = p.r, groups = p.rows, W = prune::BlockTileWidth(R);
  const prune::BlockTileFn<int32_t> tile = bk.tile32[R == 8 ? 0 : 1];
  const int32_t* idx = g.direct ? p.idx.data() : call.offsets;
  auto run = [&](prune::BlockTileFn<int32_t> fn, int64_t b, int64_t grp, const float* xs, int64_t x_stride,
                 float* o, int64_t o_stride) {
    const int64_t j = p.ptr[b * groups + grp], count = p.ptr[b * groups + grp + 1] - j;
    const int live = static_cast<int>(std::min(R, g.m - grp * R));
    fn(p.values.data() + j * R, idx + j, count, k.bias_blocked_.data() + grp * R, b > 0, xs, x_stride, live, o,
       o_stride);
  };
  int64_t t0 = p0;
  for (; t0 + T <= p1 && t0 + T <= P; t0 += T) {
    const float* xs = TileInput(g, x, t0, T, xt);
    const int64_t x_stride = g.direct ? T : 1;
    // Slices outermost: all groups on one slice of positions, then the next (slices innermost ran 64->256 at
    // 56x56 1.4x slower: that layer writes 3 MiB of outputs for few multiply-adds each).
    for (int64_t b = 0; b < p.blocks; ++b) {
      for (int64_t s = 0; s < T; s += W) {
        for (int64_t grp = g0; grp < g1; ++grp) run(tile, b, grp, xs + s, x_stride, out + grp * R * P + t0 + s, P);
      }
    }
  }
  if (t0 < p1) {
    // The ragged last tile as in ComputeTile, into tmp [R][kMaxTile].
    const int64_t r = P - t0;
    const int64_t width = r <= 8 ? 8 : r <= 16 ? 16 : 32, s0 = std::max<int64_t>(0, P - width);
    const float* xs = TileInput(g, x, s0, width, xt);
    const int64_t x_stride = g.direct ? width : 1;
    const bool narrow = R == 4 && width == 8;
    const prune::BlockTileFn<int32_t> fn = narrow ? bk.tile32_r4_8 : tile;
    const int64_t step = narrow ? 8 : W;
    float tmp[8 * prune::kMaxTile];
    for (int64_t grp = g0; grp < g1; ++grp) {
      for (int64_t b = 0; b < p.blocks; ++b) {
        for (int64_t s = 0; s < width; s += step) run(fn, b, grp, xs + s, x_stride, tmp + s, prune::kMaxTile);
      }
      for (int64_t i = 0; i < std::min(R, g.m - grp * R); ++i) {
        std::memcpy(out + (grp * R + i) * P + t0, tmp + i * prune::kMaxTile + (t0 - s0),
                    static_cast<size_t>(r) * sizeof(float));
      }
    }
  }
}

// Task (image n, position chunk, output-channel part): the chunk's tiles, each for all of the part's channels.
void ComputeTile(const ConvCall& call, int64_t n, int64_t p0, int64_t p1, int64_t m0, int64_t m1, float* xt) {
  const Geometry& g = *call.g;
  const SparseConvKernel& k = *call.k;
  const prune::Packed<int32_t>& p = k.packed_;
  const float* x = g.direct ? call.x + n * g.c * g.h * g.w : call.buf + n * g.image;
  float* out = call.out + n * g.m * g.positions;
  const int64_t P = g.positions, T = g.tile, rows = p.rows;
  const int log_t = T == 8 ? 0 : T == 16 ? 1 : 2;
  const prune::TileFn32* table = g.direct ? k.kernels_->tile32 : k.kernels_->offset;
  const int32_t* idx = g.direct ? p.idx.data() : call.offsets;
  auto input = [&](int64_t s, int64_t width) { return TileInput(g, x, s, width, xt); };
  auto run = [&](prune::TileFn32 tile, int64_t b, int64_t m, const float* xs, float* o) {
    const int64_t j = p.ptr[b * rows + m];
    tile(p.values.data() + j, idx + j, p.ptr[b * rows + m + 1] - j, k.bias_[m], b > 0, xs, o);
  };
  int64_t t0 = p0;
  for (; t0 + T <= p1 && t0 + T <= P; t0 += T) {
    const float* xs = input(t0, T);
    for (int64_t b = 0; b < p.blocks; ++b) {
      for (int64_t m = m0; m < m1; ++m) run(table[log_t], b, m, xs, out + m * P + t0);
    }
  }
  if (t0 < p1) {
    // A ragged last tile of r < T positions: the narrowest tile of 8, 16, 32 that covers them, ending at P
    // (or, when P is narrower, starting at 0 and reading the slack), computed into tmp, of which only
    // positions [t0, P) are kept, so no output is written twice.
    const int64_t r = P - t0;
    const int log_r = r <= 8 ? 0 : r <= 16 ? 1 : 2, width = 8 << log_r;
    const int64_t s = std::max<int64_t>(0, P - width);
    const float* xs = input(s, width);
    float tmp[prune::kMaxTile];
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < p.blocks; ++b) run(table[log_r], b, m, xs, tmp);
      std::memcpy(out + m * P + t0, tmp + (t0 - s), static_cast<size_t>(r) * sizeof(float));
    }
  }
}

void ComputeTask(void* data, size_t task) {
  auto* call = static_cast<ConvCall*>(data);
  const Geometry& g = *call->g;
  const int64_t per_image = call->chunks * call->parts, t = static_cast<int64_t>(task);
  const int64_t n = t / per_image, chunk = t % per_image / call->parts;
  const SparseConvKernel& k = *call->k;
  const auto [m0, m1] = k.blocked_ ? prune::Part(*k.blocked_, t % call->parts, call->parts)
                                   : prune::Part(k.packed_, t % call->parts, call->parts);
  const int64_t p0 = chunk * call->chunk_tiles * g.tile, p1 = std::min(g.positions, p0 + call->chunk_tiles * g.tile);
  // Nothing may escape into onnxruntime's thread pool: an allocation failure is reported after the loop.
  try {
    prune::AlignedFloats xt(g.direct ? prune::AllocateAligned(g.c * g.tile) : nullptr);
    if (k.blocked_) {
      ComputeTileBlocked(*call, n, p0, p1, m0, m1, xt.get());  // m0, m1: row groups
    } else {
      ComputeTile(*call, n, p0, p1, m0, m1, xt.get());
    }
  } catch (...) {
    call->failed.store(true);
  }
}

// Copies the OW valid outputs of each computed row (of length Wq) of plane `task` (over N M) to Y.
void CompactTask(void* data, size_t task) {
  const auto* call = static_cast<const ConvCall*>(data);
  const Geometry& g = *call->g;
  const float* src = call->out + static_cast<int64_t>(task) * g.positions;
  float* y = call->y + static_cast<int64_t>(task) * g.oh * g.ow;
  for (int64_t oy = 0; oy < g.oh; ++oy) {
    std::memcpy(y + oy * g.ow, src + oy * g.wq, static_cast<size_t>(g.ow) * sizeof(float));
  }
}

int64_t OutputSize(int64_t size, int64_t pads, int64_t kernel, int64_t stride, int64_t dilation) {
  const int64_t span = size + pads - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

}  // namespace

SparseConvKernel::SparseConvKernel(const OrtApi* api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();
  present_inputs_ = onnxopt::PresentInputs(kinfo);
  if (present_inputs_ != 4 && present_inputs_ != 5) {
    Fail(where, "expects inputs (X, values, indices, row_ptr) or (X, values, indices, row_ptr, bias), got " +
                    std::to_string(present_inputs_));
  }
  ReadAttributes(api, info, where);
  const prune::Csr csr = prune::ReadCsr(kinfo, c_ * kh_ * kw_, where);
  m_ = csr.rows;
  nnz_ = static_cast<int64_t>(csr.values.size());
  bias_ = prune::ReadBias(kinfo, present_inputs_, m_, "M", where);
  kernels_ = &prune::ChooseKernels();
  const prune::BlockShape shape = prune::ChooseBlockShape(csr, false, where);
  if (shape.Blocked()) {
    blocked_ = std::make_shared<const prune::Blocked<int32_t>>(
        prune::PackBlocked<int32_t>(csr, shape, 1, BlockChannels() * kh_ * kw_));
    bias_blocked_ = bias_;
    bias_blocked_.resize(static_cast<size_t>(blocked_->rows * shape.r), 0.0f);
    block_kernels_ = &prune::ChooseBlockKernels();
  } else {
    packed_ = prune::Pack<int32_t>(csr, 1, BlockChannels() * kh_ * kw_);
  }
  // Each nonzero's (or R x 1 block's) column (c kh + dy) kw + dx split into its phase plane and shift (see
  // the header); the offsets they make depend on the input size and are computed per size (Offsets).
  const std::vector<int32_t>& cols = blocked_ ? blocked_->idx : packed_.idx;
  const size_t nnz = cols.size();
  plane_.resize(nnz), qy_.resize(nnz), qx_.resize(nnz);
  for (size_t j = 0; j < nnz; ++j) {
    const int64_t col = cols[j], c = col / (kh_ * kw_), ry = col / kw_ % kh_ * dh_, rx = col % kw_ * dw_;
    plane_[j] = static_cast<int32_t>((c * sh_ + ry % sh_) * sw_ + rx % sw_);
    qy_[j] = static_cast<int32_t>(ry / sh_);
    qx_[j] = static_cast<int32_t>(rx / sw_);
  }
}

void SparseConvKernel::ReadAttributes(const OrtApi* api, const OrtKernelInfo* info, const std::string& where) {
  const auto c = IntAttribute(api, info, "C", where);
  if (!c || *c < 1) Fail(where, "attribute 'C' (input channels, >= 1) is required");
  if (*c > kMaxAttribute) Fail(where, "attribute 'C' is too large: " + std::to_string(*c));
  c_ = *c;
  const auto ks = IntsAttribute(api, info, "kernel_shape", where);
  if (!ks || ks->size() != 2 || (*ks)[0] < 1 || (*ks)[1] < 1 || (*ks)[0] > kMaxAttribute ||
      (*ks)[1] > kMaxAttribute) {
    Fail(where, "attribute 'kernel_shape' must be 2 positive ints [kh, kw]" +
                    (ks ? ", got " + ShapeStr(*ks) : std::string(", and is required")));
  }
  kh_ = (*ks)[0];
  kw_ = (*ks)[1];
  if (c_ * kh_ * kw_ > std::numeric_limits<int32_t>::max()) Fail(where, "C kh kw must be below 2^31");
  auto pair = [&](const char* name, int64_t& a, int64_t& b) {
    if (auto v = IntsAttribute(api, info, name, where)) {
      if (v->size() != 2 || (*v)[0] < 1 || (*v)[1] < 1 || (*v)[0] > kMaxAttribute || (*v)[1] > kMaxAttribute) {
        Fail(where, std::string("attribute '") + name + "' must be 2 ints in [1, 2^24], got " + ShapeStr(*v));
      }
      a = (*v)[0];
      b = (*v)[1];
    }
  };
  pair("strides", sh_, sw_);
  pair("dilations", dh_, dw_);
  const auto pads = ReadPads(api, info, where);
  if (*std::max_element(pads.begin(), pads.end()) > kMaxAttribute) {
    Fail(where, "attribute 'pads' must be at most 2^24, got " + ShapeStr({pads[0], pads[1], pads[2], pads[3]}));
  }
  std::copy(pads.begin(), pads.end(), pads_);
  if (auto group = IntAttribute(api, info, "group", where); group && *group != 1) {
    Fail(where, "only group = 1 is supported, got " + std::to_string(*group));
  }
  if (auto ap = StringAttribute(api, info, "auto_pad", where); ap && *ap != "NOTSET" && !ap->empty()) {
    Fail(where, "auto_pad must be NOTSET (give explicit pads), got " + *ap);
  }
}

int64_t SparseConvKernel::BlockChannels() const {
  // What a tile of 32 outputs reads of one channel: kh rows (times sw column phases) of about 32 + the kernel's
  // reach floats, plus a cache line of misalignment; the channels of a block read at most kL1Bytes together.
  const int64_t reach = (kw_ - 1) * dw_ / sw_;
  const int64_t bytes = kh_ * sw_ * (prune::kMaxTile + reach + 8) * static_cast<int64_t>(sizeof(float));
  const int64_t blocks = (c_ * bytes + kL1Bytes - 1) / kL1Bytes;
  return (c_ + blocks - 1) / blocks;
}

std::shared_ptr<const std::vector<int32_t>> SparseConvKernel::Offsets(int64_t plane, int64_t wq) const {
  {
    std::lock_guard<std::mutex> lock(offsets_mu_);
    if (offsets_ && offsets_key_[0] == plane && offsets_key_[1] == wq) return offsets_;
  }
  auto fresh = std::make_shared<std::vector<int32_t>>(plane_.size());
  for (size_t j = 0; j < plane_.size(); ++j) {
    (*fresh)[j] = static_cast<int32_t>(int64_t{plane_[j]} * plane + int64_t{qy_[j]} * wq + qx_[j]);
  }
  std::lock_guard<std::mutex> lock(offsets_mu_);
  offsets_ = fresh;
  offsets_key_[0] = plane, offsets_key_[1] = wq;
  return fresh;
}

std::string SparseConvKernel::Where() const { return onnxopt::Where("SparseConv", node_name_); }

Ort::Status SparseConvKernel::Compute(OrtKernelContext* context, const Tensor<float>& X,
                                      const Tensor<float>& values, const Tensor<int32_t>& indices,
                                      const Tensor<int64_t>& row_ptr, std::optional<const Tensor<float>*> bias,
                                      Tensor<float>& Y) {
  return Guarded(Where(), [&] {
    const bool has_b = bias.has_value() && *bias != nullptr;
    prune::CheckCsrShapes(values.Shape(), indices.Shape(), row_ptr.Shape(), has_b ? &(*bias)->Shape() : nullptr,
                          m_, nnz_, Where());
    Run(context, X, bias, Y);
  });
}

void SparseConvKernel::Run(OrtKernelContext* context, const Tensor<float>& X, std::optional<const Tensor<float>*>,
                           Tensor<float>& Y) const {
  const std::string where = Where();
  const std::vector<int64_t>& xs = X.Shape();
  if (xs.size() != 4) Fail(where, "X must have rank 4 [N, C, H, W], got shape " + ShapeStr(xs));
  if (xs[1] != c_) {
    Fail(where, "X has " + std::to_string(xs[1]) + " channels (shape " + ShapeStr(xs) + ") but the op has C = " +
                    std::to_string(c_));
  }
  Geometry g;
  g.n = xs[0], g.c = c_, g.h = xs[2], g.w = xs[3], g.m = m_;
  g.oh = OutputSize(g.h, pads_[0] + pads_[2], kh_, sh_, dh_);
  g.ow = OutputSize(g.w, pads_[1] + pads_[3], kw_, sw_, dw_);
  if (g.oh <= 0 || g.ow <= 0) {
    Fail(where, "output would be empty: X " + ShapeStr(xs) + " with kernel " + std::to_string(kh_) + "x" +
                    std::to_string(kw_) + ", pads " + ShapeStr({pads_[0], pads_[1], pads_[2], pads_[3]}) +
                    " and dilations " + ShapeStr({dh_, dw_}));
  }
  float* y = Y.Allocate({g.n, m_, g.oh, g.ow});
  if (g.n == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);

  const bool unpadded = pads_[0] == 0 && pads_[1] == 0 && pads_[2] == 0 && pads_[3] == 0;
  g.direct = kh_ == 1 && kw_ == 1 && sh_ == 1 && sw_ == 1 && unpadded && g.h * g.w >= prune::kMaxTile;
  g.sh = g.direct ? 1 : sh_, g.sw = g.direct ? 1 : sw_, g.pad_top = pads_[0], g.pad_left = pads_[1];
  const int64_t qy_max = (kh_ - 1) * dh_ / sh_, qx_max = (kw_ - 1) * dw_ / sw_;
  g.hq = g.direct ? g.h : g.oh + qy_max;
  g.wq = g.direct ? g.w : g.ow + qx_max;
  g.plane = g.hq * g.wq;
  g.image = g.direct ? g.c * g.plane : g.c * g.sh * g.sw * g.plane + prune::kMaxTile + g.wq;
  if (g.image > std::numeric_limits<int32_t>::max()) {
    Fail(where, "X " + ShapeStr(xs) + " is too large: one image's phase planes exceed 2^31 floats");
  }
  g.positions = g.oh * g.wq;
  g.tile = g.positions >= 32 ? 32 : g.positions >= 16 ? 16 : 8;
  g.compact = g.wq != g.ow;

  const std::shared_ptr<const std::vector<int32_t>> offsets = Offsets(g.plane, g.wq);
  // Multiply-adds per position (a block's R weights each), and the rows that output-channel parts split.
  const int64_t nnz = static_cast<int64_t>(offsets->size()) * (blocked_ ? blocked_->r : 1);
  const int64_t part_rows = blocked_ ? blocked_->rows : m_;
  std::unique_ptr<float[]> buf(g.direct ? nullptr : new float[static_cast<size_t>(g.n * g.image)]);
  std::unique_ptr<float[]> wide(g.compact ? new float[static_cast<size_t>(g.n * g.m * g.positions)] : nullptr);
  ConvCall call;
  call.k = this;
  call.g = &g;
  call.x = X.Data();
  call.buf = buf.get();
  call.y = y;
  call.out = g.compact ? wide.get() : y;
  call.offsets = offsets->data();
  // Tasks split the positions first (each task reads only its columns of X, and all channels reuse them); the
  // output channels only when there are too few position chunks to balance the threads.
  const int64_t tiles = (g.positions + g.tile - 1) / g.tile;
  const int64_t wanted = std::clamp<int64_t>(std::max<int64_t>(nnz, m_) * g.positions / kMinTaskWork, 1, kMaxTasks);
  call.chunks = std::min(tiles, (wanted + g.n - 1) / g.n);
  call.chunk_tiles = (tiles + call.chunks - 1) / call.chunks;
  call.chunks = (tiles + call.chunk_tiles - 1) / call.chunk_tiles;
  call.parts = std::clamp<int64_t>(kMinTasks / (g.n * call.chunks), 1, part_rows);
  if (!g.direct) RunTasks(context, CopyTask, g.n * g.c, &call);
  RunTasks(context, ComputeTask, g.n * call.chunks * call.parts, &call);
  if (call.failed.load()) Fail(where, "out of memory for the input tile of a task", ORT_FAIL);
  if (g.compact) RunTasks(context, CompactTask, g.n * m_, &call);
}

Ort::Custom::OrtLiteCustomOp* MakeSparseConvOp() { return new SafeOp<SparseConvKernel>("SparseConv"); }

}  // namespace onnxopt
