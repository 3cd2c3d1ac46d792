"""onnxopt: make trained ONNX models smaller and faster without retraining.

Public entry points: `get_library_path()` for `SessionOptions.register_custom_ops_library`, and
`make_session()` for an onnxruntime session with onnxopt's custom operators registered.
"""

from onnxopt.errors import OnnxoptError
from onnxopt.library import get_library_path, make_session

__version__ = "0.1.0"
DOMAIN = "onnxopt"

__all__ = ["DOMAIN", "OnnxoptError", "__version__", "get_library_path", "make_session"]
