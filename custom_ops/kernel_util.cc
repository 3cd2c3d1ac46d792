// Shared kernel helpers (see kernel_util.h).
#include "kernel_util.h"

#include <algorithm>
#include <cstdlib>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace onnxopt {

void Fail(const std::string& where, const std::string& msg, OrtErrorCode code) {
  throw Ort::Exception(where + ": " + msg, code);
}

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string Where(const char* op, const std::string& node_name) {
  return std::string(op) + (node_name.empty() ? std::string() : " node '" + node_name + "'");
}

size_t PresentInputs(const Ort::ConstKernelInfo& info) {
  size_t n = info.GetInputCount();
  while (n > 0 && info.GetInputName(n - 1).empty()) --n;
  return n;
}

namespace {

// Whether the node carries an attribute `name` of any of the types a kernel can read.
bool HasAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name) {
  auto ok = [api](OrtStatus* st) {
    if (st == nullptr) return true;
    api->ReleaseStatus(st);
    return false;
  };
  size_t n = 0;
  int64_t i = 0;
  float f = 0;
  return ok(api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n)) ||
         ok(api->KernelInfoGetAttribute_int64(info, name, &i)) ||
         ok(api->KernelInfoGetAttributeArray_float(info, name, nullptr, &n)) ||
         ok(api->KernelInfoGetAttribute_float(info, name, &f)) ||
         ok(api->KernelInfoGetAttribute_string(info, name, nullptr, &n));
}

}  // namespace

std::optional<std::vector<int64_t>> IntsAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                                                  const std::string& where) {
  size_t n = 0;
  OrtStatus* st = api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n);
  if (st == nullptr) {
    // onnxruntime reads a FLOATS attribute as an empty list of ints: tell the two apart.
    size_t nf = 0;
    if (n == 0) {
      if (OrtStatus* fst = api->KernelInfoGetAttributeArray_float(info, name, nullptr, &nf)) {
        api->ReleaseStatus(fst);
        nf = 0;
      }
    }
    if (nf > 0) Fail(where, std::string("attribute '") + name + "' must be a list of ints, got floats");
    std::vector<int64_t> values(n);
    if (n > 0) Ort::ThrowOnError(api->KernelInfoGetAttributeArray_int64(info, name, values.data(), &n));
    return values;
  }
  api->ReleaseStatus(st);
  if (HasAttribute(api, info, name)) Fail(where, std::string("attribute '") + name + "' must be a list of ints");
  return std::nullopt;
}

std::optional<int64_t> IntAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                                    const std::string& where) {
  int64_t value = 0;
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &value);
  if (st == nullptr) return value;
  api->ReleaseStatus(st);
  if (HasAttribute(api, info, name)) Fail(where, std::string("attribute '") + name + "' must be an int");
  return std::nullopt;
}

std::optional<std::string> StringAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                                           const std::string& where) {
  size_t size = 0;
  if (OrtStatus* st = api->KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
    api->ReleaseStatus(st);
    if (HasAttribute(api, info, name)) Fail(where, std::string("attribute '") + name + "' must be a string");
    return std::nullopt;
  }
  std::string value(size, '\0');
  Ort::ThrowOnError(api->KernelInfoGetAttribute_string(info, name, value.data(), &size));
  value.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  return value;
}

std::optional<float> FloatAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                                    const std::string& where) {
  float value = 0;
  if (OrtStatus* st = api->KernelInfoGetAttribute_float(info, name, &value)) {
    api->ReleaseStatus(st);
    int64_t i = 0;
    if (OrtStatus* ist = api->KernelInfoGetAttribute_int64(info, name, &i)) {
      api->ReleaseStatus(ist);
      return std::nullopt;
    }
    Fail(where, std::string("attribute '") + name + "' must be a float, got an int");
  }
  return value;
}

void RequireAllOnes(const OrtApi* api, const OrtKernelInfo* info, const char* name, const std::string& where) {
  auto v = IntsAttribute(api, info, name, where);
  if (!v) return;
  for (int64_t x : *v) {
    if (x != 1) Fail(where, std::string("only ") + name + " = 1 is supported, got " + ShapeStr(*v));
  }
}

ConstantTensor ConstantFloatInput(const Ort::ConstKernelInfo& info, size_t index, const char* what,
                                  const std::string& where) {
  int is_constant = 0;
  Ort::ConstValue v = info.GetTensorConstantInput(index, &is_constant);
  if (!is_constant || v == nullptr) {
    Fail(where, std::string(what) + " (input " + std::to_string(index) + ", '" + info.GetInputName(index) +
                    "') must be a constant initializer: the kernel prepares it once at session creation");
  }
  auto type_shape = v.GetTensorTypeAndShapeInfo();
  if (type_shape.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    Fail(where, std::string(what) + " (input " + std::to_string(index) + ") must be float32");
  }
  ConstantTensor t;
  t.shape = type_shape.GetShape();
  const size_t count = type_shape.GetElementCount();
  const float* p = v.GetTensorData<float>();
  t.data.assign(p, p + count);
  return t;
}

std::vector<int64_t> ConstantPermutations(const Ort::ConstKernelInfo& info, size_t index, const char* what,
                                          const std::vector<int64_t>& shape, const std::string& where) {
  int is_constant = 0;
  Ort::ConstValue v = info.GetTensorConstantInput(index, &is_constant);
  if (!is_constant || v == nullptr) {
    Fail(where, std::string(what) + " (input " + std::to_string(index) + ", '" + info.GetInputName(index) +
                    "') must be a constant initializer: the kernel prepares it once at session creation");
  }
  auto type_shape = v.GetTensorTypeAndShapeInfo();
  if (type_shape.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
    Fail(where, std::string(what) + " (input " + std::to_string(index) + ") must be int64");
  }
  if (type_shape.GetShape() != shape) {
    Fail(where, std::string(what) + " must have shape " + ShapeStr(shape) + ", got " +
                    ShapeStr(type_shape.GetShape()));
  }
  const int64_t rows = shape.size() == 2 ? shape[0] : 0, n = shape.size() == 2 ? shape[1] : 0;
  const int64_t* p = v.GetTensorData<int64_t>();
  std::vector<int64_t> perm(p, p + rows * n);
  std::vector<char> seen(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t x = perm[r * n + i];
      if (x < 0 || x >= n || seen[x]) {
        Fail(where, std::string(what) + " row " + std::to_string(r) + " is not a permutation of 0 .. " +
                        std::to_string(n - 1));
      }
      seen[x] = 1;
    }
  }
  return perm;
}

size_t ConvInputs(const Ort::ConstKernelInfo& info, const std::string& where) {
  const size_t present = PresentInputs(info);
  if (present < 2 || present > 3) {
    Fail(where, "expects inputs (X, W) or (X, W, B), got " + std::to_string(present) + " inputs");
  }
  if (info.GetInputName(0).empty()) Fail(where, "input X (0) is missing");
  if (info.GetInputName(1).empty()) Fail(where, "input W (1) is missing");
  return present;
}

std::array<int64_t, 4> ReadPads(const OrtApi* api, const OrtKernelInfo* info, const std::string& where) {
  std::array<int64_t, 4> pads{0, 0, 0, 0};
  if (auto v = IntsAttribute(api, info, "pads", where)) {
    if (v->size() != 4) {
      Fail(where, "attribute 'pads' must have 4 values [top, left, bottom, right], got " + ShapeStr(*v));
    }
    for (size_t i = 0; i < 4; ++i) {
      if ((*v)[i] < 0) Fail(where, "attribute 'pads' must be non-negative, got " + ShapeStr(*v));
      pads[i] = (*v)[i];
    }
  }
  return pads;
}

std::vector<float> ConstantBias(const Ort::ConstKernelInfo& info, size_t present, int64_t count, const char* dim,
                                const std::string& where) {
  if (present < 3) return {};
  ConstantTensor b = ConstantFloatInput(info, 2, "B", where);
  if (b.shape.size() != 1 || b.shape[0] != count) {
    Fail(where, std::string("B must have shape [") + dim + "] = [" + std::to_string(count) + "], got " +
                    ShapeStr(b.shape));
  }
  return std::move(b.data);
}

void CheckConstantShapes(const std::vector<int64_t>& w_now, const std::vector<int64_t>& w_created,
                         const std::vector<int64_t>* b_now, int64_t bias_count, const std::string& where) {
  if (w_now != w_created) {
    Fail(where, "W has shape " + ShapeStr(w_now) + " at run time, but " + ShapeStr(w_created) +
                    " at kernel creation");
  }
  if (b_now != nullptr && *b_now != std::vector<int64_t>{bias_count}) {
    Fail(where, "B must have shape [" + std::to_string(bias_count) + "], got " + ShapeStr(*b_now));
  }
}

void RunTasks(OrtKernelContext* context, void (*fn)(void*, size_t), int64_t tasks, void* data) {
  if (tasks == 1) {
    fn(data, 0);
  } else if (tasks > 1) {
    Ort::KernelContext ctx{context};
    ctx.ParallelFor(fn, static_cast<size_t>(tasks), 0, data);
  }
}

bool HasAvx2Fma() {
  // ONNXOPT_DISABLE_AVX2=1 forces the portable paths (tests run both); read at each kernel creation.
  const char* off = std::getenv("ONNXOPT_DISABLE_AVX2");
  if (off != nullptr && off[0] != '\0' && std::string(off) != "0") return false;
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

namespace {

#if defined(__x86_64__) || defined(__i386__)
// The AVX-512 features of this CPU usable under this OS, as Avx512Feature bits plus bit 31 for AVX-512F.
unsigned Avx512Usable() {
  constexpr unsigned kF = 1u << 31;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) return 0;
  uint32_t xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  // SSE, AVX, opmask, ZMM0-15 upper halves, ZMM16-31: all saved on context switches.
  if ((xcr0_lo & 0xe6u) != 0xe6u) return 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
  unsigned f = 0;
  if (ebx & (1u << 16)) f |= kF;
  if (ebx & (1u << 30)) f |= kAvx512Bw;
  if (ebx & (1u << 31)) f |= kAvx512Vl;
  if (ecx & (1u << 11)) f |= kAvx512Vnni;
  if (ecx & (1u << 14)) f |= kAvx512Vpopcntdq;
  return f;
}
#endif

}  // namespace

bool HasAvx512(unsigned features) {
  const char* off = std::getenv("ONNXOPT_DISABLE_AVX512");
  if (off != nullptr && off[0] != '\0' && std::string(off) != "0") return false;
#if defined(__x86_64__) || defined(__i386__)
  static const unsigned usable = Avx512Usable();
  const unsigned need = features | (1u << 31);
  return (usable & need) == need;
#else
  (void)features;
  return false;
#endif
}

}  // namespace onnxopt
