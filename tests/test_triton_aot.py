"""bench/triton_aot.py: Triton launches recorded under the interpreter compile for sm_90.

The interpreter (how the Triton kernels run in CI) executes kernels that the compiler rejects;
these tests show one such kernel, check that the tool fails it, and compile the library's own
kernels for the H100/H200 target from the launches a few of its Triton tests make.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "bench" / "triton_aot.py"
sys.path.insert(0, str(TOOL.parent))
from triton_aot import constexprs_by_name  # noqa: E402  (imports no triton at module level)


def _ptxas_or_skip():
    triton = pytest.importorskip("triton")
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
    except Exception as e:  # no NVIDIA backend in this triton build
        pytest.skip(f"triton {triton.__version__} has no bundled ptxas ({e})")
    if not path or not os.path.exists(path):
        pytest.skip("triton's bundled ptxas is missing")


def _tool(*args, env=None, timeout=900):
    env = dict(os.environ if env is None else env)
    env.pop("TRITON_INTERPRET", None)  # the tool sets it where it records
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)  # fmt: skip


TOY = """
import triton
import triton.language as tl


@triton.jit
def column_sums(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, n, BLOCK):
        acc += tl.load(x_ptr + i + tl.arange(0, BLOCK))
    tl.store(out_ptr + tl.arange(0, BLOCK), acc)


@triton.jit
def column_sums_scalar_start(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = 0.0  # a scalar that becomes a block in the loop: the compiler refuses it
    for i in range(0, n, BLOCK):
        acc += tl.load(x_ptr + i + tl.arange(0, BLOCK))
    tl.store(out_ptr + tl.arange(0, BLOCK), acc)
"""

LAUNCH = """
import os, sys
sys.path[:0] = [{tmp!r}, {bench!r}]
import torch
from triton_aot import install_recorder
install_recorder({rec!r})
import toy_kernels as tk
x = torch.randn(64)
for name in ("column_sums", "column_sums_scalar_start"):
    out = torch.empty(16)
    getattr(tk, name)[(1,)](x, out, 64, BLOCK=16, num_warps=2)
    torch.testing.assert_close(out, x.view(4, 16).sum(0))  # the interpreter runs both
    getattr(tk, name)[(1,)](x, out, 64, BLOCK=16, num_warps=2)  # same launch: recorded once
print("ran")
"""


def test_compile_fails_a_kernel_the_interpreter_runs(tmp_path):
    _ptxas_or_skip()
    (tmp_path / "toy_kernels.py").write_text(TOY)
    rec = tmp_path / "launches.jsonl"
    code = LAUNCH.format(tmp=str(tmp_path), bench=str(TOOL.parent), rec=str(rec))
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0 and "ran" in run.stdout, run.stderr[-3000:]
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    assert sorted(r["kernel"] for r in lines) == [
        "toy_kernels:column_sums",
        "toy_kernels:column_sums_scalar_start",
    ]
    first = lines[0]
    assert dict(first["signature"])["x_ptr"] == "*fp32" and ["num_warps", 2] in first["options"]
    assert [[3], 16] in first["constexprs"]  # BLOCK, by argument index

    out = tmp_path / "aot.json"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    res = _tool("--launches", str(rec), "--jobs", "1", "--out", str(out), env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Loop-carried variable acc" in res.stdout
    assert "1/2 launches compile" in res.stdout
    results = {r["kernel"]: r for r in json.loads(out.read_text())["launches"]}
    good = results["toy_kernels:column_sums"]
    assert "error" not in good and good["regs"] > 0 and good["num_warps"] == 2
    assert "error" in results["toy_kernels:column_sums_scalar_start"]


# Fast Triton tests that reach every kernel: divergence forward and backward (reductions,
# weights, masks, the fused gradient, bf16 / fp16), the sparse teacher, the matcher (uint8 and
# float, small blocks, ragged groups).
LIBRARY_TESTS = (
    "tests/test_divergence.py tests/test_divergence_sparse.py tests/test_match.py -k 'triton and "
    "cpu and (reductions_weight_mask or mixed_dtypes or small_blocks or float_ragged or ties_go)'"
)
KERNELS = {"_divergence_fwd_kernel", "_divergence_bwd_kernel", "_sparse_fwd_kernel",
           "_sparse_bwd_kernel", "_knn_kernel"}  # fmt: skip


def test_library_kernels_compile_for_sm90(tmp_path):
    _ptxas_or_skip()
    out = tmp_path / "aot.json"
    res = _tool("--pytest", LIBRARY_TESTS, "--jobs", "2", "--out", str(out))
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    launches = json.loads(out.read_text())["launches"]
    compiled = {r["kernel"].split(":")[1] for r in launches if "error" not in r}
    assert compiled == KERNELS, compiled
    for r in launches:  # what would stop a launch on the GPU is an error above; spills are not
        assert r["smem"] <= 227 * 1024 and r["regs"] * 32 * r["num_warps"] <= 65536
    # the matcher's GPU tiles (64 x 64, 8 warps; 16 x 16 where a test asks), never the
    # interpreter's 128 x 256
    knn = [
        (constexprs_by_name(r), r["num_warps"])
        for r in launches
        if r["kernel"].endswith("_knn_kernel")
    ]
    assert all(c["BLOCK_N"] != 256 for c, _ in knn)
    assert any((c["BLOCK_M"], c["BLOCK_N"], w) == (64, 64, 8) for c, w in knn)
