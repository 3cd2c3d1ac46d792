"""Reports: the JSON document `optimize --report` writes, and the tables the CLI prints."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.4g}{unit}"


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*(str(c) for c in r)) for r in rows]
    return "\n".join(out)


def summary_table(report: dict) -> str:
    """Before/after table: size, params, FLOPs, latency, error or metric."""
    b, a = report["before"], report["after"]
    rows = [
        [
            "file size",
            human(b["file_bytes"], "B"),
            human(a["file_bytes"], "B"),
            _ratio(b["file_bytes"], a["file_bytes"]),
        ],
        ["parameters", human(b["params"]), human(a["params"]), _ratio(b["params"], a["params"])],
        ["FLOPs", human(b["flops"]), human(a["flops"]), _ratio(b["flops"], a["flops"])],
    ]
    for lat_b, lat_a in zip(b.get("latency", []), a.get("latency", []), strict=False):
        rows.append(
            [
                f"latency {lat_b['threads']} thread(s)",
                f"{lat_b['median_ms']:.3f} ms",
                f"{lat_a['median_ms']:.3f} ms",
                _ratio(lat_b["median_ms"], lat_a["median_ms"]),
            ]
        )
    v = report.get("verification", {})
    if v.get("kind") == "metric":
        rows.append([v["metric"], f"{v['original']:.4g}", f"{v['optimized']:.4g}", f"drop {v['drop']:.3g}"])
    for o in v.get("outputs", []):
        rows.append([f"output {o['name']}", "-", f"relL2 {o['rel_l2']:.2e}", f"cos {o['cosine']:.6f}"])
    return table(rows, ["", "original", "optimized", "ratio / error"])


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x" if after and before else "-"  # 0: unknown (shape inference gave up)


def records_table(records: list[dict]) -> str:
    """One line per node a method looked at (records as dicts, as in the report)."""
    rows = []
    for r in records:
        if r["status"] == "applied":
            d = r["detail"]
            shown = ("rank", "fit", "tile", "activation", "mode", "sparsity", "emitted")
            what = ", ".join(f"{k}={v}" for k, v in d.items() if k in shown)
            cost = (
                f"{_ratio(r['bytes_before'], r['bytes_after'])} bytes, "
                f"{_ratio(r['flops_before'], r['flops_after'])} FLOPs"
            )
            if "ms_before" in d:  # a speed-only rewrite: its measured layer times say why it was kept
                cost += (
                    f", {d['ms_before']:.3f} -> {d['ms_after']:.3f} ms ({d['speedup']:.2f}x at "
                    f"{d['threads']} thread(s))"
                )
            if "ms_sparse_est" in d:  # prune: the timed layer says why it runs sparse or dense
                cost += f", dense {d['ms_dense']:.3f} / sparse {d['ms_sparse_est']:.3f} ms"
            err = f"est.err {r['est_error']:.2e}"
            if "sensitivity" in d:  # a measured error, or why it was not measured
                v = d["sensitivity"]
                err = f"sensitivity {v:.2e}" if isinstance(v, float) else f"sensitivity {v}"
            rows.append([r["node"], r["method"], "applied", f"{cost}, {err} {what}"])
        else:
            rows.append([r["node"], r["method"], r["status"], r["reason"]])
    return table(rows, ["node", "method", "status", "detail"]) if rows else "(no node matched)"


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write the report atomically."""
    dest = Path(path).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".onnxopt-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(tmp, dest)
