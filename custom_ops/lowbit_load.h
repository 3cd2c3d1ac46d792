// What LowBitMatMul and LowBitConv share at kernel creation: the checked attributes and the packed codes,
// scales and zero points of inputs Q, S, Z (format in lowbit.h). Not included by the AVX2 build.
#pragma once

#include <string>

#include "kernel_util.h"
#include "lowbit.h"

namespace onnxopt {
namespace lowbit {

constexpr int64_t kSlabFloats = 4096;  // x floats per K slab of batch 1 (16 KiB: stays in L1)

// Integer attribute `name`, required, within [lo, hi].
int64_t RequiredInt(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t lo, int64_t hi,
                    const std::string& where);

// Attributes bits and group_size, then inputs Q (1), S (2), Z (3) of a node computing n outputs over k inputs,
// checked (constant, dtypes, shapes, finite scales, zero points < 2^bits) and packed (lowbit.h).
Weights LoadWeights(const OrtApi* api, const OrtKernelInfo* info, int64_t k, int64_t n, const std::string& where);

}  // namespace lowbit
}  // namespace onnxopt
