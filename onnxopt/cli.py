"""The `onnxopt` command: optimize, verify, inspect, bench, list.

Exit codes: 0 ok; 1 error (a clear message, no traceback for user errors); 2 accuracy budget not met.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import onnx

from onnxopt import __version__
from onnxopt.analysis import node_stats, totals
from onnxopt.bench import latency
from onnxopt.budget import MetricBudget, OutputBudget, load_metric
from onnxopt.data import dims_from_feeds, load_npz, synthetic_inputs, take
from onnxopt.errors import BudgetError, OnnxoptError, UserError
from onnxopt.graph import check_model, load_model, normalize, save_model
from onnxopt.library import LARGE_MODEL_BYTES
from onnxopt.manager import optimize
from onnxopt.ops import all_specs
from onnxopt.report import human, records_table, summary_table, table, write_json
from onnxopt.verify import compare_models, complete_shapes, first_divergence

EXIT_OK, EXIT_ERROR, EXIT_BUDGET = 0, 1, 2


def _key_values(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{what} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _dims(args) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in _key_values(args.dim, "--dim").items()}
    except ValueError as e:
        raise UserError(f"--dim: values must be integers ({e})") from e


def _settings(items: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for k, v in _key_values(items, "--set").items():
        if "." not in k:
            raise UserError(f"--set {k}={v}: expected METHOD.KEY=VALUE, e.g. lowrank.rank=64")
        method, key = k.split(".", 1)
        out.setdefault(method, {})[key] = v
    return out


def _inputs(model: onnx.ModelProto, path: str | None, args) -> dict:
    if path:
        return load_npz(path, model)
    return synthetic_inputs(model, samples=args.samples, dims=_dims(args), seed=args.seed)


def _progress(args) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _say(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr)


def _model_summary(model: onnx.ModelProto, dims: dict[str, int], feeds: dict) -> dict:
    t = totals(node_stats(model, shapes=complete_shapes(model, feeds, dims)))
    return {**t, "file_bytes": model.ByteSize()}


def cmd_optimize(args) -> int:
    from onnxopt.passes import make_passes

    src = Path(args.model)
    out = Path(args.output) if args.output else src.with_name(src.stem + ".opt.onnx")
    if out.resolve() == src.resolve():
        raise UserError(f"-o {out} is the input file; onnxopt never overwrites its input")
    model = load_model(src)
    check_model(model, str(src))
    normalize(model)  # in memory only: Constant weights become initializers, every node gets a name
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    passes = make_passes(methods)
    feeds = _inputs(model, args.calib, args)
    dims = {**dims_from_feeds(model, feeds), **_dims(args)}
    if args.eval:
        budget = MetricBudget(model, load_metric(args.eval), args.max_drop, args.threads, name=args.eval)
    else:
        budget = OutputBudget(model, feeds, args.max_error, args.threads)
    _say(
        args,
        f"onnxopt {__version__}: {src} with methods {', '.join(p.name for p in passes)}; "
        f"budget: {budget.describe()}",
    )
    report: dict = {
        "input": str(src),
        "output": str(out),
        "methods": [p.name for p in passes],
        "budget": budget.describe(),
        "calibration": args.calib or f"synthetic ({args.samples} samples)",
    }
    try:
        result = optimize(
            model,
            passes,
            feeds,
            budget,
            max_error=args.max_error,
            settings=_settings(args.set),
            dims=dims,
            progress=_progress(args),
            log=lambda s: _say(args, s) if args.verbose else None,
            threads=args.threads or 1,
            calibrated=bool(args.calib),
        )
    except BudgetError as e:
        report.update(status="budget not met", reason=str(e))
        if args.report:
            write_json(report, args.report)
        print(f"onnxopt: budget not met: {e}", file=sys.stderr)
        return EXIT_BUDGET
    for m in result.messages:
        _say(args, m)
    report["before"] = _model_summary(model, dims, feeds)
    report["after"] = _model_summary(result.model, dims, feeds)
    report["verification"] = result.verification
    report["records"] = [r.as_dict() for r in result.records]
    report["status"] = "optimized" if result.changed else "unchanged"
    if result.changed and isinstance(budget, OutputBudget):
        if model.ByteSize() < LARGE_MODEL_BYTES:
            report["first_divergence"] = first_divergence(model, result.model, take(feeds, 8), args.max_error)
        else:
            report["first_divergence"] = (
                "skipped for a large model: run `onnxopt verify` for the per-layer report"
            )
    report["written"] = [str(p) for p in save_model(result.model, out)]
    del model, result, budget  # a large model's protos go before the timing sessions load it from disk
    if not args.no_bench:
        for threads in sorted({1, args.threads or 1}):
            lat = latency([str(src), str(out)], feeds, threads=threads)
            report["before"].setdefault("latency", []).append(lat[0])
            report["after"].setdefault("latency", []).append(lat[1])
    if args.report:
        write_json(report, args.report)
    if not args.quiet:
        print(records_table(report["records"]))
        print()
        print(summary_table(report))
        print(f"\nwrote {', '.join(report['written'])}")
    return EXIT_OK


def cmd_verify(args) -> int:
    original, optimized = load_model(args.original), load_model(args.optimized)
    feeds = _inputs(original, args.inputs, args)
    errors = compare_models(original, optimized, feeds)
    rows = [[e.name, f"{e.max_abs:.3e}", f"{e.rel_l2:.3e}", f"{e.cosine:.8f}"] for e in errors]
    print(table(rows, ["output", "max abs", "rel L2", "cosine"]))
    div = first_divergence(original, optimized, take(feeds, 8), args.layer_threshold)
    if div:
        print(
            f"first divergence (rel L2 > {args.layer_threshold:g}): node {div['node']} ({div['op_type']}), "
            f"tensor {div['tensor']}: rel L2 {div['rel_l2']:.3e}, max abs {div['max_abs']:.3e}"
        )
    else:
        print(f"no intermediate tensor diverges by more than {args.layer_threshold:g} relative L2")
    if args.json:
        print(json.dumps({"outputs": [e.as_dict() for e in errors], "first_divergence": div}, indent=2))
    worst = max(e.rel_l2 for e in errors)
    if worst > args.max_error:
        print(f"onnxopt: outputs differ by {worst:.3e} relative L2 > {args.max_error:g}", file=sys.stderr)
        return EXIT_BUDGET
    return EXIT_OK


def cmd_inspect(args) -> int:
    model = load_model(args.model)
    stats = node_stats(model, _dims(args))
    if args.json:
        print(json.dumps({"nodes": [s.as_dict() for s in stats], "totals": totals(stats)}, indent=2))
        return EXIT_OK
    rows = [
        [s.name, s.op_type, human(s.params), human(s.weight_bytes, "B"), human(s.flops)]
        for s in stats
        if args.all or s.params or s.flops
    ]
    t = totals(stats)
    rows.append(
        ["TOTAL", f"{t['nodes']} nodes", human(t["params"]), human(t["weight_bytes"], "B"), human(t["flops"])]
    )
    print(table(rows, ["node", "op", "params", "weight bytes", "FLOPs"]))
    return EXIT_OK


def cmd_bench(args) -> int:
    models = [load_model(args.model)] + ([load_model(args.vs)] if args.vs else [])
    feeds = _inputs(models[0], args.inputs, args)
    rows = []
    for threads in args.threads:
        lat = latency(models, feeds, threads=threads, rounds=args.rounds)
        for path, r in zip([args.model, args.vs], lat, strict=False):
            rows.append(
                [
                    path,
                    threads,
                    f"{r['median_ms']:.3f}",
                    f"{r['p10_ms']:.3f}",
                    f"{r['p90_ms']:.3f}",
                    f"{lat[0]['median_ms'] / r['median_ms']:.2f}x",
                ]
            )
    print(table(rows, ["model", "threads", "median ms", "p10 ms", "p90 ms", "speed vs first"]))
    return EXIT_OK


def cmd_list(args) -> int:
    from onnxopt.passes import METHODS

    rows = [
        [
            n,
            "yes" if c.default else "no",
            "lossy" if c.lossy else "exact",
            ",".join(c.custom_ops) or "-",
            c.summary,
        ]
        for n, c in METHODS.items()
    ]
    print(table(rows, ["method", "default", "kind", "custom ops", "what it does"]))
    print("\ncustom operators (register onnxopt.get_library_path() with onnxruntime):\n")
    for spec in all_specs().values():
        print(spec.describe())
        print()
    return EXIT_OK


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dim",
        action="append",
        metavar="NAME=N",
        help="value of a symbolic dimension for synthetic inputs and FLOP counts (default 1)",
    )
    p.add_argument("--samples", type=int, default=8, help="synthetic samples when no data file is given")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic inputs")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="onnxopt", description="Make trained ONNX models smaller and faster.")
    ap.add_argument("--version", action="version", version=f"onnxopt {__version__}")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    ap.add_argument("-v", "--verbose", action="store_true", help="say what the budget loop does")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("optimize", help="rewrite a model under an accuracy budget")
    p.add_argument("model")
    p.add_argument("-o", "--output", help="output model (default: IN.opt.onnx)")
    p.add_argument("--methods", help="comma-separated methods (default: every method that pays off)")
    p.add_argument("--calib", help=".npz calibration data keyed by graph input name, samples on axis 0")
    p.add_argument("--max-error", type=float, default=1e-2, help="max relative L2 error per output (1e-2)")
    p.add_argument(
        "--eval", metavar="MODULE:FUNCTION", help="task metric f(session) -> score, higher is better"
    )
    p.add_argument("--max-drop", type=float, default=0.5, help="max drop of the --eval score (0.5)")
    p.add_argument("--report", help="write a JSON report here")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for verification and latency")
    p.add_argument(
        "--set", action="append", metavar="METHOD.KEY=VALUE", help="method setting, e.g. lowrank.rank=64"
    )
    p.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    _data_args(p)
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("verify", help="compare an optimized model with its original in onnxruntime")
    p.add_argument("original")
    p.add_argument("optimized")
    p.add_argument("--inputs", help=".npz inputs keyed by graph input name")
    p.add_argument("--max-error", type=float, default=1e-2, help="exit 2 if an output differs by more (1e-2)")
    p.add_argument(
        "--layer-threshold", type=float, default=1e-4, help="rel L2 that counts as diverging (1e-4)"
    )
    p.add_argument("--json", action="store_true")
    _data_args(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="params, weight bytes and FLOPs per node and in total")
    p.add_argument("model")
    p.add_argument("--all", action="store_true", help="list nodes without params or FLOPs too")
    p.add_argument("--json", action="store_true")
    _data_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="latency in onnxruntime (library registered), A/B interleaved")
    p.add_argument("model")
    p.add_argument("--vs", help="a second model, timed interleaved with the first")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts (default 1)")
    p.add_argument("--inputs", help=".npz inputs")
    p.add_argument("--rounds", type=int, default=50)
    _data_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("list", help="methods and custom operators with their specs")
    p.set_defaults(func=cmd_list)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except BudgetError as e:
        print(f"onnxopt: budget not met: {e}", file=sys.stderr)
        return EXIT_BUDGET
    except OnnxoptError as e:
        print(f"onnxopt: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("onnxopt: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
