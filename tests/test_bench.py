"""Smoke tests of the divergence benchmark harness (tiny CPU cases) and its target verdicts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

bench_divergence = pytest.importorskip("bench_divergence")


def _row(provider, mode, shape, ms, gbps=None, dtype="float32"):
    return {"provider": provider, "mode": mode, "shape": list(shape), "dtype": dtype,
            "median_ms": ms, "gbps": gbps}  # fmt: skip


def test_target_verdicts():
    big, small = (4096, 32000), (256, 1000)
    rows = [
        _row("ssld-auto", "fwdbwd", big, 1.0, gbps=2600.0),
        _row("ssld-auto", "fused", big, 0.9, gbps=2000.0),
        _row("eager", "fwdbwd", big, 6.0),
        _row("liger", "fwdbwd", big, 1.9),  # only 1.9x slower than auto: misses >= 2x
        _row("compile", "fwdbwd", big, 1.5),
        _row("ssld-auto", "fwd", small, 0.10),
        _row("ssld-triton", "fwd", small, 0.09),  # beats auto by more than the 3% margin
        _row("ssld-cuda", "fwd", small, 0.099),  # within the margin: not reported
    ]
    out = bench_divergence.check_targets(rows, {"peak_copy_gbps": 3000.0})
    cases = {c["mode"]: c for c in out["cases"]}
    assert set(cases) == {"fwdbwd", "fused"}  # C >= 8192 only
    fb = cases["fwdbwd"]
    assert fb["pct_of_copy"] == pytest.approx(100 * 2600 / 3000)
    assert fb["x_eager"] == pytest.approx(6.0) and fb["x_liger"] == pytest.approx(1.9)
    assert fb["x_compile"] == pytest.approx(1.5)
    assert not fb["met"]  # 86.7% of copy, 6x eager, 1.5x compile, but 1.9x Liger < 2x
    fu = cases["fused"]
    assert fu["x_liger"] == pytest.approx(1.9 / 0.9)
    assert not fu["met"]  # 66.7% of copy
    assert [(b["by"], b["mode"]) for b in out["beaten"]] == [("ssld-triton", "fwd")]
    rows[3]["median_ms"] = 2.1
    rows[0]["gbps"] = 2700.0
    out = bench_divergence.check_targets(rows, {"peak_copy_gbps": 3000.0})
    assert next(c for c in out["cases"] if c["mode"] == "fwdbwd")["met"]
    # an unmeasured target (no Liger run) is never "met"
    out = bench_divergence.check_targets(rows[:3] + rows[4:], {"peak_copy_gbps": 3000.0})
    fb = next(c for c in out["cases"] if c["mode"] == "fwdbwd")
    assert fb["unmeasured"] == ["x_liger"] and not fb["met"]


def test_bench_divergence_cpu_smoke(tmp_path):
    out = tmp_path / "div.json"
    cmd = [sys.executable, str(BENCH / "bench_divergence.py"), "--device", "cpu",
           "--shapes", "16x300", "--dtypes", "float32", "--providers", "ssld-auto,ssld-cpu,eager",
           "--latency-shapes", "4x16", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    data = json.loads(out.read_text())
    assert data["env"]["git_sha"] and "targets" in data
    rows = data["results"]
    modes = {(r["provider"], r["mode"]) for r in rows if "error" not in r}
    for p in ("ssld-auto", "ssld-cpu"):
        assert {(p, m) for m in ("fwd", "fwdbwd", "fused", "fwdbwd-latency")} <= modes
    assert ("eager", "fused") not in modes
    for r in rows:
        if r["mode"] in ("fwd", "fwdbwd", "fused"):
            esize = 4
            assert r["min_bytes"] == 16 * 300 * esize * (2 if r["mode"] == "fwd" else 3)
            assert r["median_ms"] > 0
    table = subprocess.run(
        [sys.executable, str(BENCH / "summarize.py"), str(out)],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert "| ssld-cpu |" in table and "small-shape latency" in table


def _gpu_check_invocations():
    """(bench module name, argv) of every benchmark call in bench/gpu_check.sh."""
    import re
    import shlex

    text = (BENCH / "gpu_check.sh").read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        m = re.search(r"python3 bench/(bench_\w+)\.py(.*)$", line)
        if m and not line.lstrip().startswith("#"):
            calls.append((m.group(1), shlex.split(m.group(2))))
    return calls


def test_gpu_check_benchmark_arguments(monkeypatch):
    """The prepared GPU call's benchmark command lines parse, and name only known providers.

    The device time of a lent GPU is minutes; a misspelt flag or provider found there is a
    lost call, so the arguments are checked here against each benchmark's own parser.
    """
    import argparse

    calls = _gpu_check_invocations()
    names = sorted({name for name, _ in calls})
    assert names == ["bench_divergence", "bench_fused_linear", "bench_match", "bench_train"]

    class Parsed(Exception):
        pass

    def parse_args(self, args=None, namespace=None):
        raise Parsed(real_parse_args(self, args, namespace))

    real_parse_args = argparse.ArgumentParser.parse_args
    for name, argv in calls:
        module = pytest.importorskip(name)
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
        try:
            with pytest.raises(Parsed) as parsed:  # SystemExit(2) here: a flag or type is wrong
                module.main(argv) if name != "bench_train" else module.main()
        finally:
            monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real_parse_args)
        ns = parsed.value.args[0]
        if getattr(ns, "providers", None):
            known = getattr(module, "KNOWN_PROVIDERS", None) or module.PROVIDERS
            module_check = sys.modules["_common"].parse_providers
            assert module_check(ns.providers, known, name)  # SystemExit on an unknown name
    # and a wrong name is refused before anything runs
    with pytest.raises(SystemExit, match="unknown --providers"):
        bench_divergence.main(["--device", "cpu", "--providers", "ssld-auto,ligr"])
