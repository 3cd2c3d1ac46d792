// FFTConv: convolution by the convolution theorem, tile by tile (overlap-save), strides by polyphase.
//
// Semantics (the numpy reference is onnxopt/reference/fftconv.py):
//   inputs : X float32 [N, C, H, W]; W float32 [M, C, KH, KW], a constant initializer; B float32 [M],
//            optional, a constant initializer
//   attrs  : pads ints [top, left, bottom, right] (default 0); strides ints [sh, sw] (default 1);
//            dilations (all ones), group (1), kernel_shape ([KH, KW]) accepted only with those values
//   output : Y float32 [N, M, OH, OW], OH = (H + top + bottom - KH) / sh + 1, OW likewise; equal to
//            ONNX Conv(X, W, B, pads, strides)
//
// The math:
//   polyphase: with x_p the zero-padded input, a strided correlation is a sum over the s_h * s_w phases
//     (p, q) of stride-1 correlations: y[i, j] = sum_{c, p, q} sum_{a, b} x_{c,p,q}[i + a, j + b] w_{c,p,q}[a, b]
//     with x_{c,p,q}[i, j] = x_p[c, s_h i + p, s_w j + q], w_{c,p,q}[a, b] = W[c, s_h a + p, s_w b + q]:
//     C' = C s_h s_w channels and a kernel of ceil(KH / s_h) x ceil(KW / s_w); the FFTs stay small.
//   tiles (overlap-save): an input tile of th x tw yields (th - kh' + 1) x (tw - kw' + 1) outputs of the
//     circular correlation that do not wrap around; tiles step by that and the rest is discarded.
//   convolution theorem, channel sum in the Fourier domain: per tile
//     Y_m = IFFT( sum_c conj(FFT(w_{m,c})) . FFT(x_c) )
//     one forward FFT per input channel, one complex GEMM [M x C'] x [C' x tiles] per frequency bin, one
//     inverse FFT per output channel.
//   1-D kernels along H (KW' = 1) are handled transposed, so that the real FFT runs along the long axis.
#pragma once

#include <cstddef>
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "fft.h"
#include "onnxruntime_lite_custom_op.h"

namespace onnxopt {
namespace fftconv {

// One axis of the stride-1 problem the kernel solves (after the polyphase split and the transposition).
struct Axis {
  int64_t in = 1, pad = 0, stride = 1, k = 1;  // X extent, leading pad, stride, kernel extent (original)
  int64_t keff = 1;                            // ceil(k / stride): the phase kernel extent
  int64_t out = 1;                             // output extent
  int64_t x_step = 1, y_step = 1;              // element step along this axis in an X / Y plane
  int t = 1;                                   // FFT tile extent
  int64_t tile_out = 1, tiles = 1;             // outputs per tile, tiles along the axis
};

// Filter spectra for one tile size: conj(FFT(w_{m,c'})) / (th * tw), laid out [M/8][bins][C'][re 8, im 8].
struct Spectra {
  Spectra(int th, int tw) : plan(th, tw) {}
  fft::Plan plan;
  std::vector<float> w;
};

// The geometry of one call.
struct Geometry {
  int64_t n = 0, c = 0, m = 0;
  int64_t cp = 0, cgroups = 0, mgroups = 0;  // C' = C s_h s_w, ceil(C' / 8), ceil(M / 8)
  int64_t xk = 8;  // input spectra floats per channel group and part (re, im): min(C', 8), no padding lanes
  Axis u, v;                                 // u: the complex (column) FFT axis; v: the real (row) FFT axis
  int64_t TilesPerImage() const { return u.tiles * v.tiles; }
};

// FFT tile extents (th, tw) for the geometry, chosen by a cost model of FFTs, products and spectra traffic.
std::pair<int, int> ChooseTiles(const Geometry& g);

}  // namespace fftconv

struct FFTConvKernel {
  FFTConvKernel(const OrtApi* api, const OrtKernelInfo* info);

  size_t PresentInputs() const { return present_inputs_; }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& W, std::optional<const Ort::Custom::Tensor<float>*> B,
                      Ort::Custom::Tensor<float>& Y);

 private:
  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& X, const Ort::Custom::Tensor<float>& W,
           std::optional<const Ort::Custom::Tensor<float>*> B, Ort::Custom::Tensor<float>& Y);
  fftconv::Geometry MakeGeometry(const std::vector<int64_t>& xs) const;
  std::shared_ptr<const fftconv::Spectra> SpectraFor(const fftconv::Geometry& g);
  std::string Where() const;

  std::string node_name_;
  size_t present_inputs_ = 0;
  int64_t m_ = 0, c_ = 0, kh_ = 0, kw_ = 0;
  std::array<int64_t, 4> pads_{};  // top, left, bottom, right
  int64_t strides_[2] = {1, 1};
  bool transposed_ = false;  // 1-D kernel along H: the real FFT runs along H
  std::vector<float> w_;     // [M, C, KH, KW]
  std::vector<float> bias_;  // [M] or empty
  const fft::Kernels* kernels_ = nullptr;
  std::mutex mu_;  // guards spectra_
  std::map<std::pair<int, int>, std::shared_ptr<const fftconv::Spectra>> spectra_;
};

}  // namespace onnxopt
