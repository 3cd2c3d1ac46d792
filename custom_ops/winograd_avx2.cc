// WinogradConv's compute built for AVX2 + FMA (CMake compiles this file with -mavx2 -mfma); used only when the
// CPU has them (HasAvx2Fma()).
#define WINOGRAD_ISA avx2
#include "winograd_impl.h"
