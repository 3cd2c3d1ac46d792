// WinogradConv: 3x3, stride-1 convolution computed with Winograd's minimal filtering F(2x2, 3x3) or F(4x4, 3x3).
//
// Semantics (the numpy reference is onnxopt/reference/winograd.py):
//   inputs : X float32 [N, C, H, W]; W float32 [M, C, 3, 3], a constant initializer; B float32 [M], optional,
//            a constant initializer
//   attrs  : pads ints [top, left, bottom, right] (ONNX Conv order), default 0; tile int 2 or 4, default 2
//   output : Y float32 [N, M, H + top + bottom - 2, W + left + right - 2], equal to ONNX Conv(X, W, B, pads)
//
// Per output tile of t x t (t = tile; input window a x a, a = t + 2, windows at stride t; E = a^2):
//   U = G g G^T            (a x a per (m, c); once, in the kernel constructor)
//   V = B^T d B            (a x a per (c, tile))
//   M[e] = U[e] V[e]       (E independent GEMMs, e = a xi + nu: [M x C] x [C x tiles])
//   Y = A^T M A            (t x t per (m, tile)), plus bias
// F(2x2): 16 products per (m, c, tile) for 4 outputs (2.25x fewer than direct); F(4x4): 36 for 16 (4x fewer).
// The matrices are in the reference module.
//
// Layouts: U packed [E][C / 128][ceil(M/6)][128][6] (zero rows past M) for the 6-row GEMM micro-kernel; per block of
// tiles, V [E][G][C][8] and R [M chunk][G][E][8] with G = groups of 8 tiles (one vector lane per tile).
#pragma once

#include <cstddef>
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

namespace onnxopt {
namespace winograd {

constexpr int64_t kMaxBlockTiles = 64;  // a multiple of 16 (two vector groups of the micro-kernel)
constexpr int64_t kRowBlock = 6;        // rows of U per micro-kernel step
constexpr int64_t kSliceC = 128;        // input channels per pass of the micro-kernel (U is packed by slices)

// Elements of a transformed tile for output tile edge t: (t + 2)^2.
constexpr int Elems(int tile) { return (tile + 2) * (tile + 2); }

// Geometry of one call.
struct ConvGeometry {
  int64_t n = 0, c = 0, h = 0, w = 0;  // input
  int64_t m = 0;                       // output channels
  int64_t pad_top = 0, pad_left = 0;
  int64_t oh = 0, ow = 0;        // output spatial size
  int64_t tiles_h = 0, tiles_w = 0;  // tiles per image along each axis
  int tile = 2;                      // output tile edge
  int64_t TilesPerImage() const { return tiles_h * tiles_w; }
};

// U = G g G^T for w [M, C, 3, 3], computed in double and packed as [E][C slices][ceil(M/6)][slice][6]: the
// GEMMs run slice by slice, and each slice of U is then one sequential stream.
std::vector<float> PackWeights(const float* w, int64_t m, int64_t c, int tile);

// Floats between V[e] and V[e + 1] of a block of `tiles` tiles: one cache line more than the data, so that the
// E stores of one transformed tile do not all fall into the same L1 set (with power-of-two channel counts the
// data alone is a multiple of 4 KiB).
inline int64_t VStrideFloats(int64_t groups, int64_t c) { return groups * c * 8 + 16; }
inline size_t VFloats(const ConvGeometry& g, int64_t tiles) {
  return static_cast<size_t>(Elems(g.tile) * VStrideFloats((tiles + 7) / 8, g.c));
}
// Floats of the GEMM results R of a block of `tiles` tiles and `m_chunk` output channels.
size_t RFloats(const ConvGeometry& g, int64_t tiles, int64_t m_chunk);

// Tiles per block (<= kMaxBlockTiles): bounded so that V and R of one block stay in L2 whatever the image size.
int64_t BlockTiles(const ConvGeometry& g);

// Chunks of output channels per block of tiles: deep layers have few tiles, so their work is also split over
// output channels (each task then reads only its slice of U). OutputChunkRange gives chunk `chunk`'s channels
// [m_begin, m_end), m_begin a multiple of 6 (the micro-kernel's rows).
int64_t OutputChunks(const ConvGeometry& g, int64_t tile_blocks);
void OutputChunkRange(const ConvGeometry& g, int64_t chunks, int64_t chunk, int64_t* m_begin, int64_t* m_end);

// The two stages of a block of tiles [tile_begin, tile_end) of the flattened (image, tile row, tile col) index:
//   TransformInput : V of input channels [c_begin, c_end) (v holds VFloats(g, tiles));
//   MultiplyOutput : output channels [m_begin, m_end) (m_begin a multiple of 6) from the block's complete V;
//                    r holds RFloats(g, tiles, m_end - m_begin); bias may be null.
// One build per instruction set; the kernel picks one at creation.
#define ONNXOPT_WINOGRAD_STAGES                                                                                \
  void TransformInput(const ConvGeometry& g, const float* x, int64_t tile_begin, int64_t tile_end,              \
                      int64_t c_begin, int64_t c_end, float* v);                                               \
  void MultiplyOutput(const ConvGeometry& g, const float* v, const float* u, const float* bias, float* y,      \
                      int64_t tile_begin, int64_t tile_end, int64_t m_begin, int64_t m_end, float* r);
namespace avx2 {
ONNXOPT_WINOGRAD_STAGES
}
namespace portable {
ONNXOPT_WINOGRAD_STAGES
}
#undef ONNXOPT_WINOGRAD_STAGES

struct Stages {
  decltype(&avx2::TransformInput) transform;
  decltype(&avx2::MultiplyOutput) multiply;
};

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
  std::array<int64_t, 4> pads_{};  // top, left, bottom, right
  int tile_ = 2;
  winograd::Stages stages_{};
  std::vector<float> u_;            // packed, see PackWeights
  std::vector<float> bias_;         // [M] or empty
};

}  // namespace onnxopt
