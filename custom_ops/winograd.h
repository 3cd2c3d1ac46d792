// WinogradConv: 3x3, stride-1 convolution computed with Winograd's minimal filtering F(2x2, 3x3).
//
// Semantics (the numpy reference is onnxopt/reference/winograd.py):
//   inputs : X float32 [N, C, H, W]; W float32 [M, C, 3, 3], a constant initializer; B float32 [M], optional,
//            a constant initializer
//   attrs  : pads ints [top, left, bottom, right] (ONNX Conv order), default 0
//   output : Y float32 [N, M, H + top + bottom - 2, W + left + right - 2], equal to ONNX Conv(X, W, B, pads)
//
// Per output tile of 2x2 (input tile 4x4, tiles at stride 2):
//   U = G g G^T            (4x4 per (m, c); once, in the kernel constructor)
//   V = B^T d B            (4x4 per (c, tile))
//   M[e] = U[e] V[e]       (16 independent GEMMs, e = 4 xi + nu: [M x C] x [C x tiles])
//   Y = A^T M A            (2x2 per (m, tile)), plus bias
// with
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//   G   = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
//   A^T = [1 1 1 0; 0 1 -1 -1]
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

namespace onnxopt {
namespace winograd {

constexpr int kTileIn = 4;    // input tile edge
constexpr int kTileOut = 2;   // output tile edge
constexpr int kElems = 16;    // elements of a transformed tile
constexpr int64_t kMaxBlockTiles = 64;

// Geometry of one call.
struct ConvGeometry {
  int64_t n = 0, c = 0, h = 0, w = 0;  // input
  int64_t m = 0;                       // output channels
  int64_t pad_top = 0, pad_left = 0;
  int64_t oh = 0, ow = 0;        // output spatial size
  int64_t tiles_h = 0, tiles_w = 0;  // tiles per image along each axis
  int64_t TilesPerImage() const { return tiles_h * tiles_w; }
};

// U[e][m][c] (layout [16, M, C]) from w [M, C, 3, 3].
void TransformWeights(const float* w, int64_t m, int64_t c, float* u);

// Floats of scratch one block of `block_tiles` tiles needs (transformed input and the GEMM results).
size_t ScratchFloats(const ConvGeometry& g, int64_t block_tiles);

// Tiles per block: bounded so that the scratch of one block stays small whatever the image size.
int64_t BlockTiles(const ConvGeometry& g);

// Output channels per task: deep layers have few tiles, so their work is also split over output channels
// (each task then reads only its slice of U). A multiple of 4 (the GEMM's row block), at least 16 or M.
int64_t OutputChunk(const ConvGeometry& g, int64_t tile_blocks);

// Computes output channels [m_begin, m_end) of the tiles [tile_begin, tile_end) of the flattened (image,
// tile row, tile col) index into y. bias may be null. scratch holds ScratchFloats(g, tile_end - tile_begin).
void ComputeTiles(const ConvGeometry& g, const float* x, const float* u, const float* bias, float* y,
                  int64_t tile_begin, int64_t tile_end, int64_t m_begin, int64_t m_end, float* scratch);

}  // namespace winograd

// The kernel: weights are read and transformed once, here, at session creation.
struct WinogradConvKernel {
  WinogradConvKernel(const OrtApi* api, const OrtKernelInfo* info);

  // Number of inputs the node really has (a trailing absent optional input, named "", is not counted).
  size_t PresentInputs() const { return present_inputs_; }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& W, std::optional<const Ort::Custom::Tensor<float>*> B,
                      Ort::Custom::Tensor<float>& Y);

 private:
  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X, const Ort::Custom::Tensor<float>& W,
           std::optional<const Ort::Custom::Tensor<float>*> B, Ort::Custom::Tensor<float>& Y) const;
  std::string Where() const;

  std::string node_name_;
  size_t present_inputs_ = 0;
  int64_t m_ = 0, c_ = 0;
  int64_t pads_[4] = {0, 0, 0, 0};  // top, left, bottom, right
  std::vector<float> u_;            // [16, M, C]
  std::vector<float> bias_;         // [M] or empty
};

}  // namespace onnxopt
