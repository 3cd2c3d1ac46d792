// The batched LowBitMatMul driver (lowbit_gemm.h): per call, the rows prepared once (quantized to int8, or
// transposed into row vectors), then tasks of kGemmCols columns through the kernel context's ParallelFor.
#include "lowbit_gemm.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernel_util.h"

namespace onnxopt {
namespace lowbit {

#if !(defined(__x86_64__) || defined(__i386__))
// Never chosen off x86 (HasAvx2Fma() is false there); defined so that the library links.
const BatchKernels& Avx2BatchKernels() {
  static const BatchKernels k{nullptr, nullptr, nullptr, 1, false, 0};
  return k;
}
const BatchKernels& Avx512BatchKernels() { return Avx2BatchKernels(); }
#endif

const BatchKernels* BestBatchKernels() {
  if (!HasAvx2Fma()) return nullptr;
  return HasAvx512(kAvx512Bw | kAvx512Vl | kAvx512Vnni) ? &Avx512BatchKernels() : &Avx2BatchKernels();
}

namespace {

struct BatchCall {
  const BatchKernels* kern = nullptr;
  const Weights* w = nullptr;
  const float* x = nullptr;  // [rows][kp]
  int64_t rows = 0;
  RowsI8 xi8;                // act_bits = 8
  int8_t* xq = nullptr;      // act_bits = 8, written by QuantizeTask
  float* sumxq = nullptr;
  float* xscale = nullptr;
  const float* xt = nullptr;  // act_bits = 0: [vecs][kp][lanes] or null (few rows)
  const float* b = nullptr;
  float* y = nullptr;
  std::atomic<bool> failed{false};
  std::atomic<bool> non_finite{false};
};

void QuantizeTask(void* data, size_t t) {
  auto* call = static_cast<BatchCall*>(data);
  const Weights& w = *call->w;
  const int64_t r = static_cast<int64_t>(t);
  if (!call->kern->quantize(w, call->x + r * w.kp, call->xq + r * w.kp, call->sumxq + r * w.groups,
                            call->xscale + r)) {
    call->non_finite.store(true);
  }
}

// Task t: columns [t kGemmCols, ...) of every row.
void GemmTask(void* data, size_t t) {
  auto* call = static_cast<BatchCall*>(data);
  if (call->failed.load(std::memory_order_relaxed)) return;
  try {
    const Weights& w = *call->w;
    const int64_t n0 = static_cast<int64_t>(t) * kGemmCols, n1 = std::min(w.n, n0 + kGemmCols);
    if (call->xq == nullptr) {
      call->kern->gemm_f32(w, call->x, call->xt, call->rows, call->b, n0, n1, call->y, w.n);
    } else {
      call->kern->gemm_i8(w, call->xi8, call->b, n0, n1, call->y, w.n);
    }
  } catch (...) {
    call->failed.store(true);
  }
}

// RowsI8::xq4 and sums4 from the rows' xq and sums.
void QuadRows(const Weights& w, const int8_t* xq, const float* sums, int64_t rows, std::vector<int8_t>& xq4,
              std::vector<float>& sums4) {
  const int64_t quads = (rows + 3) / 4, chunks = w.kp / kChunk;
  xq4.assign(static_cast<size_t>(quads * w.kp * 4), 0);
  sums4.assign(static_cast<size_t>(quads * w.groups * 16), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    int8_t* q4 = xq4.data() + (r / 4) * w.kp * 4 + (r % 4) * 16;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      for (int64_t h = 0; h < 2; ++h) std::copy_n(xq + r * w.kp + ch * kChunk + h * 16, 16, q4 + ch * 128 + h * 64);
    }
    float* s4 = sums4.data() + (r / 4) * w.groups * 16 + (r % 4) * 4;
    for (int64_t g = 0; g < w.groups; ++g) s4[g * 16] = sums[r * w.groups + g];
  }
}

}  // namespace

void RunBatch(OrtKernelContext* context, const BatchKernels& kern, const Weights& w, const float* x, int64_t rows,
              int64_t act_bits, const float* b, float* y, const std::string& where) {
  BatchCall call;
  call.kern = &kern;
  call.w = &w;
  call.x = x;
  call.rows = rows;
  call.b = b;
  call.y = y;
  std::vector<int8_t> xq, xq4;
  std::vector<float> sums, scales, xt, sums4;
  if (act_bits == 8) {
    xq.resize(static_cast<size_t>(rows * w.kp));
    sums.resize(static_cast<size_t>(rows * w.groups));
    scales.resize(static_cast<size_t>(rows));
    call.xq = xq.data();
    call.sumxq = sums.data();
    call.xscale = scales.data();
    RunTasks(context, QuantizeTask, rows, &call);
    if (call.non_finite.load()) Fail(where, "X holds a non-finite value; act_bits = 8 cannot quantize it");
    call.xi8 = RowsI8{xq.data(), sums.data(), scales.data(), rows};
    if (kern.quads) {
      QuadRows(w, xq.data(), sums.data(), rows, xq4, sums4);
      call.xi8.xq4 = xq4.data();
      call.xi8.sums4 = sums4.data();
    }
  } else if (rows >= kern.small_rows || w.bits != 4) {
    // Rows into vectors of `lanes` rows, xt[v][k][lane], the last vector padded with zero rows.
    const int64_t lanes = kern.lanes, vecs = (rows + lanes - 1) / lanes;
    xt.assign(static_cast<size_t>(vecs * w.kp * lanes), 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = xt.data() + (r / lanes) * w.kp * lanes + r % lanes;
      const float* src = x + r * w.kp;
      for (int64_t k = 0; k < w.kp; ++k) dst[k * lanes] = src[k];
    }
    call.xt = xt.data();
  }
  RunTasks(context, GemmTask, (w.n + kGemmCols - 1) / kGemmCols, &call);
  if (call.failed.load()) Fail(where, "a compute task failed (out of memory?)", ORT_FAIL);
}

}  // namespace lowbit
}  // namespace onnxopt
