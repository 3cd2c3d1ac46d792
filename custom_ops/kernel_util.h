// What every onnxopt kernel shares: error helpers, attribute and constant-input readers that validate, CPU
// feature detection for the AVX2 paths, and the op wrapper that keeps exceptions out of onnxruntime.
#pragma once

#include <array>
#include <cstdint>
#include <exception>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

namespace onnxopt {

// Throws an Ort::Exception "<where>: <msg>"; the op wrapper turns it into an error status.
[[noreturn]] void Fail(const std::string& where, const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT);

// "[1, 2, 3]".
std::string ShapeStr(const std::vector<int64_t>& shape);

// "<Op> node '<name>'" (or just "<Op>" for an unnamed node): the prefix of every message of a kernel.
std::string Where(const char* op, const std::string& node_name);

// Number of inputs the node really has: a trailing absent optional input (named "") is not counted.
size_t PresentInputs(const Ort::ConstKernelInfo& info);

// The INTS attribute `name`; nullopt if absent; an error if present with another type.
std::optional<std::vector<int64_t>> IntsAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                                                  const std::string& where);

// The INT attribute `name`; nullopt if absent; an error if present with another type.
std::optional<int64_t> IntAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                                    const std::string& where);

// The STRING attribute `name`; nullopt if absent; an error if present with another type.
std::optional<std::string> StringAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                                           const std::string& where);

// The FLOAT attribute `name`; nullopt if absent; an error if present with another type (an int included).
std::optional<float> FloatAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                                    const std::string& where);

// Fails unless the INTS attribute `name` is absent or all ones (strides, dilations of a stride-1 op).
void RequireAllOnes(const OrtApi* api, const OrtKernelInfo* info, const char* name, const std::string& where);

// A constant float32 input (an initializer), copied, with its shape; fails with a message naming the input
// when it is not constant or not float32.
struct ConstantTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};
ConstantTensor ConstantFloatInput(const Ort::ConstKernelInfo& info, size_t index, const char* what,
                                  const std::string& where);

// A constant int64 input of `shape` [rows, n] whose every row is a permutation of 0 .. n-1 (an index out of
// range would read out of bounds), checked, with messages naming `what`.
std::vector<int64_t> ConstantPermutations(const Ort::ConstKernelInfo& info, size_t index, const char* what,
                                          const std::vector<int64_t>& shape, const std::string& where);

// The inputs of a convolution-like node, (X, W) or (X, W, B), checked; returns how many are present.
size_t ConvInputs(const Ort::ConstKernelInfo& info, const std::string& where);

// The INTS attribute `pads` as [top, left, bottom, right] (zeros if absent), checked: 4 non-negative values.
std::array<int64_t, 4> ReadPads(const OrtApi* api, const OrtKernelInfo* info, const std::string& where);

// The optional constant bias B (input 2) of `count` values, named `dim` in messages ("M", "C"); empty when
// the node has only `present` = 2 inputs.
std::vector<float> ConstantBias(const Ort::ConstKernelInfo& info, size_t present, int64_t count, const char* dim,
                                const std::string& where);

// At run time: W and B, read as constants at kernel creation, must still have the shapes they had then.
void CheckConstantShapes(const std::vector<int64_t>& w_now, const std::vector<int64_t>& w_created,
                         const std::vector<int64_t>* b_now, int64_t bias_count, const std::string& where);

// Runs fn(data, i) for i < tasks: inline for one task, else through the kernel context's ParallelFor (the
// session's thread pool; never threads of our own). fn must not throw: it records failures in `data`.
void RunTasks(OrtKernelContext* context, void (*fn)(void*, size_t), int64_t tasks, void* data);

// Whether this CPU (and OS) runs AVX2 and FMA instructions; the AVX2 paths are chosen at run time with it, the
// portable path is always compiled beside them. ONNXOPT_DISABLE_AVX2=1 in the environment (read when a kernel is
// created) forces the portable path.
bool HasAvx2Fma();

// AVX-512 extensions a kernel may ask for beyond AVX-512F (bit flags, or-ed).
enum Avx512Feature : unsigned {
  kAvx512Bw = 1u << 0,
  kAvx512Vl = 1u << 1,
  kAvx512Vnni = 1u << 2,
  kAvx512Vpopcntdq = 1u << 3,
};
// Whether this CPU has AVX-512F and every feature in `features` (CPUID leaf 7) and the OS saves the AVX-512
// state (XGETBV: opmask, ZMM upper halves and ZMM16-31 enabled). ONNXOPT_DISABLE_AVX512=1 in the environment
// (read at each call, i.e. at kernel creation) says no, so that tests and benchmarks can run the AVX2 paths.
bool HasAvx512(unsigned features);

// The lite-API struct op for Kernel, with kernel creation and compute wrapped so that no exception crosses into
// onnxruntime: every failure becomes an OrtStatus with the message. Kernel needs a constructor
// (const OrtApi*, const OrtKernelInfo*), PresentInputs() and the Compute of the lite API.
template <typename Kernel>
struct SafeOp : Ort::Custom::OrtLiteCustomStruct<Kernel> {
  using Base = Ort::Custom::OrtLiteCustomStruct<Kernel>;

  explicit SafeOp(const char* name) : Base(name, "CPUExecutionProvider", 1) {
    op_name_ = name;
    OrtCustomOp::CreateKernelV2 = [](const OrtCustomOp* this_, const OrtApi* api, const OrtKernelInfo* info,
                                     void** kernel_out) -> OrtStatusPtr {
      try {
        auto kernel = std::make_unique<typename Base::Kernel>();
        Ort::ThrowOnError(api->KernelInfo_GetOutputCount(info, &kernel->num_output_));
        kernel->custom_op_ = std::make_unique<Kernel>(api, info);
        // Only present inputs: the lite API would otherwise read an absent trailing optional input.
        kernel->num_input_ = kernel->custom_op_->PresentInputs();
        kernel->ep_ = static_cast<const SafeOp*>(this_)->execution_provider_;
        *kernel_out = kernel.release();
        return nullptr;
      } catch (const Ort::Exception& e) {
        return api->CreateStatus(e.GetOrtErrorCode(), e.what());
      } catch (const std::exception& e) {
        return api->CreateStatus(ORT_FAIL, (op_name_ + ": " + e.what()).c_str());
      } catch (...) {
        return api->CreateStatus(ORT_FAIL, (op_name_ + ": unknown error while creating the kernel").c_str());
      }
    };
    base_compute_ = OrtCustomOp::KernelComputeV2;
    OrtCustomOp::KernelComputeV2 = [](void* kernel, OrtKernelContext* context) -> OrtStatusPtr {
      try {
        return base_compute_(kernel, context);  // reads the inputs, then Kernel::Compute
      } catch (const Ort::Exception& e) {
        return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), (op_name_ + ": " + e.what()).c_str());
      } catch (const std::exception& e) {
        return Ort::GetApi().CreateStatus(ORT_FAIL, (op_name_ + ": " + e.what()).c_str());
      } catch (...) {
        return Ort::GetApi().CreateStatus(ORT_FAIL, (op_name_ + ": unknown error").c_str());
      }
    };
  }

  static inline OrtStatusPtr(ORT_API_CALL* base_compute_)(void*, OrtKernelContext*) = nullptr;
  static inline std::string op_name_;
};

// Runs f() and turns any exception into an error status (the body of every kernel's Compute).
template <typename F>
Ort::Status Guarded(const std::string& where, F&& f) {
  try {
    f();
    return Ort::Status{nullptr};
  } catch (const Ort::Exception& e) {
    return Ort::Status{e};
  } catch (const std::bad_alloc&) {
    return Ort::Status{(where + ": out of memory").c_str(), ORT_FAIL};
  } catch (const std::exception& e) {
    return Ort::Status{(where + ": " + e.what()).c_str(), ORT_FAIL};
  } catch (...) {
    return Ort::Status{(where + ": unknown error").c_str(), ORT_FAIL};
  }
}

}  // namespace onnxopt
