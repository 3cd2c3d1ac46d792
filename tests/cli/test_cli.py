"""The onnxopt command: every subcommand, exit codes, reports, and bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from models.synthetic import conv_net, mlp
from onnxopt.cli import main

METRICS = Path(__file__).with_name("metric_strict.py")


@pytest.fixture
def mlp_file(tmp_path):
    p = tmp_path / "mlp.onnx"
    onnx.save(mlp([64, 128, 96, 10], decay=0.8), str(p))
    return p


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_optimize_writes_model_and_report_and_keeps_input(mlp_file, tmp_path, capsys):
    before = _sha(mlp_file)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code = main(["optimize", str(mlp_file), "-o", str(out), "--report", str(rep), "--threads", "2"])
    assert code == 0
    assert _sha(mlp_file) == before
    report = json.loads(rep.read_text())
    assert report["status"] == "optimized"
    assert report["after"]["params"] < report["before"]["params"]
    assert {lat["threads"] for lat in report["before"]["latency"]} == {1, 2}
    assert any(r["status"] == "applied" and r["method"] == "lowrank" for r in report["records"])
    assert report["verification"]["worst_rel_l2"] <= 1e-2
    printed = capsys.readouterr().out
    assert "parameters" in printed and "FLOPs" in printed and "latency" in printed
    assert main(["verify", str(mlp_file), str(out)]) == 0


def test_optimize_with_calib_and_winograd(tmp_path):
    model = conv_net([3, 8, 8], size=11)
    src, out = tmp_path / "c.onnx", tmp_path / "c.opt.onnx"
    onnx.save(model, str(src))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((4, 3, 11, 11)).astype(np.float32))
    code = main(
        [
            "-q",
            "optimize",
            str(src),
            "-o",
            str(out),
            "--methods",
            "winograd",
            "--set",
            "winograd.measure=0",
            "--calib",
            str(calib),
            "--no-bench",
        ]
    )
    assert code == 0
    assert [n.op_type for n in onnx.load(str(out)).graph.node].count("WinogradConv") == 2
    assert main(["verify", str(src), str(out), "--inputs", str(calib), "--max-error", "1e-5"]) == 0


def test_unchanged_model_says_so(tmp_path, capsys):
    src, out = tmp_path / "c.onnx", tmp_path / "o.onnx"
    onnx.save(conv_net([3, 4], size=8), str(src))
    assert main(["optimize", str(src), "-o", str(out), "--methods", "lowrank", "--no-bench"]) == 0
    assert "nothing to rewrite" in capsys.readouterr().err
    assert onnx.load(str(out)).SerializeToString() == onnx.load(str(src)).SerializeToString()


def test_budget_not_met_exits_2(mlp_file, tmp_path):
    out = tmp_path / "o.onnx"
    code = main(
        [
            "optimize",
            str(mlp_file),
            "-o",
            str(out),
            "--eval",
            f"{METRICS}:exact_match",
            "--max-drop",
            "0",
            "--no-bench",
        ]
    )
    assert code == 2
    assert not out.exists()


def test_eval_metric_budget(mlp_file, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code = main(
        [
            "optimize",
            str(mlp_file),
            "-o",
            str(out),
            "--eval",
            f"{METRICS}:negative_error",
            "--max-drop",
            "0.05",
            "--no-bench",
            "--report",
            str(rep),
        ]
    )
    assert code == 0
    v = json.loads(rep.read_text())["verification"]
    assert v["kind"] == "metric" and v["drop"] <= 0.05


@pytest.mark.parametrize(
    "setup,expect",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("hello"), "not"),
        (lambda p: p.write_bytes(mlp([32, 8]).SerializeToString()[:300]), "ONNX"),
    ],
)
def test_bad_model_files_exit_1(tmp_path, capsys, setup, expect):
    p = tmp_path / "bad.onnx"
    setup(p)
    assert main(["optimize", str(p), "-o", str(tmp_path / "o.onnx")]) == 1
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err


def test_unknown_op_and_unknown_method_exit_1(tmp_path, capsys):
    m = mlp([8, 4])
    m.graph.node[0].op_type = "NoSuchOp"
    p = tmp_path / "u.onnx"
    onnx.save(m, str(p))
    assert main(["optimize", str(p), "-o", str(tmp_path / "o.onnx")]) == 1
    assert "NoSuchOp" in capsys.readouterr().err
    good = tmp_path / "g.onnx"
    onnx.save(mlp([8, 4]), str(good))
    assert main(["optimize", str(good), "--methods", "magic"]) == 1
    assert "unknown method" in capsys.readouterr().err


def test_refuses_to_overwrite_input(mlp_file, capsys):
    before = _sha(mlp_file)
    assert main(["optimize", str(mlp_file), "-o", str(mlp_file)]) == 1
    assert _sha(mlp_file) == before


def test_inspect_bench_list(mlp_file, capsys):
    assert main(["inspect", str(mlp_file), "--dim", "N=4"]) == 0
    out = capsys.readouterr().out
    assert "TOTAL" in out and "fc0" in out
    assert main(["inspect", str(mlp_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["params"] == sum(n["params"] for n in data["nodes"])
    assert main(["bench", str(mlp_file), "--vs", str(mlp_file), "--rounds", "6", "--threads", "1", "2"]) == 0
    assert "median ms" in capsys.readouterr().out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "lowrank" in out and "winograd" in out and "WinogradConv" in out and "formula" in out


def test_console_script_exit_code_and_clean_error(tmp_path):
    exe = [sys.executable, "-m", "onnxopt.cli"]
    r = subprocess.run([*exe, "inspect", str(tmp_path / "missing.onnx")], capture_output=True, text=True)
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_model_onnxruntime_rejects_is_a_clean_error(tmp_path, capsys):
    m = mlp([8, 4])
    b = m.graph.initializer[1]
    b.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(b).astype(np.float64), b.name))
    p = tmp_path / "mixed.onnx"
    onnx.save(m, str(p))  # passes onnx.checker, but Gemm's float and double inputs fail in onnxruntime
    assert main(["optimize", str(p), "-o", str(tmp_path / "o.onnx")]) == 1
    err = capsys.readouterr().err
    assert "onnxruntime cannot load the model" in err and "Traceback" not in err


def test_int8_from_the_command_line(tmp_path, capsys):
    model = conv_net([3, 8, 8], size=11)
    src, out, rep = tmp_path / "c.onnx", tmp_path / "c.int8.onnx", tmp_path / "r.json"
    onnx.save(model, str(src))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 3, 11, 11)).astype(np.float32))
    args = ["-q", "optimize", str(src), "--methods", "int8", "--calib", str(calib), "--no-bench"]
    assert main([*args, "-o", str(out), "--max-error", "5e-2", "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    recs = [r for r in report["records"] if r["method"] == "int8"]
    assert len(recs) == 2 and all(r["status"] == "applied" and r["detail"]["mode"] == "static" for r in recs)
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out)).graph.node}
    other = tmp_path / "none.onnx"
    assert main([*args, "-o", str(other), "--max-error", "1e-8"]) == 2
    assert "int8: undone" in capsys.readouterr().err and not other.exists()
    assert main([*args, "-o", str(other), "--set", "int8.mode=int4"]) == 1
