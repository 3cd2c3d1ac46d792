// WinogradConv's compute built for the baseline instruction set: the path for CPUs without AVX2/FMA, and the
// one tests compare against (ONNXOPT_DISABLE_AVX2=1).
#define WINOGRAD_ISA portable
#include "winograd_impl.h"
