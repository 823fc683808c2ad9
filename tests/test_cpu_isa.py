"""The CPU kernels are compiled once per instruction set (base SSE2, AVX2, AVX-512) and the
fastest one the CPU runs is picked, so on a given machine the others would never run. Here
every other variant this CPU supports runs the CPU tests of the divergence and matching
kernels in a subprocess, selected with SSLD_KERNELS_CPU_ISA."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssld_kernels._backends import ext

ROOT = Path(__file__).resolve().parent.parent


def _runnable_variants():
    try:
        mod = ext()
    except Exception as e:  # noqa: BLE001 - no compiled extension: nothing to compare
        pytest.skip(f"compiled extension unavailable: {e}")
    default = mod.cpu_isa()
    out = []
    for isa in ("avx512", "avx2", "base"):
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "from ssld_kernels._backends import ext; print(ext().cpu_isa())",
            ],
            env={**os.environ, "SSLD_KERNELS_CPU_ISA": isa},
            capture_output=True,
            text=True,
        )
        if r.returncode == 0:
            assert r.stdout.strip() == isa, (isa, r.stdout, r.stderr)  # the override is obeyed
            if isa != default:
                out.append(isa)
        else:
            assert "SSLD_KERNELS_CPU_ISA" in r.stderr, r.stderr  # a clear refusal
    return out


def test_unknown_variant_is_refused():
    r = subprocess.run(
        [sys.executable, "-c", "from ssld_kernels._backends import ext; ext().cpu_isa()"],
        env={**os.environ, "SSLD_KERNELS_CPU_ISA": "sse9"},
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "SSLD_KERNELS_CPU_ISA=sse9" in r.stderr, r.stderr


def test_other_cpu_variants_pass_the_kernel_tests():
    variants = _runnable_variants()
    if not variants:
        pytest.skip("this CPU runs only the default variant")
    for isa in variants:
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
             "tests/test_match.py", "tests/test_divergence.py", "-k", "cpu and not triton"],
            env={**os.environ, "SSLD_KERNELS_CPU_ISA": isa},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )  # fmt: skip
        tail = "\n".join(r.stdout.splitlines()[-15:])
        assert r.returncode == 0, f"{isa} variant:\n{tail}\n{r.stderr[-2000:]}"
        assert " passed" in tail, tail
