// FFTConv kernel (see fftconv.h for the semantics and the math).
//
// A call runs over "super-blocks" of tiles (flattened over images and tile rows/cols) whose input spectra fit
// a fixed budget, so memory stays bounded whatever the input size. Per super-block, two ParallelFor loops:
//   1. forward: one task per (tile, group of 8 phase channels): gather the tile, 2-D real FFT, store its
//      spectrum as [tile][bin][channel group][re xk, im xk] (xk = min(C', 8): no padding lanes). With C' < 8
//      one task per floor(8 / C') tiles instead, their (tile, channel) windows packed into the 8 lanes of one
//      transform (one tile of 3 channels would leave 5 of 8 lanes idle) and its spectrum left as written;
//   2. products + inverse: one task per (up to 4 tiles of one tile row, group of 8 output channels): per
//      column strip the complex products summed over all C' channels (lanes = output channels), then that
//      strip's column inverse while it is in L1, then the row inverses, cropped to the valid outputs, plus
//      the bias. Where the task's tiles are a
//      whole tile row, its output rows are assembled a band at a time across the tiles and each channel's
//      rows (one contiguous region of Y) are streamed out with non-temporal stores: Y is far larger than
//      the caches, and plain stores would first read every line of it from DRAM.
#include "fftconv.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <memory>
#include <string>
#include <utility>

#include "kernel_util.h"
#include "ops.h"

namespace onnxopt {
namespace fftconv {

namespace {

constexpr int64_t kLanes = fft::kLanes;
constexpr int kMaxTilesPerTask = 4;                       // tiles sharing one read of the filter spectra
constexpr int kBandRows = 8;  // output rows assembled across a tile row before they are streamed to Y
constexpr int64_t kStreamMinBytes = int64_t{4} << 20;    // outputs at least this large bypass the cache
constexpr int64_t kSuperBlockBytes = int64_t{32} << 20;   // input spectra of one super-block
constexpr int64_t kMaxSpectraBytes = int64_t{1} << 30;    // filter spectra of one tile size
constexpr int kMaxTileElems = 1 << 18;                    // th * tw: bounds the per-task scratch

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int Pow2AtLeast(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// Candidate tile extents of one axis: 1 if the phase kernel is 1 (and allowed), else powers of two from the
// kernel extent up to one tile covering the whole output.
std::vector<int> Candidates(const Axis& a, bool allow_one, int cap) {
  std::vector<int> out;
  if (allow_one && a.keff == 1) out.push_back(1);
  const int lo = std::max(Pow2AtLeast(a.keff), 2);
  const int hi = std::max(lo, std::min(cap, Pow2AtLeast(a.out + a.keff - 1)));
  for (int t = lo; t <= hi; t *= 2) out.push_back(t);
  return out;
}

double Cost(const Geometry& g, int th, int tw) {
  const double tiles = static_cast<double>(g.n) * CeilDiv(g.u.out, th - g.u.keff + 1) *
                       CeilDiv(g.v.out, tw - g.v.keff + 1);
  const double bins = th * (tw / 2 + 1.0);
  // Relative costs in V8 operations, fitted roughly on this machine's two goal shapes.
  const double fft = tiles * (g.cgroups + g.mgroups) * th * tw * (std::log2(th * tw) + 2.0) * 0.6;
  const double prod = tiles * bins * g.mgroups * g.cp * 1.5;
  const double spectra_bytes = bins * g.mgroups * g.cp * 2.0 * kLanes * 4;
  const double reads = CeilDiv(static_cast<int64_t>(tiles), kMaxTilesPerTask);
  const double mem = reads * spectra_bytes / (spectra_bytes > (4 << 20) ? 8.0 : 32.0);
  return fft + prod + mem;
}

}  // namespace

std::pair<int, int> ChooseTiles(const Geometry& g) {
  std::pair<int, int> best{0, 0};
  double best_cost = std::numeric_limits<double>::infinity();
  for (int th : Candidates(g.u, true, 1024)) {
    for (int tw : Candidates(g.v, false, 8192)) {
      if (static_cast<int64_t>(th) * tw > kMaxTileElems) continue;
      const double bytes = th * (tw / 2 + 1.0) * g.mgroups * g.cp * 2.0 * kLanes * 4;
      if (bytes > kMaxSpectraBytes && best.first != 0) continue;
      const double cost = Cost(g, th, tw);
      if (cost < best_cost) {
        best_cost = cost;
        best = {th, tw};
      }
    }
  }
  return best;
}

namespace {

// The phase channel c' = (c s_u + p_u) s_v + p_v of the (transposed) problem, decomposed.
struct Phase {
  int64_t c, pu, pv;
};

Phase SplitChannel(const Geometry& g, int64_t cp) {
  const int64_t pv = cp % g.v.stride;
  const int64_t rest = cp / g.v.stride;
  return {rest / g.u.stride, rest % g.u.stride, pv};
}

struct Call {
  const Geometry* g;
  const Spectra* s;
  const fft::Kernels* k;
  const float* x;
  const float* bias;
  float* y;
  float* xspec;        // [tiles of the super-block][bins][cgroups][re xk, im xk]
  int64_t tile_begin;  // first tile of the super-block
  int64_t tile_count;  // tiles in the super-block
  // Inverse tasks: with row_tasks, each covers one whole tile row (the super-block holds whole tile rows) and
  // streams its output rows; otherwise runs of kMaxTilesPerTask tiles of the flattened order.
  bool row_tasks = false;
  // C' < 8: the forward packs 8 (tile, channel) items into the lanes of one transform (one channel per tile
  // would leave most lanes idle) and its spectra stay as it writes them: xspec [group][re bins V8, im bins V8].
  bool packed = false;
  std::atomic<bool> failed{false};
};

// Tile t (flattened) -> image and tile row/col.
void TileCoords(const Geometry& g, int64_t t, int64_t& n, int64_t& tu, int64_t& tv) {
  tv = t % g.v.tiles;
  tu = (t / g.v.tiles) % g.u.tiles;
  n = t / g.TilesPerImage();
}

// The th x tw window of phase channels [8 cg, 8 cg + 8) of tile t into tile [th][tw][8]; zero outside X.
void GatherTile(const Call& call, int64_t t, int64_t cg, float* tile) {
  const Geometry& g = *call.g;
  const fft::Plan& p = call.s->plan;
  std::fill(tile, tile + static_cast<int64_t>(p.th) * p.tw * kLanes, 0.0f);
  int64_t n, tu, tv;
  TileCoords(g, t, n, tu, tv);
  for (int64_t l = 0; l < kLanes && cg * kLanes + l < g.cp; ++l) {
    const Phase ph = SplitChannel(g, cg * kLanes + l);
    const float* plane = call.x + (n * g.c + ph.c) * g.u.in * g.v.in;
    for (int a = 0; a < p.th; ++a) {
      const int64_t iu = g.u.stride * (tu * g.u.tile_out + a) + ph.pu - g.u.pad;
      if (iu < 0 || iu >= g.u.in) continue;
      const float* row = plane + iu * g.u.x_step;
      float* dst = tile + static_cast<int64_t>(a) * p.tw * kLanes + l;
      const int64_t v0 = g.v.stride * tv * g.v.tile_out + ph.pv - g.v.pad;  // X index of column b = 0
      for (int b = 0; b < p.tw; ++b) {
        const int64_t iv = v0 + g.v.stride * b;
        if (iv >= 0 && iv < g.v.in) dst[b * kLanes] = row[iv * g.v.x_step];
      }
    }
  }
}

void ForwardTask(void* data, size_t index) {
  auto* call = static_cast<Call*>(data);
  try {  // nothing may escape into onnxruntime's thread pool
    const Geometry& g = *call->g;
    const fft::Plan& p = call->s->plan;
    const int64_t local = static_cast<int64_t>(index) / g.cgroups;
    const int64_t cg = static_cast<int64_t>(index) % g.cgroups;
    // Scratch left uninitialised: every float is written before it is read (a zero fill cost as much as
    // the transforms on large tiles).
    std::unique_ptr<float[]> buf(new float[(static_cast<int64_t>(p.th) * p.tw + 2 * p.bins) * kLanes]);
    float* tile = buf.get();
    float* re = tile + static_cast<int64_t>(p.th) * p.tw * kLanes;
    float* im = re + p.bins * kLanes;
    GatherTile(*call, call->tile_begin + local, cg, tile);
    call->k->forward(p, tile, re, im);
    float* dst = call->xspec + (local * p.bins * g.cgroups + cg) * 2 * g.xk;
    for (int f = 0; f < p.bins; ++f) {
      float* d = dst + static_cast<int64_t>(f) * g.cgroups * 2 * g.xk;
      std::copy(re + f * kLanes, re + f * kLanes + g.xk, d);
      std::copy(im + f * kLanes, im + f * kLanes + g.xk, d + g.xk);
    }
  } catch (...) {
    call->failed.store(true);
  }
}

// Packed forward task: the tiles [index * tpg, index * tpg + tpg) of the super-block, tpg = floor(8 / C'),
// one (tile, channel) per lane: lane l is channel l % C' of tile l / C' (a tile never straddles two groups,
// so that a tile's channels are consecutive lanes for the products), the th x tw window of its tile's phase
// channel, zero outside X; spectra straight into xspec.
void PackedForwardTask(void* data, size_t index) {
  auto* call = static_cast<Call*>(data);
  try {
    const Geometry& g = *call->g;
    const fft::Plan& p = call->s->plan;
    const int64_t tile_floats = static_cast<int64_t>(p.th) * p.tw * kLanes;
    std::unique_ptr<float[]> buf(new float[tile_floats]);
    float* tile = buf.get();
    const int64_t tpg = kLanes / g.cp;
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t local = static_cast<int64_t>(index) * tpg + l / g.cp;
      float* lane = tile + l;
      if (l >= tpg * g.cp || local >= call->tile_count) {  // an idle lane: zeros, not garbage that could be NaN or denormal
        for (int64_t e = 0; e < tile_floats; e += kLanes) lane[e] = 0.0f;
        continue;
      }
      int64_t n, tu, tv;
      TileCoords(g, call->tile_begin + local, n, tu, tv);
      const Phase ph = SplitChannel(g, l % g.cp);
      const float* plane = call->x + (n * g.c + ph.c) * g.u.in * g.v.in;
      const int64_t v0 = g.v.stride * tv * g.v.tile_out + ph.pv - g.v.pad;  // X index of column b = 0
      // Columns [b0, b1) lie inside X; the others are padding.
      const int64_t b0 = std::clamp<int64_t>(CeilDiv(-v0, g.v.stride), 0, p.tw);
      const int64_t b1 = std::clamp<int64_t>(CeilDiv(g.v.in - v0, g.v.stride), b0, p.tw);
      for (int a = 0; a < p.th; ++a) {
        float* dst = lane + static_cast<int64_t>(a) * p.tw * kLanes;
        const int64_t iu = g.u.stride * (tu * g.u.tile_out + a) + ph.pu - g.u.pad;
        if (iu < 0 || iu >= g.u.in) {
          for (int b = 0; b < p.tw; ++b) dst[b * kLanes] = 0.0f;
          continue;
        }
        const float* row = plane + iu * g.u.x_step;
        for (int64_t b = 0; b < b0; ++b) dst[b * kLanes] = 0.0f;
        for (int64_t b = b0; b < b1; ++b) dst[b * kLanes] = row[(v0 + g.v.stride * b) * g.v.x_step];
        for (int64_t b = b1; b < p.tw; ++b) dst[b * kLanes] = 0.0f;
      }
    }
    float* re = call->xspec + static_cast<int64_t>(index) * 2 * p.bins * kLanes;
    call->k->forward(p, tile, re, re + p.bins * kLanes);
  } catch (...) {
    call->failed.store(true);
  }
}

// Valid outputs of tile t, rows [0, rows) x cols [0, cols) of out [rows][tw][8], into Y plus the bias.
void ScatterTile(const Call& call, int64_t t, int64_t mg, const float* out, int rows) {
  const Geometry& g = *call.g;
  const int tw = call.s->plan.tw;
  int64_t n, tu, tv;
  TileCoords(g, t, n, tu, tv);
  const int64_t cols = std::min(g.v.tile_out, g.v.out - tv * g.v.tile_out);
  const int64_t ou0 = tu * g.u.tile_out, ov0 = tv * g.v.tile_out;
  const int lanes = static_cast<int>(std::min<int64_t>(kLanes, g.m - mg * kLanes));
  float bias[kLanes] = {};
  float* dst[kLanes] = {};
  for (int l = 0; l < lanes; ++l) {
    const int64_t m = mg * kLanes + l;
    if (call.bias) bias[l] = call.bias[m];
    dst[l] = call.y + (n * g.m + m) * g.u.out * g.v.out + ou0 * g.u.y_step + ov0 * g.v.y_step;
  }
  if (g.v.y_step == 1) {  // output rows contiguous: the vector path
    call.k->scatter(out, rows, static_cast<int>(cols), tw, dst, g.u.y_step, bias, lanes);
    return;
  }
  for (int l = 0; l < lanes; ++l) {  // transposed problem: output rows are the tile's columns
    for (int a = 0; a < rows; ++a) {
      const float* src = out + static_cast<int64_t>(a) * tw * kLanes + l;
      for (int64_t c = 0; c < cols; ++c) dst[l][a * g.u.y_step + c * g.v.y_step] = src[c * kLanes] + bias[l];
    }
  }
}

// The tiles [first, first + nt) (local to the super-block) of inverse task `run`.
void TaskTiles(const Call& call, int64_t run, int64_t& first, int& nt) {
  if (call.row_tasks) {
    first = run * call.g->v.tiles;
    nt = static_cast<int>(call.g->v.tiles);
  } else {
    first = run * kMaxTilesPerTask;
    nt = static_cast<int>(std::min<int64_t>(kMaxTilesPerTask, call.tile_count - first));
  }
}

// Inverse tasks per super-block.
int64_t TaskRuns(const Call& call) {
  if (call.row_tasks) return call.tile_count / call.g->v.tiles;
  return CeilDiv(call.tile_count, kMaxTilesPerTask);
}

void InverseTask(void* data, size_t index) {
  auto* call = static_cast<Call*>(data);
  try {
    const Geometry& g = *call->g;
    const fft::Plan& p = call->s->plan;
    const int64_t mg = static_cast<int64_t>(index) % g.mgroups;
    int64_t first;
    int nt;
    TaskTiles(*call, static_cast<int64_t>(index) / g.mgroups, first, nt);
    // Whole output rows: the task's tiles are a full tile row and output rows are contiguous in Y, so each
    // output channel's rows of this tile row are one contiguous region of Y, written as one stream.
    const bool full_rows = call->row_tasks;
    const int64_t ys = 2 * p.bins * kLanes;  // one tile's re and im planes
    const int64_t out_floats = full_rows ? kBandRows * g.v.out * kLanes
                                         : static_cast<int64_t>(p.th) * p.tw * kLanes;
    const int64_t stage_ld = full_rows ? g.v.out + 2 * kLanes : 0;
    std::unique_ptr<float[]> buf(new float[nt * ys + out_floats + kLanes * stage_ld]);
    float* y = buf.get();
    float* out = y + nt * ys;
    // Where each tile's input spectra lie in the super-block's xspec (fft.h: product_cols).
    int64_t xt[fft::kLanes] = {}, xg, xf, xi;
    if (call->packed) {  // [group][re bins V8, im bins V8], tile = a run of C' lanes of a group
      const int64_t tpg = kLanes / g.cp;
      for (int i = 0; i < nt; ++i) {
        const int64_t t = first + i;
        xt[i] = t / tpg * 2 * p.bins * kLanes + t % tpg * g.cp;
      }
      xg = 0;
      xf = kLanes;
      xi = p.bins * kLanes;
    } else {  // [tile][bin][channel group][re xk, im xk]
      for (int i = 0; i < nt; ++i) xt[i] = (first + i) * p.bins * g.cgroups * 2 * g.xk;
      xg = 2 * g.xk;
      xf = g.cgroups * 2 * g.xk;
      xi = g.xk;
    }
    call->k->product_cols(p, call->s->w.data() + mg * p.bins * g.cp * 2 * kLanes, call->xspec, xt, nt, g.cp,
                          xg, xf, xi, y, ys);
    if (!full_rows) {
      for (int i = 0; i < nt; ++i) {
        const int64_t t = call->tile_begin + first + i;
        int64_t n, tu, tv;
        TileCoords(g, t, n, tu, tv);
        const int rows = static_cast<int>(std::min(g.u.tile_out, g.u.out - tu * g.u.tile_out));
        call->k->inverse_rows(p, y + i * ys, y + i * ys + p.bins * kLanes, 0, rows, out, p.tw, p.tw);
        ScatterTile(*call, t, mg, out, rows);
      }
      return;
    }
    int64_t n, tu, tv;
    TileCoords(g, call->tile_begin + first, n, tu, tv);
    const int rows = static_cast<int>(std::min(g.u.tile_out, g.u.out - tu * g.u.tile_out));
    fft::RowStream rs;
    rs.lanes = static_cast<int>(std::min<int64_t>(kLanes, g.m - mg * kLanes));
    rs.stage = out + out_floats;
    rs.stage_ld = stage_ld;
    for (int l = 0; l < rs.lanes; ++l) {
      const int64_t m = mg * kLanes + l;
      if (call->bias) rs.bias[l] = call->bias[m];
      rs.dst[l] = call->y + (n * g.m + m) * g.u.out * g.v.out + tu * g.u.tile_out * g.u.y_step;
    }
    // A band of output rows at a time across all the tiles, so that the assembled rows stay in cache.
    for (int a = 0; a < rows; a += kBandRows) {
      const int band = std::min(kBandRows, rows - a);
      for (int i = 0; i < nt; ++i) {
        const int64_t c0 = static_cast<int64_t>(i) * g.v.tile_out;
        const int cols = static_cast<int>(std::min(g.v.tile_out, g.v.out - c0));
        call->k->inverse_rows(p, y + i * ys, y + i * ys + p.bins * kLanes, a, band, out + c0 * kLanes, g.v.out,
                              cols);
      }
      call->k->stream_rows(out, band, static_cast<int>(g.v.out), g.v.out, rs);
    }
    call->k->stream_end(rs);
  } catch (...) {
    call->failed.store(true);
  }
}

}  // namespace
}  // namespace fftconv

using fftconv::Axis;
using fftconv::Geometry;
using fftconv::Spectra;
using Ort::Custom::Tensor;

FFTConvKernel::FFTConvKernel(const OrtApi* api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();

  present_inputs_ = ConvInputs(kinfo, where);

  pads_ = ReadPads(api, info, where);
  if (auto strides = IntsAttribute(api, info, "strides", where)) {
    if (strides->size() != 2 || (*strides)[0] < 1 || (*strides)[1] < 1) {
      Fail(where, "attribute 'strides' must be 2 positive values [sh, sw], got " + ShapeStr(*strides));
    }
    strides_[0] = (*strides)[0];
    strides_[1] = (*strides)[1];
  }
  RequireAllOnes(api, info, "dilations", where);
  const int64_t group = IntAttribute(api, info, "group", where).value_or(1);
  if (group != 1) Fail(where, "only group = 1 is supported, got " + std::to_string(group));

  const ConstantTensor w = ConstantFloatInput(kinfo, 1, "W", where);
  if (w.shape.size() != 4 || w.shape[0] < 1 || w.shape[1] < 1 || w.shape[2] < 1 || w.shape[3] < 1) {
    Fail(where, "W must have shape [M, C, KH, KW] with every dimension >= 1, got " + ShapeStr(w.shape));
  }
  m_ = w.shape[0];
  c_ = w.shape[1];
  kh_ = w.shape[2];
  kw_ = w.shape[3];
  if (auto ks = IntsAttribute(api, info, "kernel_shape", where)) {
    if (*ks != std::vector<int64_t>{kh_, kw_}) {
      Fail(where, "kernel_shape " + ShapeStr(*ks) + " does not match W's shape " + ShapeStr(w.shape));
    }
  }
  w_ = w.data;
  // A kernel that is 1 wide (after the polyphase split) but taller runs transposed: the real FFT then runs
  // along H, the long axis, instead of over single columns.
  const int64_t keff_h = (kh_ + strides_[0] - 1) / strides_[0];
  const int64_t keff_w = (kw_ + strides_[1] - 1) / strides_[1];
  transposed_ = keff_w == 1 && keff_h > 1;

  bias_ = ConstantBias(kinfo, present_inputs_, m_, "M", where);
  kernels_ = HasAvx2Fma() ? &fft::Avx2Kernels() : &fft::PortableKernels();
}

std::string FFTConvKernel::Where() const { return onnxopt::Where("FFTConv", node_name_); }

Geometry FFTConvKernel::MakeGeometry(const std::vector<int64_t>& xs) const {
  const std::string where = Where();
  Geometry g;
  g.n = xs[0];
  g.c = xs[1];
  g.m = m_;
  Axis h, w;
  h.in = xs[2];
  h.pad = pads_[0];
  h.stride = strides_[0];
  h.k = kh_;
  h.x_step = xs[3];
  w.in = xs[3];
  w.pad = pads_[1];
  w.stride = strides_[1];
  w.k = kw_;
  w.x_step = 1;
  const int64_t span_h = h.in + pads_[0] + pads_[2] - kh_, span_w = w.in + pads_[1] + pads_[3] - kw_;
  if (g.n < 0 || h.in < 0 || w.in < 0) Fail(where, "X has a negative dimension: " + ShapeStr(xs));
  if (span_h < 0 || span_w < 0) {
    Fail(where, "output would be empty: X spatial " + std::to_string(h.in) + "x" + std::to_string(w.in) +
                    " with pads " + ShapeStr({pads_[0], pads_[1], pads_[2], pads_[3]}) +
                    " is smaller than the " + std::to_string(kh_) + "x" + std::to_string(kw_) + " kernel");
  }
  h.out = span_h / h.stride + 1;
  w.out = span_w / w.stride + 1;
  h.y_step = w.out;
  w.y_step = 1;
  h.keff = (kh_ + h.stride - 1) / h.stride;
  w.keff = (kw_ + w.stride - 1) / w.stride;
  g.u = transposed_ ? w : h;
  g.v = transposed_ ? h : w;
  g.cp = g.c * h.stride * w.stride;
  g.cgroups = (g.cp + fft::kLanes - 1) / fft::kLanes;
  g.mgroups = (g.m + fft::kLanes - 1) / fft::kLanes;
  g.xk = std::min<int64_t>(g.cp, fft::kLanes);
  const auto [th, tw] = fftconv::ChooseTiles(g);
  g.u.t = th;
  g.v.t = tw;
  for (Axis* a : {&g.u, &g.v}) {
    a->tile_out = a->t - a->keff + 1;
    a->tiles = (a->out + a->tile_out - 1) / a->tile_out;
  }
  return g;
}

std::shared_ptr<const Spectra> FFTConvKernel::SpectraFor(const Geometry& g) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& slot = spectra_[{g.u.t, g.v.t}];
  if (slot) return slot;
  auto s = std::make_shared<Spectra>(g.u.t, g.v.t);
  const fft::Plan& p = s->plan;
  const int64_t L = fft::kLanes;
  s->w.assign(static_cast<size_t>(g.mgroups * p.bins * g.cp * 2 * L), 0.0f);
  std::vector<float> buf(static_cast<size_t>((static_cast<int64_t>(p.th) * p.tw + 2 * p.bins) * L));
  float* tile = buf.data();
  float* re = tile + static_cast<int64_t>(p.th) * p.tw * L;
  float* im = re + p.bins * L;
  const float scale = 1.0f / static_cast<float>(p.th * p.tw);  // the unnormalised inverse's factor
  for (int64_t m = 0; m < m_; ++m) {
    for (int64_t cg = 0; cg < g.cgroups; ++cg) {
      // Phase filters w_{c,pu,pv}[a, b] = W[m, c, s_u a + pu, s_v b + pv] of 8 phase channels, as lanes.
      std::fill(tile, tile + static_cast<int64_t>(p.th) * p.tw * L, 0.0f);
      for (int64_t l = 0; l < L && cg * L + l < g.cp; ++l) {
        const auto ph = fftconv::SplitChannel(g, cg * L + l);
        for (int64_t a = 0; a < g.u.keff; ++a) {
          for (int64_t b = 0; b < g.v.keff; ++b) {
            const int64_t ku = g.u.stride * a + ph.pu, kv = g.v.stride * b + ph.pv;
            if (ku >= g.u.k || kv >= g.v.k) continue;
            const int64_t kh = transposed_ ? kv : ku, kw = transposed_ ? ku : kv;
            tile[(a * p.tw + b) * L + l] = w_[((m * c_ + ph.c) * kh_ + kh) * kw_ + kw] * scale;
          }
        }
      }
      kernels_->forward(p, tile, re, im);
      // Correlation, not convolution: the conjugate spectrum; lanes become output channels. Bins in the
      // order product_cols reads them (column strip by strip, row by row within one): one forward stream.
      for (int64_t f = 0; f < p.bins; ++f) {
        const int64_t r = f / p.nbw, col = f % p.nbw, c0 = col / p.strip * p.strip;
        const int64_t fs = p.th * c0 + r * std::min<int64_t>(p.strip, p.nbw - c0) + (col - c0);
        for (int64_t l = 0; l < L && cg * L + l < g.cp; ++l) {
          float* d = s->w.data() + (((m / L) * p.bins + fs) * g.cp + cg * L + l) * 2 * L + m % L;
          d[0] = re[f * L + l];
          d[L] = -im[f * L + l];
        }
      }
    }
  }
  slot = std::move(s);
  return slot;
}

Ort::Status FFTConvKernel::Compute(OrtKernelContext* context, const Tensor<float>& X, const Tensor<float>& W,
                                   std::optional<const Tensor<float>*> B, Tensor<float>& Y) {
  return Guarded(Where(), [&] { Run(context, X, W, B, Y); });
}

void FFTConvKernel::Run(OrtKernelContext* context, const Tensor<float>& X, const Tensor<float>& W,
                        std::optional<const Tensor<float>*> B, Tensor<float>& Y) {
  const std::string where = Where();
  const std::vector<int64_t>& xs = X.Shape();
  if (xs.size() != 4) Fail(where, "X must have rank 4 [N, C, H, W], got shape " + ShapeStr(xs));
  if (xs[1] != c_) {
    Fail(where, "X has " + std::to_string(xs[1]) + " channels (shape " + ShapeStr(xs) +
                    ") but W expects C = " + std::to_string(c_) + " (W shape " +
                    ShapeStr({m_, c_, kh_, kw_}) + ")");
  }
  // W and B are the constants read at kernel creation; their run-time shapes must still agree.
  const bool has_b = B.has_value() && *B != nullptr;
  CheckConstantShapes(W.Shape(), {m_, c_, kh_, kw_}, has_b ? &(*B)->Shape() : nullptr, m_, where);
  const Geometry g = MakeGeometry(xs);
  const int64_t oh = transposed_ ? g.v.out : g.u.out, ow = transposed_ ? g.u.out : g.v.out;
  float* y = Y.Allocate({g.n, g.m, oh, ow});
  const int64_t total = g.n * g.TilesPerImage();
  if (total == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);
  const std::shared_ptr<const Spectra> spectra = SpectraFor(g);
  const fft::Plan& p = spectra->plan;

  const bool packed = g.cp < fftconv::kLanes;
  const int64_t tile_bytes = p.bins * g.cgroups * 2 * g.xk * 4;
  int64_t block = std::clamp<int64_t>(fftconv::kSuperBlockBytes / tile_bytes, 1, total);
  // Tasks of whole tile rows that stream their output rows, where that pays: a tile row of at most
  // kMaxTilesPerTask tiles (a task's scratch and its share of the filter-spectra reads stay those of the
  // runs of kMaxTilesPerTask tiles), output rows contiguous (not transposed), and an output too large to stay
  // in cache anyway. A small output (the 5x5 64->64 layer at 56x56: 0.8 MB) is better left in cache with
  // plain stores for whoever reads it next, and tile rows of 2 or 3 tiles would read the large filter
  // spectra of many channels up to twice as often (measured 2.7 -> 3.6 ms there).
  const int64_t y_bytes = g.n * g.m * g.u.out * g.v.out * 4;
  const bool row_tasks = g.v.y_step == 1 && g.v.tiles <= fftconv::kMaxTilesPerTask && block >= g.v.tiles &&
                         y_bytes >= fftconv::kStreamMinBytes;
  if (row_tasks) {
    block = block / g.v.tiles * g.v.tiles;
  } else if (block > fftconv::kMaxTilesPerTask) {
    block = block / fftconv::kMaxTilesPerTask * fftconv::kMaxTilesPerTask;
  }
  // Not zero-filled: the forward tasks write every float the products read.
  // Packed: groups of floor(8 / C') whole tiles.
  const int64_t tpg = packed ? fftconv::kLanes / g.cp : 1;
  const int64_t xspec_floats = packed ? fftconv::CeilDiv(block, tpg) * 2 * p.bins * fftconv::kLanes
                                      : block * tile_bytes / 4;
  std::unique_ptr<float[]> xspec(new float[static_cast<size_t>(xspec_floats)]);

  for (int64_t begin = 0; begin < total; begin += block) {
    fftconv::Call call;
    call.g = &g;
    call.s = spectra.get();
    call.k = kernels_;
    call.x = X.Data();
    call.bias = bias_.empty() ? nullptr : bias_.data();
    call.y = y;
    call.xspec = xspec.get();
    call.tile_begin = begin;
    call.tile_count = std::min(block, total - begin);
    call.row_tasks = row_tasks;
    call.packed = packed;
    if (packed) {
      RunTasks(context, fftconv::PackedForwardTask, fftconv::CeilDiv(call.tile_count, tpg), &call);
    } else {
      RunTasks(context, fftconv::ForwardTask, call.tile_count * g.cgroups, &call);
    }
    if (!call.failed.load()) {
      RunTasks(context, fftconv::InverseTask, fftconv::TaskRuns(call) * g.mgroups, &call);
    }
    if (call.failed.load()) Fail(where, "out of memory for the scratch of a block of tiles", ORT_FAIL);
  }
}

Ort::Custom::OrtLiteCustomOp* MakeFFTConvOp() { return new SafeOp<FFTConvKernel>("FFTConv"); }

}  // namespace onnxopt
