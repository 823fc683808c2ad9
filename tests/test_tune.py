"""Tune tables: measured "auto" choice of the GPU divergence backend (ssld_kernels.tune).

Everything but the last test runs on the CPU: a synthetic table file, a fake device name and
"cuda"/"triton" made to look available for CUDA tensors (no kernel is launched).
"""

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

import ssld_kernels as sk
from ssld_kernels import _backends, _tune_table, tune
from ssld_kernels._backends import resolve_backend
from ssld_kernels._tune_table import TuneTableWarning, lookup_tune

FAKE_GPU = "Fake GPU 80GB HBM3"
CUDA0 = torch.device("cuda", 0)
BF16, FP32 = torch.bfloat16, torch.float32


def _entry(mode, dtype, c_lo, c_hi, ms, c=None):
    return {
        "op": "divergence",
        "mode": mode,
        "dtype": dtype,
        "c_lo": c_lo,
        "c_hi": c_hi,
        "c": c if c is not None else c_lo,
        "backend": min(ms, key=ms.get),
        "ms": ms,
    }


# C buckets [1, 2024) [2024, 9459) [9459, inf) for bf16 fwdbwd; other modes/dtypes differ.
ENTRIES = [
    _entry("fwdbwd", "bfloat16", 1, 2024, {"cuda": 0.10, "triton": 0.20}, c=1000),
    _entry("fwdbwd", "bfloat16", 2024, 9459, {"cuda": 0.30, "triton": 0.25}, c=4096),
    _entry("fwdbwd", "bfloat16", 9459, None, {"cuda": 1.0, "triton": 0.9}, c=21841),
    _entry("fused", "bfloat16", 1, None, {"cuda": 0.5, "triton": 0.4}),
    _entry("fwdbwd", "float32", 1, None, {"cuda": 0.5, "triton": 0.7}),
    _entry("fused", "float32", 1, None, {"cuda": 0.5, "triton": 0.2}),
]


def _table(entries=ENTRIES, device=FAKE_GPU, **override):
    table = {
        "format": _tune_table.TUNE_FORMAT,
        "device": device,
        **_tune_table.tune_versions(),
        "entries": entries,
    }
    table.update(override)
    return table


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A tune file path in the env, a fake device name, cuda + triton available on "cuda"."""
    real_status = _backends.backend_status

    def status(device_type=None):
        out = dict(real_status(device_type))
        if device_type == "cuda":
            out["cuda"] = (True, "")
            out["triton"] = (True, "")
        return out

    path = tmp_path / "tune.json"
    monkeypatch.setenv(_tune_table.TUNE_ENV_VAR, str(path))
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    monkeypatch.setattr(_backends, "backend_status", status)
    monkeypatch.setattr(_tune_table, "_device_name_at", lambda index: FAKE_GPU)
    _tune_table.clear_tune_cache()
    yield path
    _tune_table.clear_tune_cache()


def _auto(dtypes=(BF16, BF16), n_cols=1000, mode="fwdbwd", backend=None):
    return resolve_backend(backend, CUDA0, dtypes, n_cols=n_cols, mode=mode)


# ---------------------------------------------------------------------------------------------
# pure parts: buckets, lookup, entries
# ---------------------------------------------------------------------------------------------


def test_bucket_bounds():
    b = tune.bucket_bounds([32000, 1000, 4096, 1000])
    assert b == [(1000, 1, 2024), (4096, 2024, 11449), (32000, 11449, None)]
    assert math.sqrt(1000 * 4096) < 2024 and math.sqrt(1000 * 4096) > 2023
    # contiguous cover of [1, inf), each measured point inside its own bucket
    cs = [1000, 4096, 21841, 32000, 128256, 262144]
    b = tune.bucket_bounds(cs)
    assert b[0][1] == 1 and b[-1][2] is None
    for (_, _, hi), (_, lo, _) in zip(b, b[1:]):
        assert hi == lo
    for c, lo, hi in b:
        assert lo <= c and (hi is None or c < hi)
    assert tune.bucket_bounds([4, 16]) == [(4, 1, 8), (16, 8, None)]  # exact square root
    assert tune.bucket_bounds([1, 2]) == [(1, 1, 2), (2, 2, None)]
    assert tune.bucket_bounds([7]) == [(7, 1, None)]
    with pytest.raises(ValueError):
        tune.bucket_bounds([0, 5])


def test_lookup_bucket_boundaries():
    t = _table()
    assert lookup_tune(t, "divergence", "fwdbwd", "bfloat16", 1) == ("cuda", "triton")
    assert lookup_tune(t, "divergence", "fwdbwd", "bfloat16", 2023) == ("cuda", "triton")
    assert lookup_tune(t, "divergence", "fwdbwd", "bfloat16", 2024) == ("triton", "cuda")
    assert lookup_tune(t, "divergence", "fwdbwd", "bfloat16", 9458) == ("triton", "cuda")
    assert lookup_tune(t, "divergence", "fwdbwd", "bfloat16", 9459) == ("triton", "cuda")
    assert lookup_tune(t, "divergence", "fwdbwd", "bfloat16", 10**7) == ("triton", "cuda")
    assert lookup_tune(t, "divergence", "fused", "float32", 1000) == ("triton", "cuda")
    assert lookup_tune(t, "divergence", "fwdbwd", "float32", 1000) == ("cuda", "triton")
    # not in the table: no opinion
    assert lookup_tune(t, "divergence", "fwdbwd", "float16", 1000) == ()
    assert lookup_tune(t, "match", "fwdbwd", "float32", 1000) == ()
    assert lookup_tune(None, "divergence", "fwdbwd", "float32", 1000) == ()
    gap = _table([_entry("fwdbwd", "float32", 10, 20, {"cuda": 1.0})])
    assert lookup_tune(gap, "divergence", "fwdbwd", "float32", 9) == ()
    assert lookup_tune(gap, "divergence", "fwdbwd", "float32", 20) == ()
    # ties go to the entry's recorded winner
    tie = {"op": "divergence", "mode": "fused", "dtype": "float32", "c_lo": 1, "c_hi": None}
    tie.update(backend="triton", ms={"cuda": 1.0, "triton": 1.0})
    assert lookup_tune(_table([tie]), "divergence", "fused", "float32", 5)[0] == "triton"


def test_build_entries_geometric_mean_and_errors():
    def case(mode, n, c, backend, ms=None, error=None):
        r = {"mode": mode, "dtype": "bfloat16", "rows": n, "classes": c, "backend": backend}
        if error:
            r["error"] = error
        else:
            r.update(median_ms=ms, p20_ms=ms * 0.9, p80_ms=ms * 1.1)
        return r

    results = [
        case("fwdbwd", 256, 1000, "cuda", 0.1),
        case("fwdbwd", 4096, 1000, "cuda", 1.6),  # gmean 0.4
        case("fwdbwd", 256, 1000, "triton", 0.2),
        case("fwdbwd", 4096, 1000, "triton", 1.0),  # gmean sqrt(0.2) = 0.447
        case("fused", 256, 1000, "cuda", 0.3),
        case("fused", 4096, 1000, "cuda", error="OutOfMemoryError()"),
        case("fused", 256, 1000, "triton", 0.4),
        case("fused", 4096, 1000, "triton", 0.5),
        case("fused", 256, 50000, "cuda", error="boom"),
        case("fused", 4096, 50000, "cuda", error="boom"),
    ]
    entries = tune.build_entries(results, [1000, 50000], [256, 4096])
    by = {(e["mode"], e["c"]): e for e in entries}
    assert set(by) == {("fwdbwd", 1000), ("fused", 1000)}  # nothing measured at 50000
    e = by[("fwdbwd", 1000)]
    assert e["c_lo"] == 1 and e["c_hi"] == 7072  # ceil(sqrt(5e7)) = 7072
    assert e["ms"]["cuda"] == pytest.approx(0.4)
    assert e["ms"]["triton"] == pytest.approx(math.sqrt(0.2))
    assert e["backend"] == "cuda"
    assert e["ms_by_rows"]["4096"]["triton"]["median_ms"] == 1.0
    f = by[("fused", 1000)]
    assert f["ms"] == {"triton": pytest.approx(math.sqrt(0.2))}  # cuda failed at 4096 rows
    assert f["backend"] == "triton"
    assert "error" in f["ms_by_rows"]["4096"]["cuda"]
    # the built table is one the loader accepts
    table = tune.make_table(FAKE_GPU, entries, {"kind": "jsd"})
    assert _tune_table.parse_tune_table(table, FAKE_GPU, _tune_table.tune_versions()) == (table, "")


def test_build_entries_triton_configs():
    """Measured Triton launch configs: the fastest stands for triton in the ranking and is
    stored as the bucket's triton_config (none when the defaults win)."""
    big = {"block": 8192, "num_warps": 16}
    loop = {"block": 4096, "num_warps": 8, "programs_per_sm": 2}

    def case(c, backend, ms, config=None):
        r = {"mode": "fused", "dtype": "float32", "rows": 256, "classes": c, "backend": backend,
             "median_ms": ms, "p20_ms": ms, "p80_ms": ms}  # fmt: skip
        if config:
            r["config"] = config
        return r

    results = [
        case(1000, "cuda", 0.10), case(1000, "triton", 0.20),
        case(1000, "triton", 0.30, big), case(1000, "triton", 0.25, loop),
        case(32000, "cuda", 1.00), case(32000, "triton", 1.20),
        case(32000, "triton", 0.90, big), case(32000, "triton", 0.80, loop),
    ]  # fmt: skip
    entries = tune.build_entries(results, [1000, 32000], [256])
    by = {e["c"]: e for e in entries}
    small, large = by[1000], by[32000]
    assert small["backend"] == "cuda" and "triton_config" not in small  # defaults were best
    assert small["ms"] == pytest.approx({"cuda": 0.10, "triton": 0.20})
    assert large["backend"] == "triton"
    assert large["ms"] == pytest.approx({"cuda": 1.0, "triton": 0.8})
    assert large["triton_config"] == loop
    assert list(large["triton_configs_ms"].values()) == pytest.approx([0.8, 0.9])
    table = tune.make_table(FAKE_GPU, entries, {"kind": "jsd"})
    assert _tune_table.parse_tune_table(table, FAKE_GPU, _tune_table.tune_versions()) == (table, "")
    text = tune.summary(table)
    assert "triton config {'block': 4096, 'num_warps': 8, 'programs_per_sm': 2}" in text
    look = _tune_table.lookup_launch_config
    assert look(table, "triton", "fused", "float32", 40000) == loop
    assert look(table, "triton", "fused", "float32", 999) is None
    assert look(table, "triton", "fwdbwd", "float32", 40000) is None
    assert look(table, "cuda", "fused", "float32", 40000) is None


@pytest.mark.parametrize(
    "key,config",
    [
        ("triton", {"block": 3000}),
        ("triton", {"warps": 8}),
        ("triton", {"num_warps": 0}),
        ("triton", [8192]),
        ("triton", {"block": "8192"}),
        ("triton", {"num_warps": 64}),
        ("cuda", {"row_cache": 2}),
        ("cuda", {"threads": 100}),
        ("cuda", {"threads": 32}),
        ("cuda", {"threads": 2048}),
        ("cuda", {"block": 1024}),
    ],
)
def test_bad_launch_config_rejects_table(key, config):
    e = dict(ENTRIES[0], **{f"{key}_config": config})
    table, why = _tune_table.parse_tune_table(_table([e]), FAKE_GPU, _tune_table.tune_versions())
    assert table is None and f"{key}_config" in why


def test_tuned_config_resolves_per_sm_counts(fake_gpu, monkeypatch):
    e = dict(
        ENTRIES[5],
        triton_config={"block": 2048, "programs_per_sm": 4},
        cuda_config={"threads": 1024, "blocks_per_sm": 1, "row_cache": 1},
    )
    tune.write_table(fake_gpu, _table([*ENTRIES[:5], e]))

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    assert _tune_table.tuned_config("triton", 0, "fused", FP32, 1000) == {
        "block": 2048,
        "programs": 528,
    }
    assert _tune_table.tuned_config("cuda", 0, "fused", FP32, 1000) == {
        "threads": 1024,
        "blocks": 132,
        "row_cache": 1,
    }
    assert _tune_table.tuned_config("triton", 0, "fwdbwd", FP32, 1000) is None


def test_forced_launch_config_nests():
    s = torch.zeros(2, 8)
    assert _tune_table.launch_config("triton", s, s, "fused") is None  # CPU tensors: no table
    with _tune_table.forced_launch_config("triton", {"block": 16}):
        assert _tune_table.launch_config("triton", s, s, "fused") == {"block": 16}
        with _tune_table.forced_launch_config("triton", None):
            assert _tune_table.launch_config("triton", s, s, "fused") == {}
        assert _tune_table.launch_config("triton", s, s, "fused") == {"block": 16}
        assert _tune_table.launch_config("cuda", s, s, "fused") is None
    assert _tune_table.launch_config("triton", s, s, "fused") is None


def test_write_table_atomic(tmp_path):
    path = tmp_path / "sub" / "t.json"
    tune.write_table(path, _table())
    tune.write_table(path, _table(ENTRIES[:1]))  # overwrites in place
    assert json.loads(path.read_text())["entries"] == ENTRIES[:1]
    assert [p.name for p in path.parent.iterdir()] == ["t.json"]  # no temporary left


def test_default_path(monkeypatch, tmp_path):
    monkeypatch.delenv(_tune_table.TUNE_ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    p = _tune_table.tune_path("NVIDIA H100 80GB HBM3 (MIG 1g.10gb)")
    assert p == tmp_path / ".cache" / "ssld_kernels" / "tune-NVIDIA_H100_80GB_HBM3_MIG_1g.10gb.json"
    monkeypatch.setenv(_tune_table.TUNE_ENV_VAR, "off")
    assert _tune_table.tune_path("x") is None
    monkeypatch.setenv(_tune_table.TUNE_ENV_VAR, str(tmp_path / "mine.json"))
    assert _tune_table.tune_path("x") == tmp_path / "mine.json"


# ---------------------------------------------------------------------------------------------
# resolution with a table file (fake GPU)
# ---------------------------------------------------------------------------------------------


def test_auto_without_table_keeps_static_order(fake_gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing table is silent
        assert _auto(n_cols=4096) == "cuda"
        assert _auto(n_cols=None) == "cuda"


def test_auto_uses_table(fake_gpu):
    tune.write_table(fake_gpu, _table())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _auto(n_cols=1000) == "cuda"
        assert _auto(n_cols=2023) == "cuda"
        assert _auto(n_cols=2024) == "triton"
        assert _auto(n_cols=262144) == "triton"
        assert _auto(n_cols=1000, mode="fused") == "triton"
        assert _auto((FP32, FP32), n_cols=1000) == "cuda"
        assert _auto((FP32, FP32), n_cols=1000, mode="fused") == "triton"
        # mixed dtypes look up the wider one
        assert _auto((BF16, FP32), n_cols=1000, mode="fused") == "triton"
        assert _auto((FP32, BF16), n_cols=1000, mode="fused") == "triton"
        # no entry (float16), no class count, other ops, CPU tensors: static order
        assert _auto((torch.float16,) * 2, n_cols=4096) == "cuda"
        assert _auto(n_cols=None, mode="fused") == "cuda"
        assert resolve_backend(None, CUDA0, (FP32,), op="match") == "triton"  # its static order
        # CPU tensors never use the (GPU) table: the CPU order, "cpu" when it is built
        cpu = resolve_backend(None, torch.device("cpu"), (BF16, BF16), n_cols=4096)
        assert cpu == _cpu_static()
        # float64 is never picked from the table (unsupported on GPU backends)
        assert _auto((torch.float64,) * 2, n_cols=4096) == "torch"


def test_table_winner_unavailable_falls_to_next(fake_gpu, monkeypatch):
    tune.write_table(fake_gpu, _table())
    status = _backends.backend_status

    def no_triton(device_type=None):
        out = status(device_type)
        out["triton"] = (False, "not here")
        return out

    monkeypatch.setattr(_backends, "backend_status", no_triton)
    _tune_table.clear_tune_cache()
    assert _auto(n_cols=4096) == "cuda"
    # a table that knows only triton still falls back to the static order after it
    tune.write_table(fake_gpu, _table([_entry("fwdbwd", "bfloat16", 1, None, {"triton": 1.0})]))
    _tune_table.clear_tune_cache()
    assert _auto(n_cols=4096) == "cuda"


def test_explicit_backend_and_env_win(fake_gpu, monkeypatch):
    tune.write_table(fake_gpu, _table())
    assert _auto(n_cols=4096) == "triton"
    assert _auto(n_cols=4096, backend="cuda") == "cuda"
    assert _auto(n_cols=1000, backend="triton") == "triton"
    assert _auto(n_cols=4096, backend="torch") == "torch"
    monkeypatch.setenv(_backends.ENV_VAR, "cuda")
    assert _auto(n_cols=4096) == "cuda"
    monkeypatch.setenv(_backends.ENV_VAR, "auto")
    assert _auto(n_cols=4096) == "triton"


@pytest.mark.parametrize(
    "override,why",
    [
        (dict(torch="0.0.1"), "torch"),
        (dict(triton="0.0.1"), "triton"),
        (dict(ssld_kernels="0.0.0"), "ssld_kernels"),
        (dict(format=99), "format"),
        (dict(device="Other GPU"), "Other GPU"),
        (dict(entries="nope"), "entries"),
        (dict(entries=[{"op": "divergence"}]), "entry"),
        (dict(entries=[_entry("fused", "float32", 10, 5, {"cuda": 1.0})]), "bucket"),
        (dict(entries=[_entry("fused", "float32", 1, None, {"gpu2": 1.0})]), "time"),
    ],
)
def test_unusable_table_ignored_with_warning(fake_gpu, override, why):
    tune.write_table(fake_gpu, _table(**override))
    with pytest.warns(TuneTableWarning, match=why):
        assert _auto(n_cols=4096) == "cuda"  # static order, not the table's triton
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached: warns once
        assert _auto(n_cols=8000) == "cuda"


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "\x00\x01"])
def test_corrupt_table_ignored_with_warning(fake_gpu, text):
    fake_gpu.write_text(text)
    with pytest.warns(TuneTableWarning, match="ignoring tune table"):
        assert _auto(n_cols=4096) == "cuda"


def test_table_loaded_once(fake_gpu, monkeypatch):
    tune.write_table(fake_gpu, _table())
    assert _auto(n_cols=4096) == "triton"
    reads = []
    real = _tune_table._read_tune_table
    monkeypatch.setattr(_tune_table, "_read_tune_table", lambda *a: reads.append(a) or real(*a))
    for c in (3000, 5000, 7000):
        assert _auto(n_cols=c) == "triton"
    assert reads == []
    tune.write_table(fake_gpu, _table([_entry("fwdbwd", "bfloat16", 1, None, {"cuda": 1.0})]))
    assert _auto(n_cols=4000) == "triton"  # cached until cleared
    _tune_table.clear_tune_cache()
    assert _auto(n_cols=4000) == "cuda"
    assert len(reads) == 1


def test_tune_file_off(fake_gpu, monkeypatch):
    tune.write_table(fake_gpu, _table())
    monkeypatch.setenv(_tune_table.TUNE_ENV_VAR, "off")
    _tune_table.clear_tune_cache()
    assert _auto(n_cols=4096) == "cuda"


def test_divergence_passes_class_count_and_mode(monkeypatch):
    """softmax_divergence resolves with mode "fwdbwd", the fused function with "fused"."""
    import ssld_kernels.divergence as div

    calls = []
    real = div.resolve_backend

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(div, "resolve_backend", spy)
    s, t = torch.randn(2, 3, 37), torch.randn(2, 3, 37)
    sk.softmax_divergence(s, t)
    sk.softmax_divergence_and_grad(s, t)
    assert calls == [dict(n_cols=37, mode="fwdbwd"), dict(n_cols=37, mode="fused")]


def _cpu_static():
    """The static CPU order's pick: the C++ kernel when this machine built it, else torch."""
    return "cpu" if _backends.backend_status("cpu")["cpu"][0] else "torch"


@pytest.mark.parametrize("cpu_built", [True, False])
def test_cpu_auto_order(monkeypatch, cpu_built):
    """auto on CPU tensors: the C++ kernel for every dtype it supports (float64 included),
    torch without it or for an op family without a cpu backend; never a GPU backend even
    when they are available."""
    real = _backends.backend_status

    def status(device_type=None):
        out = dict(real(device_type))
        out["cpu"] = (cpu_built, "" if cpu_built else "not built here")
        out["cuda"] = out["triton"] = (True, "")  # available, and never picked for CPU
        return out

    monkeypatch.setattr(_backends, "backend_status", status)
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    _tune_table.clear_tune_cache()
    try:
        want = "cpu" if cpu_built else "torch"
        cpu = torch.device("cpu")
        for dtypes in [(FP32,), (BF16, FP32), (torch.float16,), (torch.float64,) * 2]:
            for mode in ("fwdbwd", "fused"):
                got = resolve_backend(None, cpu, dtypes, n_cols=1000, mode=mode)
                assert got == want, (dtypes, mode)
        monkeypatch.setitem(_backends.OP_BACKENDS, "divergence", ("torch", "triton"))
        _tune_table.clear_tune_cache()
        assert resolve_backend(None, cpu, (FP32,)) == "torch"  # no cpu backend for the op
    finally:
        _tune_table.clear_tune_cache()


def test_resolve_backend_old_signature():
    cpu = torch.device("cpu")
    assert resolve_backend(None, cpu, (FP32,)) == _cpu_static()
    assert resolve_backend("torch", cpu, (FP32,), "match") == "torch"
    with pytest.raises(ValueError, match="mode"):
        resolve_backend(None, cpu, (FP32,), n_cols=5, mode="fwd")


def _compiled_resolution(device, dtype):
    """f(s) = s * {triton: 2, cuda: 3, cpu: 5, torch: 7}[auto's pick for ``device``], compiled
    with dynamic shapes (C symbolic), and the compile counter."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    factors = {"triton": 2.0, "cuda": 3.0, "cpu": 5.0, "torch": 7.0}

    def f(s):
        name = resolve_backend(None, device, (s.dtype,), n_cols=s.shape[-1], mode="fused")
        return s * factors[name]

    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(f, dynamic=True, fullgraph=True, backend=counter)
    return f, fn, counter, factors


def test_torch_compile_symbolic_class_count_cpu():
    """A symbolic C (dynamic=True) for CPU tensors: the CPU order, one graph for every C."""
    f, fn, counter, factors = _compiled_resolution(torch.device("cpu"), FP32)
    for c in (17, 23):
        want = torch.full((4, c), factors[_cpu_static()])
        torch.testing.assert_close(fn(torch.ones(4, c)), want)
    assert counter.frame_count == 1


def test_torch_compile_symbolic_class_count(fake_gpu):
    """A symbolic C (dynamic=True) reaches resolve_backend as "unknown": no failed constant
    conversion in assume_constant_result, no specialisation on C, so the static order
    ("cuda") where a concrete C gets the table's pick ("triton" for bfloat16 "fused").
    Issue 15: dynamo traces ``type(C)`` of a SymInt as int, so the SymInt used to reach
    _resolve_static on CUDA tensors and fail there."""
    tune.write_table(fake_gpu, _table())
    f, fn, counter, factors = _compiled_resolution(CUDA0, BF16)  # no kernel is launched
    for c in (17, 23):
        x = torch.ones(4, c, dtype=BF16)
        torch.testing.assert_close(f(x), x * factors["triton"])  # eager: the table
        torch.testing.assert_close(fn(x), x * factors["cuda"])  # compiled: static order
    assert counter.frame_count == 1  # one graph for both class counts
    # static shapes: C is a constant while tracing, and the compiled graph uses the table
    torch._dynamo.reset()
    static = torch.compile(f, dynamic=False, fullgraph=True, backend="aot_eager")
    x = torch.ones(4, 17, dtype=BF16)
    torch.testing.assert_close(static(x), x * factors["triton"])


def test_describe_reports_table(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert "none at" in _tune_table.describe_tune()
    tune.write_table(fake_gpu, _table())
    _tune_table.clear_tune_cache()
    line = _tune_table.describe_tune()
    assert f"loaded from {fake_gpu}" in line and f"{len(ENTRIES)} entries" in line
    tune.write_table(fake_gpu, _table(torch="0.0.1"))
    _tune_table.clear_tune_cache()
    assert "ignored (measured with torch '0.0.1'" in _tune_table.describe_tune()
    monkeypatch.setenv(_tune_table.TUNE_ENV_VAR, "off")
    assert "disabled" in _tune_table.describe_tune()


def test_describe_mentions_tune_table():
    assert "tune table:" in _backends.describe()


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def test_cli_help():
    out = subprocess.run(
        [sys.executable, "-m", "ssld_kernels.tune", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--classes" in out.stdout and "geometric" in out.stdout


def test_cli_show_and_bad_args(tmp_path, capsys):
    path = tmp_path / "t.json"
    tune.write_table(path, _table())
    assert tune.main(["--show", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert "C in [2024, 9459): triton" in out and "C in [9459, inf)" in out
    assert tune.main(["--show", "--out", str(tmp_path / "missing.json")]) == 1
    with pytest.raises(SystemExit):
        tune.main(["--dtypes", "int8"])
    with pytest.raises(SystemExit):
        tune.main(["--classes", "0,5"])
    assert tune.parse_dtypes("bf16,fp32,float32") == [BF16, FP32]
    assert tune.parse_ints("4096, 256,256") == [256, 4096]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_without_gpu_says_so(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        tune.main(["--out", str(tmp_path / "t.json")])


# ---------------------------------------------------------------------------------------------
# the timing path (GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_tune_on_gpu_writes_a_table_auto_uses(tmp_path, monkeypatch):
    status = _backends.backend_status("cuda")
    if not (status["cuda"][0] or status["triton"][0]):
        pytest.skip("no GPU divergence backend built")
    path = tmp_path / "tune.json"
    monkeypatch.setenv(_tune_table.TUNE_ENV_VAR, str(path))
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    argv = ["--dtypes", "bf16,fp32", "--rows", "64,256", "--classes", "1000,4096"]
    assert tune.main(argv + ["--warmup", "5", "--rep", "20"]) == 0
    try:
        table = json.loads(path.read_text())
        assert table["device"] == torch.cuda.get_device_name()
        assert table["torch"] == torch.__version__
        tuned = [b for b in ("cuda", "triton") if status[b][0]]
        assert table["backends"] == tuned
        assert len(table["entries"]) == 2 * 2 * 2  # modes x dtypes x class counts
        for e in table["entries"]:
            assert set(e["ms"]) == set(tuned), e
            assert all(v > 0 for v in e["ms"].values())
            assert e["backend"] == min(e["ms"], key=e["ms"].get)
        dev = torch.device("cuda", torch.cuda.current_device())
        for e in table["entries"]:
            dt = getattr(torch, e["dtype"])
            got = resolve_backend(None, dev, (dt, dt), n_cols=e["c"], mode=e["mode"])
            assert got == e["backend"], e
        # and the public call runs with the chosen backend
        s = torch.randn(64, 1000, device="cuda", requires_grad=True)
        t = torch.randn(64, 1000, device="cuda")
        sk.softmax_divergence(s, t).backward()
        ref = sk.softmax_divergence(s.detach(), t, backend="torch")
        torch.testing.assert_close(sk.softmax_divergence(s.detach(), t), ref)
        assert f"loaded from {path}" in _backends.describe()
    finally:
        _tune_table.clear_tune_cache()
