// LowBitConv kernel: ONNX Conv (NCHW, group 1) whose weight A [M, C, kh, kw] is stored as the `lowbit` codes of
// its im2col form (lowbit.h, one column of codes per output filter, groups along C kh kw; numpy reference
// onnxopt/reference/lowbit.py, lowbit_conv).
//
// Per call: (1) the codes are dequantized into panels of kPanel = 8 filters, each filter a row of Kp floats
// (Kernels::dequant, one task per panel); the resident weight stays at bits / 8 bytes per weight, the float
// panels live for the call only (M Kp floats, as the dense weight; their cost, M K unpacks, is 1 / (OH OW) of
// the multiply-adds). (2) Y[m][p] = B[m] + sum_k A[m][k] col[k][p] over the im2col matrix col (k = (c kh + dy)
// kw + dx, p = oy OW + ox), never stored whole: tasks over (image, chunk of kPixels output pixels) walk K in
// blocks of kBlockK rows and gather each block of their pixels straight from X into a contiguous [rows][pixels]
// buffer (row segments copied per output row, zeros for the padding; 1x1 convolutions with stride 1 and no
// padding copy runs of X), which stays in L1 while every panel runs over it through Kernels::conv_tile (an
// AVX2 4-filter x 24-pixel register block, or the portable loop). Reading the block in place from a stored
// im2col matrix was 4.5x slower (its rows lie OH OW floats apart: a page per k), and storing that matrix cost
// a write and a read of C kh kw OH OW floats per image.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "kernel_util.h"
#include "lowbit.h"
#include "lowbit_load.h"
#include "ops.h"

namespace onnxopt {

namespace {

constexpr int64_t kPixels = 48;        // output pixels per task (two 24-pixel register blocks)
constexpr int64_t kBlockK = 128;       // im2col rows per block: 128 x 48 floats = 24 KiB, within L1
constexpr int64_t kMaxAttr = 1 << 20;  // bound of C, M, kernel sizes, strides, pads, dilations
constexpr int64_t kMaxFloats = int64_t{1} << 31;  // bound of the per-call buffers (8 GiB)

}  // namespace

struct LowBitConvKernel {
  LowBitConvKernel(const OrtApi* api, const OrtKernelInfo* info);
  size_t PresentInputs() const { return present_inputs_; }
  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<uint8_t>& Q, const Ort::Custom::Tensor<float>& S,
                      const Ort::Custom::Tensor<uint8_t>& Z, std::optional<const Ort::Custom::Tensor<float>*> B,
                      Ort::Custom::Tensor<float>& Y);
  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X, const Ort::Custom::Tensor<uint8_t>& Q,
           const Ort::Custom::Tensor<float>& S, const Ort::Custom::Tensor<uint8_t>& Z,
           std::optional<const Ort::Custom::Tensor<float>*> B, Ort::Custom::Tensor<float>& Y);
  std::string Where() const { return onnxopt::Where("LowBitConv", node_name_); }

  std::string node_name_;
  size_t present_inputs_ = 0;
  int64_t c_ = 0, m_ = 0, kh_ = 0, kw_ = 0, sh_ = 1, sw_ = 1, dh_ = 1, dw_ = 1;
  std::array<int64_t, 4> pads_{0, 0, 0, 0};
  bool direct_ = false;  // 1x1, stride 1, no padding: X is its own im2col matrix
  lowbit::Weights w_;
  std::vector<float> bias_;  // [M] or empty
  const lowbit::Kernels* kern_ = nullptr;
};

namespace {

struct Call {
  const LowBitConvKernel* k = nullptr;
  float* panels = nullptr;  // [tiles][kPanel][Kp]
  const float* x = nullptr;  // the images [N][C][H][W]
  float* y = nullptr;        // [N][M][P]
  int64_t h = 0, w = 0, oh = 0, ow = 0, chunks = 0;  // chunks: pixel chunks per image
  std::atomic<bool> failed{false};
};

// Task t: panel t (filters 8 t .. 8 t + 7; the rows of missing filters are zeros: the register block reads
// four rows whatever the count it stores).
void PanelTask(void* data, size_t t) {
  auto* call = static_cast<Call*>(data);
  const lowbit::Weights& w = call->k->w_;
  const int64_t n0 = static_cast<int64_t>(t) * lowbit::kPanel, cols = std::min(lowbit::kPanel, w.n - n0);
  float* panel = call->panels + n0 * w.kp;
  call->k->kern_->dequant(w, n0, cols, panel);
  std::fill(panel + cols * w.kp, panel + lowbit::kPanel * w.kp, 0.0f);
}

// dst[0, n) = src[0, n): the runs are short on small images (7 floats at 7x7), where a call to memcpy per run
// cost more than the multiply-adds it feeds; whole 8-float moves and a short tail instead (the optimize
// attribute stops gcc from turning the tail loop back into a memcpy call).
__attribute__((optimize("no-tree-loop-distribute-patterns"))) inline void CopyRun(float* dst, const float* src,
                                                                                   int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) std::memcpy(dst + j, src + j, 8 * sizeof(float));
  for (; j < n; ++j) dst[j] = src[j];
}

__attribute__((optimize("no-tree-loop-distribute-patterns"))) inline void Zeros(float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = 0.0f;
}

// block[r][j] = col[k0 + r][p0 + j] for r < rows, j < width: the im2col rows of pixels [p0, p0 + width) of
// one image x [C][H][W], gathered output row by output row (a run of X, zeros where it meets the padding).
void Gather(const LowBitConvKernel& k, const Call& call, const float* x, int64_t k0, int64_t rows, int64_t p0,
            int64_t width, float* block) {
  const int64_t P = call.oh * call.ow;
  if (k.direct_) {  // col is X itself
    for (int64_t r = 0; r < rows; ++r) CopyRun(block + r * width, x + (k0 + r) * P + p0, width);
    return;
  }
  const int64_t taps = k.kh_ * k.kw_;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t kk = k0 + r, c = kk / taps, dy = kk % taps / k.kw_, dx = kk % k.kw_;
    const float* xc = x + c * call.h * call.w;
    const int64_t off_x = dx * k.dw_ - k.pads_[1];
    float* out = block + r * width;
    for (int64_t p = p0; p < p0 + width;) {
      const int64_t oy = p / call.ow, ox0 = p % call.ow, n = std::min(call.ow - ox0, p0 + width - p);
      float* o = out + (p - p0);
      const int64_t iy = oy * k.sh_ - k.pads_[0] + dy * k.dh_;
      if (iy < 0 || iy >= call.h) {
        Zeros(o, n);
      } else if (k.sw_ == 1) {  // ix = ox + off_x: zeros, one run, zeros
        const float* src = xc + iy * call.w;
        const int64_t lo = std::clamp<int64_t>(-off_x - ox0, 0, n);
        const int64_t hi = std::clamp<int64_t>(call.w - off_x - ox0, lo, n);
        Zeros(o, lo);
        CopyRun(o + lo, src + ox0 + lo + off_x, hi - lo);
        Zeros(o + hi, n - hi);
      } else {
        const float* src = xc + iy * call.w;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t ix = (ox0 + j) * k.sw_ + off_x;
          o[j] = ix >= 0 && ix < call.w ? src[ix] : 0.0f;
        }
      }
      p += n;
    }
  }
}

// Task t: image t / chunks, output pixels [(t % chunks) kPixels, ...) of every filter.
void ConvTask(void* data, size_t t) {
  auto* call = static_cast<Call*>(data);
  if (call->failed.load(std::memory_order_relaxed)) return;
  try {
    const LowBitConvKernel& k = *call->k;
    const int64_t P = call->oh * call->ow, K = k.w_.k, kp = k.w_.kp;
    const int64_t image = static_cast<int64_t>(t) / call->chunks;
    const int64_t p0 = static_cast<int64_t>(t) % call->chunks * kPixels, width = std::min(P, p0 + kPixels) - p0;
    const float* x = call->x + image * k.c_ * call->h * call->w;
    float* y = call->y + image * k.m_ * P;
    const int64_t tiles = (k.m_ + lowbit::kPanel - 1) / lowbit::kPanel;
    thread_local std::vector<float> block;
    block.resize(static_cast<size_t>(kBlockK * kPixels));
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      const int64_t rows = std::min(kBlockK, K - k0);
      Gather(k, *call, x, k0, rows, p0, width, block.data());
      for (int64_t i = 0; i < tiles; ++i) {
        const int64_t f0 = i * lowbit::kPanel;
        k.kern_->conv_tile(call->panels + f0 * kp + k0, kp, block.data(), width, 0, rows, 0, width,
                           std::min(lowbit::kPanel, k.m_ - f0), k.bias_.empty() ? nullptr : k.bias_.data() + f0,
                           k0 == 0, y + f0 * P + p0, P);
      }
    }
  } catch (...) {
    call->failed.store(true);
  }
}

std::vector<int64_t> PairAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                                   const std::string& where) {
  const auto v = IntsAttribute(api, info, name, where);
  if (!v) return {1, 1};
  if (v->size() != 2 || (*v)[0] < 1 || (*v)[1] < 1 || (*v)[0] > kMaxAttr || (*v)[1] > kMaxAttr) {
    Fail(where, std::string("attribute '") + name + "' must be 2 ints in [1, 2^20], got " + ShapeStr(*v));
  }
  return *v;
}

}  // namespace

LowBitConvKernel::LowBitConvKernel(const OrtApi* api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();
  present_inputs_ = onnxopt::PresentInputs(kinfo);
  if (present_inputs_ != 4 && present_inputs_ != 5) {
    Fail(where, "expects inputs (X, Q, S, Z) or (X, Q, S, Z, B), got " + std::to_string(present_inputs_));
  }
  c_ = lowbit::RequiredInt(api, info, "C", 1, kMaxAttr, where);
  m_ = lowbit::RequiredInt(api, info, "M", 1, kMaxAttr, where);
  const auto ks = IntsAttribute(api, info, "kernel_shape", where);
  if (!ks || ks->size() != 2 || (*ks)[0] < 1 || (*ks)[1] < 1 || (*ks)[0] > 1024 || (*ks)[1] > 1024) {
    Fail(where, "attribute 'kernel_shape' must be 2 ints in [1, 1024], got " + (ks ? ShapeStr(*ks) : "none"));
  }
  kh_ = (*ks)[0];
  kw_ = (*ks)[1];
  const auto st = PairAttribute(api, info, "strides", where), dl = PairAttribute(api, info, "dilations", where);
  sh_ = st[0];
  sw_ = st[1];
  dh_ = dl[0];
  dw_ = dl[1];
  pads_ = ReadPads(api, info, where);
  for (int64_t p : pads_) {
    if (p > kMaxAttr) Fail(where, "attribute 'pads' values must be <= 2^20, got " + std::to_string(p));
  }
  const int64_t K = c_ * kh_ * kw_;
  if (K > (int64_t{1} << 24)) Fail(where, "C kh kw = " + std::to_string(K) + " is beyond 2^24");
  w_ = lowbit::LoadWeights(api, info, K, m_, where);
  if (present_inputs_ == 5) {
    const ConstantTensor b = ConstantFloatInput(kinfo, 4, "B", where);
    if (b.shape != std::vector<int64_t>{m_}) {
      Fail(where, "B must have shape [M] = [" + std::to_string(m_) + "], got " + ShapeStr(b.shape));
    }
    bias_ = b.data;
  }
  direct_ = kh_ == 1 && kw_ == 1 && sh_ == 1 && sw_ == 1 && pads_ == std::array<int64_t, 4>{0, 0, 0, 0};
  kern_ = &lowbit::BestKernels();
}

Ort::Status LowBitConvKernel::Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                                      const Ort::Custom::Tensor<uint8_t>& Q, const Ort::Custom::Tensor<float>& S,
                                      const Ort::Custom::Tensor<uint8_t>& Z,
                                      std::optional<const Ort::Custom::Tensor<float>*> B,
                                      Ort::Custom::Tensor<float>& Y) {
  return Guarded(Where(), [&] { Run(context, X, Q, S, Z, B, Y); });
}

void LowBitConvKernel::Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                           const Ort::Custom::Tensor<uint8_t>& Q, const Ort::Custom::Tensor<float>& S,
                           const Ort::Custom::Tensor<uint8_t>& Z, std::optional<const Ort::Custom::Tensor<float>*> B,
                           Ort::Custom::Tensor<float>& Y) {
  const std::string where = Where();
  const lowbit::Weights& w = w_;
  const std::vector<int64_t>& xs = X.Shape();
  if (xs.size() != 4) Fail(where, "X must be 4-D [N, C, H, W], got shape " + ShapeStr(xs));
  if (xs[1] != c_) {
    Fail(where, "X has " + std::to_string(xs[1]) + " channels (shape " + ShapeStr(xs) +
                    ") but the node's weight has C = " + std::to_string(c_));
  }
  const std::vector<int64_t> per_group{w.n, w.groups};
  if (Q.Shape() != std::vector<int64_t>{w.n, w.col_bytes} || S.Shape() != per_group || Z.Shape() != per_group) {
    Fail(where, "Q, S, Z changed shape since kernel creation");
  }
  if (B.has_value() && *B != nullptr && (*B)->Shape() != std::vector<int64_t>{m_}) {
    Fail(where, "B must have shape [" + std::to_string(m_) + "], got " + ShapeStr((*B)->Shape()));
  }
  const int64_t n = xs[0], h = xs[2], wd = xs[3];
  const int64_t oh = (h + pads_[0] + pads_[2] - dh_ * (kh_ - 1) - 1) / sh_ + 1;
  const int64_t ow = (wd + pads_[1] + pads_[3] - dw_ * (kw_ - 1) - 1) / sw_ + 1;
  if (oh <= 0 || ow <= 0 || h + pads_[0] + pads_[2] < dh_ * (kh_ - 1) + 1 ||
      wd + pads_[1] + pads_[3] < dw_ * (kw_ - 1) + 1) {
    Fail(where, "the kernel does not fit the padded input: X " + ShapeStr(xs) + ", kernel " +
                    std::to_string(kh_) + "x" + std::to_string(kw_));
  }
  const int64_t P = oh * ow, K = w.k, tiles = (m_ + lowbit::kPanel - 1) / lowbit::kPanel;
  if (P > kMaxFloats / std::max<int64_t>(K, m_) || tiles * lowbit::kPanel > kMaxFloats / w.kp ||
      n > kMaxFloats / (P + kPixels)) {
    Fail(where, "X " + ShapeStr(xs) + " needs buffers beyond 2^31 floats");
  }
  float* y = Y.Allocate({n, m_, oh, ow});
  if (n == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);

  // Kept per calling thread across calls: a fresh allocation of this size is fresh pages from the kernel, and
  // their faults cost more than the dequantization (2x the layer's time at 7x7).
  thread_local std::vector<float> panels;
  panels.resize(static_cast<size_t>(tiles * lowbit::kPanel * w.kp));
  Call call;
  call.k = this;
  call.panels = panels.data();
  call.x = X.Data();
  call.y = y;
  call.h = h;
  call.w = wd;
  call.oh = oh;
  call.ow = ow;
  call.chunks = (P + kPixels - 1) / kPixels;
  RunTasks(context, PanelTask, tiles, &call);
  RunTasks(context, ConvTask, n * call.chunks, &call);
  if (call.failed.load()) Fail(where, "a compute task failed (out of memory?)", ORT_FAIL);
}

Ort::Custom::OrtLiteCustomOp* MakeLowBitConvOp() { return new SafeOp<LowBitConvKernel>("LowBitConv"); }

}  // namespace onnxopt
