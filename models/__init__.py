"""Real models and their evaluators: Fashion-MNIST (trained here) and PP-OCRv4 (from rapidocr-onnxruntime).

Each module here obtains or builds a model offline and exposes an accuracy function usable by the CLI's
``--eval MODULE:FUNCTION`` (higher is better) plus a ``write_calibration`` helper for ``--calib``.
Generated data lives under ``models/data/`` (gitignored).
"""
