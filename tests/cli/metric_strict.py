"""Task metrics for the CLI tests of --eval (FILE.py:FUNCTION)."""

import numpy as np

from models.synthetic import mlp

_X = np.random.default_rng(7).standard_normal((32, 64)).astype(np.float32)
_REF: dict[str, np.ndarray] = {}


def _outputs(session) -> np.ndarray:
    return session.run(None, {"x": _X})[0]


def _reference() -> np.ndarray:
    if "y" not in _REF:
        import onnxruntime as ort

        m = mlp([64, 128, 96, 10], decay=0.8)
        _REF["y"] = ort.InferenceSession(m.SerializeToString()).run(None, {"x": _X})[0]
    return _REF["y"]


def exact_match(session) -> float:
    """1 if the outputs equal the original's bit for bit: no lossy rewrite passes."""
    return float(np.array_equal(_outputs(session), _reference()))


def negative_error(session) -> float:
    """Minus the relative L2 error against the original (higher is better)."""
    y, ref = _outputs(session), _reference()
    return -float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
