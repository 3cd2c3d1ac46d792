"""The operator library's registration entry point: refusal of an onnxruntime older than its C API.

A fake OrtApiBase stands in for an old onnxruntime: it hands out the real API tables of versions below
the library's ORT_API_VERSION (21) and NULL for newer ones, as an onnxruntime 1.20 would.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import onnxruntime
import pytest

import onnxopt

# size_t rather than void*: ctypes warns about leaks for callbacks returning c_void_p
GET_API = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_uint32)
GET_VERSION = ctypes.CFUNCTYPE(ctypes.c_size_t)
OLD_VERSION = ctypes.create_string_buffer(b"1.20.0")


class OrtApiBase(ctypes.Structure):
    _fields_ = [("GetApi", GET_API), ("GetVersionString", GET_VERSION)]


def _real_api_base():
    capi = Path(onnxruntime.__file__).parent / "capi"
    libs = sorted(capi.glob("libonnxruntime.so*"))
    if not libs:
        pytest.skip("onnxruntime's shared library is not where this wheel layout puts it")
    lib = ctypes.CDLL(str(libs[0]))
    lib.OrtGetApiBase.restype = ctypes.POINTER(OrtApiBase)
    return lib.OrtGetApiBase().contents


def test_old_onnxruntime_is_refused_with_a_clear_error():
    real = _real_api_base()
    fake = OrtApiBase(
        GetApi=GET_API(lambda v: real.GetApi(v) if v < 21 else 0),
        GetVersionString=GET_VERSION(lambda: ctypes.addressof(OLD_VERSION)),
    )
    ops = ctypes.CDLL(onnxopt.get_library_path())
    ops.RegisterCustomOps.restype = ctypes.c_void_p
    ops.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.POINTER(OrtApiBase)]
    status = ops.RegisterCustomOps(None, ctypes.byref(fake))
    assert status, "RegisterCustomOps accepted an onnxruntime without C API 21"
    # OrtApi starts with CreateStatus, GetErrorCode, GetErrorMessage: read the message through version 1.
    table = ctypes.cast(real.GetApi(1), ctypes.POINTER(ctypes.c_void_p))
    message = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(table[2])(status).decode()
    assert "C API version >= 21" in message and "1.20.0" in message, message


def test_current_onnxruntime_registers():
    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(onnxopt.get_library_path())
