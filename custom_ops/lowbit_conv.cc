// LowBitConv kernel: ONNX Conv (NCHW, group 1) whose weight A [M, C, kh, kw] is stored as the `lowbit` codes of
// its im2col form (lowbit.h, one column of codes per output filter, groups along C kh kw; numpy reference
// onnxopt/reference/lowbit.py, lowbit_conv).
//
// Per call: (1) the codes are dequantized into panels of kPanel = 8 filters laid out k-major, panel[k][f], one
// task per panel; the resident weight stays at bits / 8 bytes per weight, the float panels live for the call
// only (M K floats, as the dense weight; their cost, M K unpacks, is 1 / (OH OW) of the multiply-adds).
// (2) Per image, the input is laid out as the im2col matrix col[k][p] (k = (c kh + dy) kw + dx, p = oy OW + ox;
// one task per input channel); 1x1 convolutions with stride 1 and no padding skip that copy and read X in
// place, which already is col. (3) Y[m][p] = B[m] + sum_k A[m][k] col[k][p]: tasks over chunks of kPixels
// output pixels; each walks K in blocks of kBlockK (its chunk's im2col rows of a block, copied contiguous, stay
// in L1 across the panels) and, per block, every panel through Kernels::conv_tile (an AVX2 4-filter x 24-pixel register block,
// or the portable loop).
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
  float* panels = nullptr;  // [tiles][K][kPanel]
  const float* x = nullptr;  // one image [C][H][W]
  int64_t h = 0, w = 0, oh = 0, ow = 0;
  float* col = nullptr;  // [K][P] (or the image itself when direct)
  float* y = nullptr;    // one image [M][P]
  std::atomic<bool> failed{false};
};

// Task t: panel t (filters 8 t .. 8 t + 7; missing filters stay zero).
void PanelTask(void* data, size_t t) {
  auto* call = static_cast<Call*>(data);
  if (call->failed.load(std::memory_order_relaxed)) return;
  try {
    const lowbit::Weights& w = call->k->w_;
    const int64_t n0 = static_cast<int64_t>(t) * lowbit::kPanel;
    const int64_t cols = std::min(lowbit::kPanel, w.n - n0);
    thread_local std::vector<float> tile;
    tile.resize(static_cast<size_t>(w.kp * lowbit::kPanel));
    call->k->kern_->dequant(w, n0, cols, tile.data());
    float* panel = call->panels + static_cast<int64_t>(t) * w.k * lowbit::kPanel;
    for (int64_t k = 0; k < w.k; ++k) {
      for (int64_t c = 0; c < lowbit::kPanel; ++c) panel[k * lowbit::kPanel + c] = c < cols ? tile[c * w.kp + k] : 0.0f;
    }
  } catch (...) {
    call->failed.store(true);
  }
}

// Task c: the kh kw im2col rows of input channel c.
void Im2ColTask(void* data, size_t t) {
  auto* call = static_cast<Call*>(data);
  const LowBitConvKernel& k = *call->k;
  const int64_t c = static_cast<int64_t>(t), P = call->oh * call->ow;
  const float* xc = call->x + c * call->h * call->w;
  for (int64_t dy = 0; dy < k.kh_; ++dy) {
    for (int64_t dx = 0; dx < k.kw_; ++dx) {
      float* row = call->col + ((c * k.kh_ + dy) * k.kw_ + dx) * P;
      const int64_t off_x = dx * k.dw_ - k.pads_[1];
      for (int64_t oy = 0; oy < call->oh; ++oy) {
        float* r = row + oy * call->ow;
        const int64_t iy = oy * k.sh_ - k.pads_[0] + dy * k.dh_;
        if (iy < 0 || iy >= call->h) {
          std::fill(r, r + call->ow, 0.0f);
          continue;
        }
        const float* src = xc + iy * call->w;
        if (k.sw_ == 1) {  // ix = ox + off_x: zeros, one copy, zeros
          const int64_t lo = std::clamp<int64_t>(-off_x, 0, call->ow);
          const int64_t hi = std::clamp<int64_t>(call->w - off_x, lo, call->ow);
          std::fill(r, r + lo, 0.0f);
          std::memcpy(r + lo, src + lo + off_x, sizeof(float) * (hi - lo));
          std::fill(r + hi, r + call->ow, 0.0f);
        } else {
          for (int64_t ox = 0; ox < call->ow; ++ox) {
            const int64_t ix = ox * k.sw_ + off_x;
            r[ox] = ix >= 0 && ix < call->w ? src[ix] : 0.0f;
          }
        }
      }
    }
  }
}

// Task t: output pixels [t kPixels, ...) of every filter. Each block of kBlockK im2col rows of the task's
// pixels is first copied into a contiguous [rows][pixels] buffer: read in place, its rows lie OH OW floats
// apart (12 KiB at 56x56), so every k touched another page and the block thrashed the TLB and L1 sets (4.5x
// slower than onnxruntime's fp32 Conv before the copy).
void ConvTask(void* data, size_t t) {
  auto* call = static_cast<Call*>(data);
  const LowBitConvKernel& k = *call->k;
  const int64_t P = call->oh * call->ow, K = k.w_.k;
  const int64_t p0 = static_cast<int64_t>(t) * kPixels, width = std::min(P, p0 + kPixels) - p0;
  const int64_t tiles = (k.m_ + lowbit::kPanel - 1) / lowbit::kPanel;
  thread_local std::vector<float> block;
  block.resize(static_cast<size_t>(kBlockK * kPixels));
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t rows = std::min(kBlockK, K - k0);
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(block.data() + r * width, call->col + (k0 + r) * P + p0, sizeof(float) * width);
    }
    for (int64_t i = 0; i < tiles; ++i) {
      const int64_t f0 = i * lowbit::kPanel;
      k.kern_->conv_tile(call->panels + (i * K + k0) * lowbit::kPanel, block.data(), width, 0, rows, 0, width,
                         std::min(lowbit::kPanel, k.m_ - f0), k.bias_.empty() ? nullptr : k.bias_.data() + f0,
                         k0 == 0, call->y + f0 * P + p0, P);
    }
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
  kern_ = HasAvx2Fma() ? &lowbit::Avx2Kernels() : &lowbit::PortableKernels();
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
  if (P > kMaxFloats / std::max<int64_t>(K, m_) || tiles * lowbit::kPanel > kMaxFloats / K) {
    Fail(where, "X " + ShapeStr(xs) + " needs buffers beyond 2^31 floats");
  }
  float* y = Y.Allocate({n, m_, oh, ow});
  if (n == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);

  std::vector<float> panels(static_cast<size_t>(tiles * K * lowbit::kPanel));
  std::vector<float> col(direct_ ? 0 : static_cast<size_t>(K * P));
  Call call;
  call.k = this;
  call.panels = panels.data();
  call.h = h;
  call.w = wd;
  call.oh = oh;
  call.ow = ow;
  RunTasks(context, PanelTask, tiles, &call);
  if (call.failed.load()) Fail(where, "a compute task failed (out of memory?)", ORT_FAIL);
  for (int64_t i = 0; i < n; ++i) {
    call.x = X.Data() + i * c_ * h * wd;
    call.y = y + i * m_ * P;
    if (direct_) {
      call.col = const_cast<float*>(call.x);  // read only: ConvTask never writes col
    } else {
      call.col = col.data();
      RunTasks(context, Im2ColTask, c_, &call);
    }
    RunTasks(context, ConvTask, (P + kPixels - 1) / kPixels, &call);
  }
}

Ort::Custom::OrtLiteCustomOp* MakeLowBitConvOp() { return new SafeOp<LowBitConvKernel>("LowBitConv"); }

}  // namespace onnxopt
