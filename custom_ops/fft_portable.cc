// The portable build of the FFT vector code (generic 8-float vectors, SSE2 on x86-64): always compiled,
// used where the CPU lacks AVX2/FMA or ONNXOPT_DISABLE_AVX2=1.
#define FFT_NS portable
#define FFT_TARGET
#include "fft_impl.inc"

namespace onnxopt {
namespace fft {

const Kernels& PortableKernels() {
  static const Kernels k{portable::Forward, portable::InverseRows, portable::ProductCols,
                         portable::Scatter, portable::StreamRows,  portable::StreamEnd};
  return k;
}

}  // namespace fft
}  // namespace onnxopt
