// The AVX2+FMA build of the FFT vector code: only the entry points carry the target attribute (see
// fft_impl.inc), and they are called only after HasAvx2Fma() said yes at kernel creation.
#include "fft.h"

#if defined(__x86_64__) || defined(__i386__)
#define FFT_NS avx2
#define FFT_TARGET __attribute__((target("avx2,fma")))
#include "fft_impl.inc"
#endif

namespace onnxopt {
namespace fft {

const Kernels& Avx2Kernels() {
#if defined(__x86_64__) || defined(__i386__)
  static const Kernels k{avx2::Forward, avx2::Inverse, avx2::Product, avx2::Scatter};
  return k;
#else
  return PortableKernels();  // never chosen: HasAvx2Fma() is false off x86
#endif
}

}  // namespace fft
}  // namespace onnxopt
