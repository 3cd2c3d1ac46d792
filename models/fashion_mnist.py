"""Fashion-MNIST data, evaluator and calibration writer for models/fashion_mnist.onnx.

The data comes from the Debian package ``dataset-fashion-mnist`` (60k train / 10k test, IDX files gzipped
under /usr/share/datasets/fashion-mnist; set FASHION_MNIST_DIR to read them from elsewhere).

Preprocessing is done HERE, not in the graph: the model's input "input" is float32 [batch, 1, 28, 28] holding
``(pixel / 255 - MEAN) / STD`` with MEAN = 0.2860 and STD = 0.3530 (the training set's pixel mean and standard
deviation). The trainer (models/train_fashion_mnist.py) uses the same functions, so the two cannot drift.

Command line (from the repo root):
    python models/fashion_mnist.py calib OUT.npz [--n 256] [--seed 0]   # --calib file for the CLI
    python models/fashion_mnist.py eval MODEL.onnx [--n N]              # top-1 accuracy in percent

For the CLI's ``--eval MODULE:FUNCTION`` use ``models.fashion_mnist:top1`` (percent, higher is better).
Only numpy is needed at import time; onnxruntime only by ``main`` (``top1`` takes a ready session).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

MEAN = 0.2860  # training-set pixel mean after /255
STD = 0.3530  # training-set pixel standard deviation after /255
NUM_CLASSES = 10
INPUT_NAME = "input"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def data_dir() -> Path:
    """Directory holding the four IDX .gz files (FASHION_MNIST_DIR overrides the Debian location)."""
    return Path(os.environ.get("FASHION_MNIST_DIR", _DEFAULT_DIR))


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped IDX file (big-endian header: magic, then one uint32 per dimension)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file {path} not found. Install the Debian package: "
            "`sudo apt-get install dataset-fashion-mnist` (or set FASHION_MNIST_DIR to a directory "
            "holding train/t10k-*-ubyte.gz)."
        )
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload; the low byte is the number of dimensions
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.lru_cache(maxsize=2)
def _load_raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    # Cached because evaluators may be called many times in one process (e.g. once per budget step).
    img_name, lbl_name = _FILES[split]
    images = _read_idx(data_dir() / img_name)
    labels = _read_idx(data_dir() / lbl_name)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"Fashion-MNIST {split}: unexpected shapes {images.shape} / {labels.shape}")
    return images, labels


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 NCHW [N, 1, 28, 28] normalised as the model expects."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x[:, None, :, :])


def load_raw(split: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised uint8 images [N, 28, 28] and int64 labels of ``split`` ("train" or "test")."""
    images, labels = _load_raw(split)
    return images[:n].copy(), labels[:n].astype(np.int64)


def load_test(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """First ``n`` (default all 10,000) test samples: float32 [N, 1, 28, 28] and int64 labels [N]."""
    images, labels = load_raw("test", n)
    return preprocess(images), labels


def load_train(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """First ``n`` (default all 60,000) training samples: float32 [N, 1, 28, 28] and int64 labels [N]."""
    images, labels = load_raw("train", n)
    return preprocess(images), labels


def top1(session: Any, n: int | None = None, batch: int = 500) -> float:
    """Top-1 accuracy in percent of an onnxruntime InferenceSession on the (first n of the) 10k test set."""
    x, y = load_test(n)
    name = session.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch):
        logits = session.run(None, {name: x[i : i + batch]})[0]
        correct += int((np.asarray(logits).argmax(axis=1) == y[i : i + batch]).sum())
    return 100.0 * correct / len(x)


def write_calibration(path: str | Path, n: int = 256, seed: int = 0) -> Path:
    """Write an .npz for the CLI's --calib: key "input", ``n`` random training samples on axis 0."""
    x, _ = load_train()
    # Sample from the training set (never the test set) so calibration does not leak into the evaluation.
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{INPUT_NAME: x[idx]})
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line: ``calib OUT.npz`` or ``eval MODEL.onnx``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_cal = sub.add_parser("calib", help="write a calibration .npz keyed by the graph input name")
    p_cal.add_argument("out", type=Path)
    p_cal.add_argument("--n", type=int, default=256)
    p_cal.add_argument("--seed", type=int, default=0)
    p_ev = sub.add_parser("eval", help="top-1 accuracy (percent) of an ONNX model on the test set")
    p_ev.add_argument("model", type=Path)
    p_ev.add_argument("--n", type=int, default=None)
    args = parser.parse_args(argv)

    if args.cmd == "calib":
        out = write_calibration(args.out, n=args.n, seed=args.seed)
        print(f"wrote {out} ({args.n} samples, key {INPUT_NAME!r})")
    else:
        import onnxopt  # optimized models may use onnxopt's custom ops: register its library

        sess = onnxopt.make_session(str(args.model))
        print(f"top-1 {top1(sess, n=args.n):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
