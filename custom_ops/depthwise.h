// DepthwiseConv: 3x3 depthwise convolution (one filter per channel), stride 1 or 2, with an optional fused
// Relu or Clip (ReLU6).
//
// Semantics (the numpy reference is onnxopt/reference/depthwise.py):
//   inputs : X float32 [N, C, H, W]; W float32 [C, 1, 3, 3], a constant initializer; B float32 [C], optional,
//            a constant initializer
//   attrs  : pads ints [top, left, bottom, right] (ONNX Conv order), default 0; strides ints [s, s], s in {1, 2},
//            default 1; activation string "" | "relu" | "clip", with clip_min / clip_max floats for "clip";
//            group int, optional, must equal C; dilations all ones; kernel_shape [3, 3] if present
//   output : Y float32 [N, C, OH, OW], OH = (H + top + bottom - 3) / s + 1, OW = (W + left + right - 3) / s + 1,
//            Y[n, c, y, x] = act(B[c] + sum_{i, j < 3} W[c, 0, i, j] Xp[n, c, s y + i, s x + j])
//            with Xp the input zero-padded by the pads; equal to ONNX Conv(X, W, B, group = C) then act.
//
// How it is computed: a depthwise 3x3 convolution does 9 multiply-adds per output and reads each input once,
// so it is bound by loads and memory, not by arithmetic. Each output row reads three input rows, 8 outputs
// per AVX2 register. Stride 1 (AVX2) computes two output rows per pass (four input rows serve 16 outputs).
// On large planes it reads the input rows in place, with windowed loads only in the blocks that touch the
// padding. On small planes (7x7 .. 32x32) nearly every block touches the padding and per-row costs dominate,
// so each plane is first copied into a zero-padded buffer whose rows are a whole number of registers wide:
// every tap is then a plain load, and only a row's last block is stored in pieces. Stride 2, and the
// portable path, first copy each input row into a small ring of "prepared" rows that hold the zero padding
// (for stride 2 split into even and odd columns), so every tap is a plain contiguous read; the ring stays in L1.
#pragma once

#include <cstddef>
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

namespace onnxopt {
namespace depthwise {

constexpr int64_t kLanes = 8;     // floats per AVX2 register: output columns are computed in blocks of 8
constexpr int64_t kRingRows = 8;  // prepared input rows kept per task (3 are live; a power of two)
// Stride-1 planes at most this wide (input and output) take the small-plane path (AVX2), when their padded copy has at most
// kSmallPlaneFloats floats (it should stay in L1 beside the output rows).
constexpr int64_t kSmallWidth = 32;
constexpr int64_t kSmallPlaneFloats = 4096;

// Geometry of one call.
struct Geometry {
  int64_t n = 0, c = 0, h = 0, w = 0;  // input
  int64_t oh = 0, ow = 0;              // output spatial size
  int64_t pad_top = 0, pad_left = 0;
  int64_t stride = 1;
  int64_t ow_vec = 0;      // ow rounded up to a multiple of kLanes: the inner loop computes whole registers
  int64_t row_floats = 0;  // floats of one prepared input row
  // Small-plane path: row stride of the zero-padded copy (>= ow_vec + 2 and >= pad_left + w rounded up to
  // whole registers, a multiple of kLanes) and its rows (oh + 3: a lone last output row reads one row more).
  bool small = false;
  int64_t padded_stride = 0, padded_rows = 0;
};

// Fills ow_vec and row_floats from the other fields.
void Finish(Geometry& g);

// Elementwise activation applied to each output: min(max(v, lo), hi) when clamp.
struct Activation {
  bool clamp = false;
  float lo = 0.0f, hi = 0.0f;
};

// Floats of scratch one task needs (its ring of prepared rows and one padded row, or the padded plane). The
// task zeroes it once before its first ComputeRows: the padding of the small-plane copy and the zero row of
// the in-place stride-1 path are never written after that.
size_t ScratchFloats(const Geometry& g);

// Computes output rows [r0, r1) of one (n, c) plane. x: the input plane [H, W]; w9: the plane's 9 weights;
// y: the output plane [OH, OW]; scratch: ScratchFloats(g) floats, zeroed at the task's start and then only
// passed from one call to the next. avx2 selects the AVX2+FMA path.
void ComputeRows(const Geometry& g, const float* x, const float* w9, float bias, const Activation& act, float* y,
                 int64_t r0, int64_t r1, float* scratch, bool avx2);

// The AVX2 + FMA build of ComputeRows (depthwise_avx2.cc); only for CPUs with both.
void RowsAvx2(const Geometry& g, const float* x, const float* w9, float bias, const Activation& act, float* y,
              int64_t r0, int64_t r1, float* scratch);

}  // namespace depthwise

// The kernel: weights and bias are copied once, here, at session creation.
struct DepthwiseConvKernel {
  DepthwiseConvKernel(const OrtApi* api, const OrtKernelInfo* info);

  // Number of inputs the node really has (a trailing absent optional input, named "", is not counted).
  size_t PresentInputs() const { return present_inputs_; }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& W, std::optional<const Ort::Custom::Tensor<float>*> B,
                      Ort::Custom::Tensor<float>& Y);

 private:
  void ReadAttributes(const OrtApi* api, const OrtKernelInfo* info, const std::string& where);
  void ReadActivation(const OrtApi* api, const OrtKernelInfo* info, const std::string& where);
  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X, const Ort::Custom::Tensor<float>& W,
           std::optional<const Ort::Custom::Tensor<float>*> B, Ort::Custom::Tensor<float>& Y) const;
  std::string Where() const;

  std::string node_name_;
  size_t present_inputs_ = 0;
  int64_t c_ = 0;
  std::array<int64_t, 4> pads_{};  // top, left, bottom, right
  int64_t stride_ = 1;
  depthwise::Activation act_;
  bool avx2_ = false;
  std::vector<float> w_;     // [C, 9]
  std::vector<float> bias_;  // [C]; zeros when the node has no B
};

}  // namespace onnxopt
