"""The CPU tests under every instruction set this CPU runs, so one machine sees what another
would fail.

Two things change with the CPU, each picked once per process:
* our C++ kernels are compiled once per instruction set (base SSE2, AVX2, AVX-512) and the
  fastest one the CPU runs is picked; SSLD_KERNELS_CPU_ISA selects another;
* PyTorch's own CPU kernels (the torch backend, and the reductions around ours) are
  dispatched per capability (DEFAULT, AVX2, AVX-512: different lane counts, exp and
  summation orders); ATEN_CPU_CAPABILITY selects another.
Each other variant this CPU runs reruns the kernel oracle tests in a subprocess: the ISA
variants with this process's PyTorch capability (only our kernels' tests: the torch backend
does not depend on the ISA), the capabilities with this process's ISA variant (the cpu and
torch backends, dense and sparse teacher); not the cross product, to keep the added time
small. The variant this process runs is the plain test run's.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssld_kernels._backends import ext

ROOT = Path(__file__).resolve().parent.parent
ISAS = ("avx512", "avx2", "base")
CAPABILITIES = ("avx512", "avx2", "default")
# x86 capabilities in increasing order: ATEN_CPU_CAPABILITY above what the CPU has is not
# refused (torch reports it and dies of SIGILL in the first vectorised kernel)
_CAPABILITY_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
ISA_TESTS = ["tests/test_match.py", "tests/test_divergence.py"]
ISA_SELECT = "cpu and not triton and not torch-cpu"
CAPABILITY_TESTS = [*ISA_TESTS, "tests/test_divergence_sparse.py"]
CAPABILITY_SELECT = "cpu and not triton"


def _python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _run_tests(files, select, **env):
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files,
         "-k", select],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    tail = "\n".join(r.stdout.splitlines()[-15:])
    assert r.returncode == 0, f"{env}:\n{tail}\n{r.stderr[-2000:]}"
    assert " passed" in tail, tail


def _default_isa():
    try:
        return ext().cpu_isa()
    except Exception as e:  # noqa: BLE001 - no compiled extension: nothing to compare
        pytest.skip(f"compiled extension unavailable: {e}")


def test_unknown_variant_is_refused():
    r = _python(
        "from ssld_kernels._backends import ext; ext().cpu_isa()", SSLD_KERNELS_CPU_ISA="sse9"
    )
    assert r.returncode != 0 and "SSLD_KERNELS_CPU_ISA=sse9" in r.stderr, r.stderr


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_tests_under_isa(isa):
    """Our kernels' oracle tests with SSLD_KERNELS_CPU_ISA=isa (PyTorch's default capability)."""
    default = _default_isa()
    env = {"SSLD_KERNELS_CPU_ISA": isa}
    r = _python("from ssld_kernels._backends import ext; print(ext().cpu_isa())", **env)
    if r.returncode != 0:
        assert "SSLD_KERNELS_CPU_ISA" in r.stderr, r.stderr  # a clear refusal
        pytest.skip(f"this CPU does not run the {isa} variant")
    assert r.stdout.strip() == isa, (isa, r.stdout, r.stderr)  # the override is obeyed
    if isa == default:
        pytest.skip(f"{isa} is this process's variant: the plain test run covers it")
    _run_tests(ISA_TESTS, ISA_SELECT, **env)


@functools.cache
def _capability(requested):
    """The capability torch dispatches to with ATEN_CPU_CAPABILITY=requested (upper case;
    "": the best this CPU runs), after running a vectorised kernel with it (torch does not
    refuse a capability the CPU lacks: it dies of SIGILL there)."""
    code = (
        "import torch; torch.log_softmax(torch.randn(8, 4099), -1).sum().item(); "
        "print(torch.backends.cpu.get_cpu_capability())"
    )
    r = _python(code, ATEN_CPU_CAPABILITY=requested)
    assert r.returncode == 0, (requested, r.returncode, r.stderr[-2000:])
    return r.stdout.strip().upper()


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_kernel_tests_under_torch_capability(capability):
    """The cpu and torch backends' oracle tests with ATEN_CPU_CAPABILITY=capability (our
    default variant)."""
    best = _capability("")
    if best not in _CAPABILITY_RANK:
        pytest.skip(f"not an x86 build of torch (capability {best})")
    want = capability.upper()
    if _CAPABILITY_RANK[want] > _CAPABILITY_RANK[best]:
        pytest.skip(f"this CPU runs up to {best}, not {want}")
    if want == torch.backends.cpu.get_cpu_capability().upper():
        pytest.skip(f"{want} is this process's capability: the plain test run covers it")
    got = _capability(capability)
    if got != want:
        pytest.skip(f"torch dispatches to {got} when asked for {want}")
    _run_tests(CAPABILITY_TESTS, CAPABILITY_SELECT, ATEN_CPU_CAPABILITY=capability)
