// The AVX2+FMA build of the FFT vector code: only the entry points carry the target attribute (see
// fft_impl.inc), and they are called only after HasAvx2Fma() said yes at kernel creation.
#include "fft.h"

#if defined(__x86_64__) || defined(__i386__)
#define FFT_NS avx2
#define FFT_TARGET __attribute__((target("avx2,fma")))
#include <immintrin.h>
#define FFT_STREAM(p, v) _mm256_stream_ps((p), (__m256)(v))
#define FFT_FENCE _mm_sfence
#define FFT_BROADCAST(p) ((V8)_mm256_broadcast_ss(p))
#include "fft_impl.inc"
#endif

namespace onnxopt {
namespace fft {

const Kernels& Avx2Kernels() {
#if defined(__x86_64__) || defined(__i386__)
  static const Kernels k{avx2::Forward, avx2::InverseRows, avx2::ProductCols,
                         avx2::Scatter,      avx2::StreamRows,  avx2::StreamEnd};
  return k;
#else
  return PortableKernels();  // never chosen: HasAvx2Fma() is false off x86
#endif
}

}  // namespace fft
}  // namespace onnxopt
