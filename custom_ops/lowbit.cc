// LowBitMatMul kernel: creation-time checks and packing, the per-call split into tasks, and the portable build
// of the loops (see lowbit.h for the format and the math, lowbit_avx2.cc for the AVX2 build).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernel_util.h"
#include "lowbit_gemm.h"
#include "lowbit_load.h"
#include "ops.h"

#define LOWBIT_IMPL portable
#include "lowbit_impl.h"

namespace onnxopt {
namespace lowbit {

const Kernels& PortableKernels() {
  static const Kernels k{portable::GemvGeneric, portable::GemvGeneric, portable::GemvI8, portable::Quantize,
                         portable::Dequant,     portable::Tile,        portable::ConvTile};
  return k;
}

#if !(defined(__x86_64__) || defined(__i386__))
const Kernels& Avx2Kernels() { return PortableKernels(); }    // never chosen: HasAvx2Fma() is false
const Kernels& Avx512Kernels() { return PortableKernels(); }  // never chosen: HasAvx512() is false
#endif

const Kernels& BestKernels() {
  if (!HasAvx2Fma()) return PortableKernels();
  return HasAvx512(kAvx512Bw | kAvx512Vl | kAvx512Vnni) ? Avx512Kernels() : Avx2Kernels();
}

void* AllocateCodes(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20, kMin = size_t{4} << 20;
  void* p = nullptr;
  if (bytes < kMin) {
    if (posix_memalign(&p, 64, std::max<size_t>(bytes, 1)) != 0) throw std::bad_alloc();
    return p;
  }
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  if (posix_memalign(&p, kHuge, rounded) != 0) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(p, rounded, MADV_HUGEPAGE);  // a hint: without huge pages the codes still work, only slower
#endif
  return p;
}

void FreeCodes(void* p) noexcept { std::free(p); }

namespace {

constexpr int64_t kGemvCols = 64;      // columns per batch-1 task

struct ConstantBytes {
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t count = 0;
};

// A constant uint8 input, checked to be constant, uint8 and of `shape`.
ConstantBytes ConstantUint8Input(const Ort::ConstKernelInfo& info, size_t index, const char* what,
                                 const std::vector<int64_t>& shape, const std::string& where) {
  int is_constant = 0;
  Ort::ConstValue v = info.GetTensorConstantInput(index, &is_constant);
  if (!is_constant || v == nullptr) {
    Fail(where, std::string(what) + " (input " + std::to_string(index) + ", '" + info.GetInputName(index) +
                    "') must be a constant initializer: the kernel packs it once at session creation");
  }
  auto ts = v.GetTensorTypeAndShapeInfo();
  if (ts.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
    Fail(where, std::string(what) + " (input " + std::to_string(index) + ") must be uint8");
  }
  ConstantBytes b;
  b.shape = ts.GetShape();
  if (b.shape != shape) {
    Fail(where, std::string(what) + " must have shape " + ShapeStr(shape) + ", got " + ShapeStr(b.shape));
  }
  b.count = ts.GetElementCount();
  b.data = v.GetTensorData<uint8_t>();
  return b;
}

}  // namespace

int64_t RequiredInt(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t lo, int64_t hi,
                    const std::string& where) {
  const auto v = IntAttribute(api, info, name, where);
  if (!v) Fail(where, std::string("attribute '") + name + "' is required");
  if (*v < lo || *v > hi) {
    Fail(where, std::string("attribute '") + name + "' must be in [" + std::to_string(lo) + ", " +
                    std::to_string(hi) + "], got " + std::to_string(*v));
  }
  return *v;
}

Weights LoadWeights(const OrtApi* api, const OrtKernelInfo* info, int64_t k, int64_t n, const std::string& where) {
  Ort::ConstKernelInfo kinfo{info};
  Weights w;
  w.k = k;
  w.n = n;
  w.bits = RequiredInt(api, info, "bits", 2, 4, where);
  w.group = RequiredInt(api, info, "group_size", kChunk, int64_t{1} << 20, where);
  if (w.group % kChunk != 0) {
    Fail(where, "attribute 'group_size' must be a multiple of 32, got " + std::to_string(w.group));
  }
  w.groups = (w.k + w.group - 1) / w.group;
  w.kp = w.groups * w.group;
  w.col_bytes = w.kp * w.bits / 8;
  const std::vector<int64_t> per_group{w.n, w.groups};

  w.np = (w.n + kBlock - 1) / kBlock * kBlock;
  w.slab_chunks = std::max<int64_t>(1, kSlabFloats / w.group) * w.group / kChunk;
  const ConstantBytes q = ConstantUint8Input(kinfo, 1, "Q", {w.n, w.col_bytes}, where);
  const int64_t cb = w.ChunkBytes(), chunks = w.kp / kChunk;
  w.codes.assign(static_cast<size_t>(w.np * w.col_bytes), 0);  // padded columns: zero codes and scales
  for (int64_t c = 0; c < w.n; ++c) {
    for (int64_t ch = 0; ch < chunks; ++ch) {
      std::memcpy(w.codes.data() + w.ChunkOffset(c, ch), q.data + c * w.col_bytes + ch * cb, cb);
    }
  }
  const ConstantTensor s = ConstantFloatInput(kinfo, 2, "S", where);
  if (s.shape != per_group) {
    Fail(where, "S must have shape [N, ceil(K / group_size)] = " + ShapeStr(per_group) + ", got " +
                    ShapeStr(s.shape));
  }
  for (size_t i = 0; i < s.data.size(); ++i) {
    if (!std::isfinite(s.data[i])) Fail(where, "S[" + std::to_string(i) + "] is not finite");
  }
  const ConstantBytes z = ConstantUint8Input(kinfo, 3, "Z", per_group, where);
  w.scale.assign(static_cast<size_t>(w.np * w.groups), 0.0f);
  w.scale_zero.assign(static_cast<size_t>(w.np * w.groups), 0.0f);
  w.zero.assign(static_cast<size_t>(w.np * w.groups), 0);
  for (size_t i = 0; i < z.count; ++i) {
    if (z.data[i] >= (1 << w.bits)) {
      Fail(where, "Z[" + std::to_string(i) + "] = " + std::to_string(z.data[i]) + " is not a " +
                      std::to_string(w.bits) + "-bit code (must be < " + std::to_string(1 << w.bits) + ")");
    }
    const int64_t at = w.ScaleIndex(static_cast<int64_t>(i) / w.groups, static_cast<int64_t>(i) % w.groups);
    w.scale[at] = s.data[i];
    w.scale_zero[at] = s.data[i] * static_cast<float>(z.data[i]);
    w.zero[at] = z.data[i];
  }
  return w;
}

}  // namespace lowbit

struct LowBitMatMulKernel {
  LowBitMatMulKernel(const OrtApi* api, const OrtKernelInfo* info);
  size_t PresentInputs() const { return present_inputs_; }
  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<uint8_t>& Q, const Ort::Custom::Tensor<float>& S,
                      const Ort::Custom::Tensor<uint8_t>& Z, std::optional<const Ort::Custom::Tensor<float>*> B,
                      Ort::Custom::Tensor<float>& Y);
  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X, const Ort::Custom::Tensor<uint8_t>& Q,
           const Ort::Custom::Tensor<float>& S, const Ort::Custom::Tensor<uint8_t>& Z,
           std::optional<const Ort::Custom::Tensor<float>*> B, Ort::Custom::Tensor<float>& Y);
  std::string Where() const { return onnxopt::Where("LowBitMatMul", node_name_); }

  std::string node_name_;
  size_t present_inputs_ = 0;
  lowbit::Weights w_;
  std::vector<float> bias_;  // [N] or empty
  int64_t act_bits_ = 0;     // 8: activations quantized to int8 per row (bits 4 only)
  const lowbit::Kernels* kern_ = nullptr;
  const lowbit::BatchKernels* batch_ = nullptr;  // rows > 1 (lowbit_gemm.h); null: the per-row and tile loops
};

namespace {

struct Call {
  const LowBitMatMulKernel* k = nullptr;
  const float* x = nullptr;  // rows of kp floats
  const float* sumx = nullptr;
  const int8_t* xq = nullptr;  // act_bits = 8: one row of kp int8
  float x_scale = 1.0f;        // act_bits = 8: the row's scale
  float* y = nullptr;  // rows of n floats
  int64_t rows = 0;
  std::atomic<bool> failed{false};
};

void AddBias(const LowBitMatMulKernel& k, float* y, int64_t n0, int64_t n1) {
  if (k.bias_.empty()) return;
  for (int64_t n = n0; n < n1; ++n) y[n] += k.bias_[n];
}

// Task t of batch 1: columns [t * kGemvCols, ...).
void GemvTask(void* data, size_t t) {
  auto* call = static_cast<Call*>(data);
  const LowBitMatMulKernel& k = *call->k;
  const int64_t n0 = static_cast<int64_t>(t) * lowbit::kGemvCols;
  const int64_t n1 = std::min(k.w_.n, n0 + lowbit::kGemvCols);
  const lowbit::GemvFn f = k.w_.bits == 4 ? k.kern_->gemv4 : k.kern_->gemv;
  const int64_t slab = k.w_.slab_chunks * lowbit::kChunk / k.w_.group;  // groups per slab
  for (int64_t g0 = 0; g0 < k.w_.groups; g0 += slab) {
    f(k.w_, call->x, call->sumx, n0, n1, g0, std::min(k.w_.groups, g0 + slab), call->y);
  }
  AddBias(k, call->y, n0, n1);
}

// Task t of one int8-quantized row (act_bits = 8): columns [t * kGemvCols, ...), then the row's scale.
void GemvI8Task(void* data, size_t t) {
  auto* call = static_cast<Call*>(data);
  const LowBitMatMulKernel& k = *call->k;
  const int64_t n0 = static_cast<int64_t>(t) * lowbit::kGemvCols;
  const int64_t n1 = std::min(k.w_.n, n0 + lowbit::kGemvCols);
  const int64_t slab = k.w_.slab_chunks * lowbit::kChunk / k.w_.group;
  for (int64_t g0 = 0; g0 < k.w_.groups; g0 += slab) {
    k.kern_->gemv_i8(k.w_, call->xq, call->sumx, n0, n1, g0, std::min(k.w_.groups, g0 + slab), call->y);
  }
  for (int64_t n = n0; n < n1; ++n) call->y[n] *= call->x_scale;
  AddBias(k, call->y, n0, n1);
}

// Task t of a batch: the 8 columns of tile t, dequantized once, against every row.
void TileTask(void* data, size_t t) {
  auto* call = static_cast<Call*>(data);
  if (call->failed.load(std::memory_order_relaxed)) return;
  try {
    const LowBitMatMulKernel& k = *call->k;
    const int64_t n0 = static_cast<int64_t>(t) * lowbit::kTile;
    const int64_t cols = std::min(lowbit::kTile, k.w_.n - n0);
    thread_local std::vector<float> tile;
    tile.resize(static_cast<size_t>(k.w_.kp * lowbit::kTile));
    k.kern_->dequant(k.w_, n0, cols, tile.data());
    k.kern_->tile(call->x, k.w_.kp, call->rows, tile.data(), k.w_.kp, call->y + n0, k.w_.n, cols);
    for (int64_t r = 0; r < call->rows; ++r) AddBias(k, call->y + r * k.w_.n, n0, n0 + cols);
  } catch (...) {
    call->failed.store(true);
  }
}

}  // namespace

LowBitMatMulKernel::LowBitMatMulKernel(const OrtApi* api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();
  present_inputs_ = onnxopt::PresentInputs(kinfo);
  if (present_inputs_ != 4 && present_inputs_ != 5) {
    Fail(where, "expects inputs (X, Q, S, Z) or (X, Q, S, Z, B), got " + std::to_string(present_inputs_));
  }
  const int64_t k = lowbit::RequiredInt(api, info, "K", 1, int64_t{1} << 24, where);
  const int64_t n = lowbit::RequiredInt(api, info, "N", 1, int64_t{1} << 24, where);
  w_ = lowbit::LoadWeights(api, info, k, n, where);
  const lowbit::Weights& w = w_;
  if (present_inputs_ == 5) {
    const ConstantTensor b = ConstantFloatInput(kinfo, 4, "B", where);
    if (b.shape != std::vector<int64_t>{w.n}) {
      Fail(where, "B must have shape [N] = [" + std::to_string(w.n) + "], got " + ShapeStr(b.shape));
    }
    bias_ = b.data;
  }
  if (const auto a = IntAttribute(api, info, "act_bits", where)) {
    if (*a != 0 && *a != 8) Fail(where, "attribute 'act_bits' must be 0 or 8, got " + std::to_string(*a));
    if (*a == 8 && w.bits != 4) {
      Fail(where, "act_bits = 8 needs bits = 4 (the integer path unpacks 4-bit codes), got bits = " +
                      std::to_string(w.bits));
    }
    act_bits_ = *a;
  }
  kern_ = &lowbit::BestKernels();
  batch_ = lowbit::BestBatchKernels();
}

Ort::Status LowBitMatMulKernel::Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                                        const Ort::Custom::Tensor<uint8_t>& Q, const Ort::Custom::Tensor<float>& S,
                                        const Ort::Custom::Tensor<uint8_t>& Z,
                                        std::optional<const Ort::Custom::Tensor<float>*> B,
                                        Ort::Custom::Tensor<float>& Y) {
  return Guarded(Where(), [&] { Run(context, X, Q, S, Z, B, Y); });
}

void LowBitMatMulKernel::Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                             const Ort::Custom::Tensor<uint8_t>& Q, const Ort::Custom::Tensor<float>& S,
                             const Ort::Custom::Tensor<uint8_t>& Z,
                             std::optional<const Ort::Custom::Tensor<float>*> B, Ort::Custom::Tensor<float>& Y) {
  const std::string where = Where();
  const lowbit::Weights& w = w_;
  const std::vector<int64_t>& xs = X.Shape();
  if (xs.empty()) Fail(where, "X must have rank >= 1 [..., K], got a scalar");
  if (xs.back() != w.k) {
    Fail(where, "X has last dimension " + std::to_string(xs.back()) + " (shape " + ShapeStr(xs) +
                    ") but the node has K = " + std::to_string(w.k));
  }
  const std::vector<int64_t> per_group{w.n, w.groups};
  if (Q.Shape() != std::vector<int64_t>{w.n, w.col_bytes} || S.Shape() != per_group || Z.Shape() != per_group) {
    Fail(where, "Q, S, Z changed shape since kernel creation");
  }
  const bool has_b = B.has_value() && *B != nullptr;
  if (has_b && (*B)->Shape() != std::vector<int64_t>{w.n}) {
    Fail(where, "B must have shape [" + std::to_string(w.n) + "], got " + ShapeStr((*B)->Shape()));
  }
  std::vector<int64_t> ys(xs.begin(), xs.end() - 1);
  ys.push_back(w.n);
  int64_t m = 1;
  for (size_t d = 0; d + 1 < xs.size(); ++d) m *= xs[d];
  float* y = Y.Allocate(ys);
  if (m == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);

  // Rows padded to kp with zeros (the padded codes then contribute nothing); in place when K = kp.
  const float* x = X.Data();
  std::vector<float> padded;
  if (w.kp != w.k) {
    padded.assign(static_cast<size_t>(m * w.kp), 0.0f);
    for (int64_t r = 0; r < m; ++r) std::memcpy(&padded[r * w.kp], x + r * w.k, sizeof(float) * w.k);
    x = padded.data();
  }
  Call call;
  call.k = this;
  call.x = x;
  call.y = y;
  call.rows = m;
  if (m > 1 && batch_ != nullptr) {  // the codes read once per block of rows, not once per row
    lowbit::RunBatch(context, *batch_, w, x, m, act_bits_, bias_.empty() ? nullptr : bias_.data(), y, where);
    return;
  }
  if (act_bits_ == 8) {  // every row through the integer batch-1 path
    std::vector<int8_t> xq(static_cast<size_t>(w.kp));
    std::vector<float> sums(static_cast<size_t>(w.groups));
    call.xq = xq.data();
    call.sumx = sums.data();
    for (int64_t r = 0; r < m; ++r) {
      if (!kern_->quantize(w, x + r * w.kp, xq.data(), sums.data(), &call.x_scale)) {
        Fail(where, "X holds a non-finite value; act_bits = 8 cannot quantize it");
      }
      call.y = y + r * w.n;
      RunTasks(context, GemvI8Task, (w.n + lowbit::kGemvCols - 1) / lowbit::kGemvCols, &call);
    }
    return;
  }
  if (m == 1) {
    std::vector<float> sumx(static_cast<size_t>(w.groups));
    for (int64_t g = 0; g < w.groups; ++g) {
      double s = 0.0;
      for (int64_t j = 0; j < w.group; ++j) s += x[g * w.group + j];
      sumx[g] = static_cast<float>(s);
    }
    call.sumx = sumx.data();
    RunTasks(context, GemvTask, (w.n + lowbit::kGemvCols - 1) / lowbit::kGemvCols, &call);
    return;
  }
  RunTasks(context, TileTask, (w.n + lowbit::kTile - 1) / lowbit::kTile, &call);
  if (call.failed.load()) Fail(where, "a compute task failed (out of memory?)", ORT_FAIL);
}

Ort::Custom::OrtLiteCustomOp* MakeLowBitMatMulOp() { return new SafeOp<LowBitMatMulKernel>("LowBitMatMul"); }

}  // namespace onnxopt
