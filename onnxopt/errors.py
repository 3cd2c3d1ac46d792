"""Error types. A UserError is the user's to fix (bad file, bad option): the CLI prints it, no traceback."""


class OnnxoptError(Exception):
    """Base class of every error onnxopt raises on purpose."""


class UserError(OnnxoptError):
    """Bad input from the user: missing or malformed model, bad data file, bad option."""


class BudgetError(OnnxoptError):
    """No rewrite fits the accuracy budget (CLI exit code 2)."""
