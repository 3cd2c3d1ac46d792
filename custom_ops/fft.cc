// FFT plans: twiddle tables and the row bit-reversal, computed in double and rounded once to float.
#include "fft.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace onnxopt {
namespace fft {

namespace {

bool IsPow2(int n) { return n >= 1 && (n & (n - 1)) == 0; }

// Stage-concatenated twiddles of an n-point FFT (see Plan).
void StageTwiddles(int n, std::vector<float>& re, std::vector<float>& im) {
  re.clear();
  im.clear();
  for (int half = 1; half < n; half *= 2) {
    for (int j = 0; j < half; ++j) {
      const double a = -M_PI * j / half;  // -2 pi j / (2 half)
      re.push_back(static_cast<float>(std::cos(a)));
      im.push_back(static_cast<float>(std::sin(a)));
    }
  }
}

}  // namespace

Plan::Plan(int th_, int tw_) : th(th_), tw(tw_) {
  if (!IsPow2(th) || !IsPow2(tw) || tw < 2) {
    throw std::invalid_argument("FFT tile " + std::to_string(th) + "x" + std::to_string(tw) +
                                " is not a power of two (columns >= 2)");
  }
  h = tw / 2;
  nbw = h + 1;
  bins = th * nbw;
  strip = th >= 128 ? 2 : 256 / th;
  StageTwiddles(th, col_re, col_im);
  StageTwiddles(h, row_re, row_im);
  int bits = 0;
  while ((1 << bits) < h) ++bits;
  row_bitrev.resize(h);
  for (int i = 0; i < h; ++i) {
    int r = 0;
    for (int b = 0; b < bits; ++b) r |= ((i >> b) & 1) << (bits - 1 - b);
    row_bitrev[i] = r;
  }
  real_re.resize(h + 1);
  real_im.resize(h + 1);
  for (int k = 0; k <= h; ++k) {
    const double a = -2.0 * M_PI * k / tw;
    real_re[k] = static_cast<float>(std::cos(a));
    real_im[k] = static_cast<float>(std::sin(a));
  }
}

}  // namespace fft
}  // namespace onnxopt
