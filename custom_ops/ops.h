// The list of onnxopt's custom operators. Each op's .cc defines its factory; register.cc adds them all to
// one domain. Adding an op = one factory declaration here + one line in register.cc.
#pragma once

#include "onnxruntime_lite_custom_op.h"

namespace onnxopt {

// Domain and version shared by every op (see onnxopt.DOMAIN on the Python side).
constexpr const char* kDomain = "onnxopt";
constexpr int kOpsetVersion = 1;

Ort::Custom::OrtLiteCustomOp* MakeWinogradConvOp();
Ort::Custom::OrtLiteCustomOp* MakeDepthwiseConvOp();
Ort::Custom::OrtLiteCustomOp* MakeFFTConvOp();
Ort::Custom::OrtLiteCustomOp* MakeCirculantMatMulOp();
Ort::Custom::OrtLiteCustomOp* MakeFastfoodMatMulOp();
Ort::Custom::OrtLiteCustomOp* MakeACDCMatMulOp();
Ort::Custom::OrtLiteCustomOp* MakeSparseGemmOp();
Ort::Custom::OrtLiteCustomOp* MakeSparseConvOp();
Ort::Custom::OrtLiteCustomOp* MakeLowBitMatMulOp();
Ort::Custom::OrtLiteCustomOp* MakeLowBitConvOp();
Ort::Custom::OrtLiteCustomOp* MakeBinaryMatMulOp();
Ort::Custom::OrtLiteCustomOp* MakeBinaryConvOp();

}  // namespace onnxopt
