"""lowrank on the Fashion-MNIST classifier: size against accuracy, per layer kind and factorization scheme.

For each setting the model is optimized with `lowrank` under an output budget (relative L2 of the logits on
256 calibration images), and the table gives the bytes of the rewritten layers before/after, the whole file's
ratio and the top-1 accuracy on the 10,000 test images. Rows that break the budget say so: without
retraining, some factorizations lose too much, and the budget is what rejects them.

Run from the repo root after scripts/setup.sh:  .venv/bin/python benchmarks/lowrank.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import fashion_mnist  # noqa: E402
from onnxopt import make_session  # noqa: E402
from onnxopt.budget import OutputBudget  # noqa: E402
from onnxopt.data import load_npz  # noqa: E402
from onnxopt.errors import BudgetError  # noqa: E402
from onnxopt.manager import optimize  # noqa: E402
from onnxopt.passes import make_passes  # noqa: E402

# (label, lowrank settings, budgets)
SETTINGS = [
    ("FC only", {}, [1e-2, 3e-2, 1e-1]),
    ("FC + Conv channel", {"conv": "1", "schemes": "channel"}, [3e-2, 1e-1, 3e-1]),
    ("FC + Conv spatial", {"conv": "1", "schemes": "spatial"}, [3e-2, 1e-1, 3e-1]),
    ("FC + Conv Tucker-2", {"conv": "1", "schemes": "tucker"}, [3e-2, 1e-1, 3e-1]),
    ("FC + Conv, all schemes", {"conv": "1"}, [1e-2, 3e-2, 1e-1]),
]


def rows() -> list[list[str]]:
    model = onnx.load(str(ROOT / "models" / "fashion_mnist.onnx"))
    feeds = load_npz(
        fashion_mnist.write_calibration(ROOT / "models" / "data" / "bench" / "fmnist.npz", n=256), model
    )
    base = fashion_mnist.top1(make_session(model.SerializeToString()))
    out = [["original", "-", "-", "-", "1.00x", f"{base:.2f}"]]
    for label, settings, budgets in SETTINGS:
        for max_error in budgets:
            try:
                result = optimize(
                    model,
                    make_passes(["lowrank"]),
                    feeds,
                    OutputBudget(model, feeds, max_error),
                    max_error,
                    settings={"lowrank": settings},
                )
            except BudgetError:
                out.append([label, f"{max_error:g}", "-", "nothing fits", "1.00x", f"{base:.2f}"])
                continue
            applied = [r for r in result.records if r.status == "applied"]
            before = sum(r.bytes_before for r in applied)
            after = sum(r.bytes_after for r in applied)
            what = ", ".join(
                f"{r.node} {r.detail.get('scheme', 'svd')} {r.detail.get('rank', r.detail.get('ranks'))}"
                for r in applied
            )
            top1 = fashion_mnist.top1(make_session(result.model.SerializeToString()))
            out.append(
                [
                    label,
                    f"{max_error:g}",
                    what or "none",
                    f"{before / max(after, 1):.2f}x" if applied else "-",
                    f"{model.ByteSize() / result.model.ByteSize():.2f}x",
                    f"{top1:.2f}",
                ]
            )
            print(" | ".join(out[-1]), file=sys.stderr, flush=True)
    return out


HEADER = ["layers", "budget (rel L2)", "rewritten (node scheme rank)", "their bytes", "file", "top-1 %"]


def main() -> int:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows()]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
