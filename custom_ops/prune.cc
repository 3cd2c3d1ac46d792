// What SparseGemm and SparseConv share (see prune.h): reading and checking the CSR constants, packing them,
// splitting rows into balanced parts, and the portable builds of the tile and gather kernels.
#include "prune.h"

#include <algorithm>
#include <limits>
#include <string>

#include "kernel_util.h"

namespace onnxopt {
namespace prune {

namespace {

// A constant input of element type `type` and rank 1, copied; fails naming the input otherwise.
template <typename T>
std::vector<T> ConstantVector(const Ort::ConstKernelInfo& info, size_t index, const char* what,
                              ONNXTensorElementDataType type, const char* type_name, const std::string& where) {
  int is_constant = 0;
  Ort::ConstValue v = info.GetTensorConstantInput(index, &is_constant);
  if (!is_constant || v == nullptr) {
    Fail(where, std::string(what) + " (input " + std::to_string(index) + ", '" + info.GetInputName(index) +
                    "') must be a constant initializer: the kernel packs it once at session creation");
  }
  auto type_shape = v.GetTensorTypeAndShapeInfo();
  if (type_shape.GetElementType() != type) {
    Fail(where, std::string(what) + " (input " + std::to_string(index) + ") must be " + type_name);
  }
  const std::vector<int64_t> shape = type_shape.GetShape();
  if (shape.size() != 1) Fail(where, std::string(what) + " must be 1-D, got shape " + ShapeStr(shape));
  const size_t count = type_shape.GetElementCount();
  if (count == 0) return {};
  const T* p = v.GetTensorData<T>();
  return std::vector<T>(p, p + count);
}

// Work of a row beyond its nonzeros (loop setup, the reduction, the store), in nonzeros.
constexpr int64_t kRowOverhead = 16;

}  // namespace

Csr ReadCsr(const Ort::ConstKernelInfo& info, int64_t cols, const std::string& where) {
  Csr m;
  m.cols = cols;
  m.values = ConstantVector<float>(info, 1, "values", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32", where);
  m.indices = ConstantVector<int32_t>(info, 2, "indices", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, "int32", where);
  m.row_ptr = ConstantVector<int64_t>(info, 3, "row_ptr", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, "int64", where);
  const int64_t nnz = static_cast<int64_t>(m.values.size());
  if (m.row_ptr.size() < 2) {
    Fail(where, "row_ptr must have at least 2 entries (rows + 1), got " + std::to_string(m.row_ptr.size()));
  }
  if (static_cast<int64_t>(m.indices.size()) != nnz) {
    Fail(where, "indices and values must have the same length nnz, got " + std::to_string(m.indices.size()) +
                    " and " + std::to_string(nnz));
  }
  if (nnz > std::numeric_limits<int32_t>::max()) Fail(where, "more than 2^31 - 1 nonzeros");
  m.rows = static_cast<int64_t>(m.row_ptr.size()) - 1;
  if (m.row_ptr[0] != 0) Fail(where, "row_ptr[0] must be 0, got " + std::to_string(m.row_ptr[0]));
  for (int64_t r = 0; r < m.rows; ++r) {
    if (m.row_ptr[r + 1] < m.row_ptr[r]) {
      Fail(where, "row_ptr must be non-decreasing: row_ptr[" + std::to_string(r + 1) + "] = " +
                      std::to_string(m.row_ptr[r + 1]) + " < row_ptr[" + std::to_string(r) + "] = " +
                      std::to_string(m.row_ptr[r]));
    }
  }
  if (m.row_ptr[m.rows] != nnz) {
    Fail(where, "row_ptr[" + std::to_string(m.rows) + "] (the last entry) must equal nnz = " +
                    std::to_string(nnz) + ", got " + std::to_string(m.row_ptr[m.rows]));
  }
  for (int64_t r = 0; r < m.rows; ++r) {
    for (int64_t j = m.row_ptr[r]; j < m.row_ptr[r + 1]; ++j) {
      const int64_t c = m.indices[j];
      if (c < 0 || c >= cols) {
        Fail(where, "indices[" + std::to_string(j) + "] = " + std::to_string(c) + " in row " + std::to_string(r) +
                        " is out of range [0, " + std::to_string(cols) + ")");
      }
      if (j > m.row_ptr[r] && c <= m.indices[j - 1]) {
        Fail(where, "indices must be strictly increasing within a row: indices[" + std::to_string(j) +
                        "] = " + std::to_string(c) + " after indices[" + std::to_string(j - 1) + "] = " +
                        std::to_string(m.indices[j - 1]) + " in row " + std::to_string(r) +
                        (c == m.indices[j - 1] ? " (duplicate)" : " (decreasing)"));
      }
    }
  }
  return m;
}

std::vector<float> ReadBias(const Ort::ConstKernelInfo& info, size_t present, int64_t rows, const char* dim,
                            const std::string& where) {
  if (present < 5) return std::vector<float>(static_cast<size_t>(rows), 0.0f);
  ConstantTensor b = ConstantFloatInput(info, 4, "bias", where);
  if (b.shape != std::vector<int64_t>{rows}) {
    Fail(where, std::string("bias must have shape [") + dim + "] = [" + std::to_string(rows) + "], got " +
                    ShapeStr(b.shape));
  }
  return std::move(b.data);
}

void CheckCsrShapes(const std::vector<int64_t>& values, const std::vector<int64_t>& indices,
                    const std::vector<int64_t>& row_ptr, const std::vector<int64_t>* bias, int64_t rows,
                    int64_t nnz, const std::string& where) {
  auto same = [&](const char* what, const std::vector<int64_t>& now, int64_t len) {
    if (now != std::vector<int64_t>{len}) {
      Fail(where, std::string(what) + " has shape " + ShapeStr(now) + " at run time, but [" + std::to_string(len) +
                      "] at kernel creation");
    }
  };
  same("values", values, nnz);
  same("indices", indices, nnz);
  same("row_ptr", row_ptr, rows + 1);
  if (bias != nullptr) same("bias", *bias, rows);
}

template <typename Index>
Packed<Index> Pack(const Csr& csr, int64_t pad, int64_t block_cols) {
  Packed<Index> p;
  const int64_t rows = csr.rows;
  block_cols = std::max<int64_t>(1, std::min(block_cols, csr.cols));
  p.rows = rows;
  p.blocks = (csr.cols + block_cols - 1) / block_cols;
  // Segment sizes: row r's nonzeros in block b (columns are increasing within a row, so each segment is a run).
  std::vector<int64_t> count(static_cast<size_t>(p.blocks * rows), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = csr.row_ptr[r]; j < csr.row_ptr[r + 1]; ++j) ++count[csr.indices[j] / block_cols * rows + r];
  }
  p.ptr.assign(static_cast<size_t>(p.blocks * rows + 1), 0);
  for (int64_t s = 0; s < p.blocks * rows; ++s) p.ptr[s + 1] = p.ptr[s] + (count[s] + pad - 1) / pad * pad;
  p.cost.assign(static_cast<size_t>(rows + 1), 0);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t work = 0;
    for (int64_t b = 0; b < p.blocks; ++b) work += p.ptr[b * rows + r + 1] - p.ptr[b * rows + r] + kRowOverhead;
    p.cost[r + 1] = p.cost[r] + work;
  }
  // Padding entries: weight 0 at column 0 (a valid read that adds nothing).
  p.values.assign(static_cast<size_t>(p.ptr.back()), 0.0f);
  p.idx.assign(static_cast<size_t>(p.ptr.back()), Index{0});
  std::vector<int64_t> at(p.ptr.begin(), p.ptr.end() - 1);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = csr.row_ptr[r]; j < csr.row_ptr[r + 1]; ++j) {
      const int64_t d = at[csr.indices[j] / block_cols * rows + r]++;
      p.values[d] = csr.values[j];
      p.idx[d] = static_cast<Index>(csr.indices[j]);
    }
  }
  return p;
}

std::pair<int64_t, int64_t> PartByCost(const std::vector<int64_t>& cost, int64_t part, int64_t parts) {
  const int64_t rows = static_cast<int64_t>(cost.size()) - 1;
  const double total = static_cast<double>(cost.back());
  auto bound = [&](int64_t k) -> int64_t {
    if (k <= 0) return 0;
    if (k >= parts) return rows;
    const double target = total * static_cast<double>(k) / static_cast<double>(parts);
    return std::lower_bound(cost.begin(), cost.end(), target,
                            [](int64_t c, double t) { return static_cast<double>(c) < t; }) -
           cost.begin();
  };
  return {bound(part), bound(part + 1)};
}

template Packed<uint16_t> Pack<uint16_t>(const Csr&, int64_t, int64_t);
template Packed<int32_t> Pack<int32_t>(const Csr&, int64_t, int64_t);

namespace {

// The portable tile: T accumulators in an array the compiler keeps in vector registers.
template <typename Index, int T, int kStride>
void TilePortable(const float* v, const Index* idx, int64_t count, float bias, bool accumulate, const float* x,
                  float* out) {
  float acc[T];
  for (int l = 0; l < T; ++l) acc[l] = accumulate ? out[l] : bias;
  for (int64_t j = 0; j < count; ++j) {
    const float w = v[j];
    const float* __restrict xr = x + static_cast<int64_t>(idx[j]) * kStride;
    for (int l = 0; l < T; ++l) acc[l] += w * xr[l];
  }
  for (int l = 0; l < T; ++l) out[l] = acc[l];
}

// The portable gather: four partial sums per row so the adds do not wait on each other.
template <typename Index>
void GatherPortable(const Packed<Index>& p, const float* bias, int64_t n0, int64_t n1, const float* x,
                    int64_t x_stride, int rows, float* y, int64_t y_stride) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    for (int64_t n = n0; n < n1; ++n) {
      const float* v = p.values.data() + p.ptr[n];
      const Index* id = p.idx.data() + p.ptr[n];
      const int64_t count = p.ptr[n + 1] - p.ptr[n];  // a multiple of 8
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (int64_t j = 0; j < count; j += 4) {
        s0 += v[j] * xr[id[j]];
        s1 += v[j + 1] * xr[id[j + 1]];
        s2 += v[j + 2] * xr[id[j + 2]];
        s3 += v[j + 3] * xr[id[j + 3]];
      }
      y[r * y_stride + n] = bias[n] + ((s0 + s1) + (s2 + s3));
    }
  }
}

}  // namespace

const Kernels& PortableKernels() {
  static const Kernels k = {
      {TilePortable<uint16_t, 8, 8>, TilePortable<uint16_t, 16, 16>, TilePortable<uint16_t, 32, 32>},
      {TilePortable<int32_t, 8, 8>, TilePortable<int32_t, 16, 16>, TilePortable<int32_t, 32, 32>},
      {TilePortable<int32_t, 8, 1>, TilePortable<int32_t, 16, 1>, TilePortable<int32_t, 32, 1>},
      GatherPortable<uint16_t>,
      GatherPortable<int32_t>,
  };
  return k;
}

const Kernels& ChooseKernels() { return HasAvx2Fma() ? Avx2Kernels() : PortableKernels(); }

}  // namespace prune
}  // namespace onnxopt
