"""Real models through the whole engine: optimize under the default budget, verify, load with the library.

The done criteria of the foundation: lowrank on the Fashion-MNIST classifier at the default budget loses at
most 0.5 points of top-1 and makes it smaller; every optimized real model passes verification and runs in a
plain onnxruntime session with onnxopt's library registered.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

import onnxopt
from models import fashion_mnist, ocr
from onnxopt.budget import OutputBudget
from onnxopt.data import load_npz, take
from onnxopt.manager import optimize
from onnxopt.passes import make_passes
from onnxopt.verify import compare_models

ROOT = Path(__file__).resolve().parents[2]


def _plain_session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.register_custom_ops_library(onnxopt.get_library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _optimize(model, calib, methods, max_error=1e-2):
    feeds = load_npz(calib, model)
    # Without timing: these tests are about exactness and loading, not about which layers are faster.
    settings = {m: {"measure": "0"} for m in ("winograd", "fftconv", "depthwise")}
    budget = OutputBudget(model, feeds, max_error)
    result = optimize(model, make_passes(methods), feeds, budget, max_error, settings=settings)
    onnx.checker.check_model(result.model)
    worst = max(e.rel_l2 for e in compare_models(model, result.model, feeds))
    assert worst <= max_error, f"{methods}: verification {worst:.3g} > budget {max_error}"
    return result, feeds


@pytest.mark.slow
def test_fashion_mnist_lowrank_default_budget(tmp_path):
    model = onnx.load(str(ROOT / "models" / "fashion_mnist.onnx"))
    calib = fashion_mnist.write_calibration(tmp_path / "calib.npz", n=256)
    result, _ = _optimize(model, calib, ["lowrank"])
    assert result.changed and result.model.ByteSize() < model.ByteSize()
    base = fashion_mnist.top1(_plain_session(model))
    opt = fashion_mnist.top1(_plain_session(result.model))
    assert base - opt <= 0.5, f"top-1 {base:.2f} -> {opt:.2f}"


@pytest.mark.slow
def test_fashion_mnist_winograd_exact(tmp_path):
    model = onnx.load(str(ROOT / "models" / "fashion_mnist.onnx"))
    calib = fashion_mnist.write_calibration(tmp_path / "calib.npz", n=16)
    result, feeds = _optimize(model, calib, ["winograd"], max_error=1e-5)
    assert sum(n.op_type == "WinogradConv" for n in result.model.graph.node) >= 3
    _plain_session(result.model).run(None, take(feeds, 2))


@pytest.mark.slow
@pytest.mark.parametrize(
    "which,methods",
    [("rec", ["lowrank"]), ("det", ["winograd", "fftconv", "depthwise"]), ("cls", ["lowrank", "winograd"])],
)
def test_ocr_models_optimize_verify_and_load(tmp_path, which, methods):
    path = ocr.fetch()[which]
    model = onnx.load(str(path))
    writer = {
        "rec": ocr.write_calibration,
        "det": ocr.write_det_calibration,
        "cls": ocr.write_cls_calibration,
    }
    calib = writer[which](tmp_path / "calib.npz", n=2 if which == "det" else 8)
    # The recognizer's SVTR layers barely factorize at the default budget: a looser one makes sure this
    # tests rewriting, verifying and loading it.
    result, feeds = _optimize(model, calib, methods, max_error=5e-2 if which == "rec" else 1e-2)
    _plain_session(result.model).run(None, take(feeds, 1))
    if which == "det":  # PP-OCRv4's detector has both dense 3x3 and depthwise 3x3 convolutions
        ops = {n.op_type for n in result.model.graph.node}
        assert {"WinogradConv", "DepthwiseConv"} <= ops, sorted(ops)
    if which == "rec" and result.changed:
        base, opt = ocr.cer(_plain_session(model), n=60), ocr.cer(_plain_session(result.model), n=60)
        assert opt - base <= 2.0, f"CER {base:.2f} -> {opt:.2f}"
