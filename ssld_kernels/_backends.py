"""Backend discovery and selection.

Backends of the divergence loss, fastest first for each device:
  cuda    hand-written CUDA kernels in ssld_kernels._C (built when nvcc was found)
  triton  Triton kernels (GPU; on CPU only under TRITON_INTERPRET=1, for testing)
  cpu     multi-threaded, vectorised C++ kernels in ssld_kernels._C
  torch   the plain-PyTorch reference (always available, any device, also float64)

``backend=None`` or ``"auto"`` reads SSLD_KERNELS_BACKEND, else picks the first backend in
that order that is available for the tensors' device and dtypes. Everything here is resolved
from static facts (device type and name, dtype, class count, environment), never from tensor
values.

Measured choice on GPUs: when a tune table (:mod:`ssld_kernels._tune_table`, written by
``python -m ssld_kernels.tune``) exists for the current GPU and versions, "auto" for the
divergence op on CUDA tensors with a known class count ranks the backends by the table's times
(:func:`ssld_kernels._tune_table.tuned_order`) and takes the fastest available one; otherwise
it keeps the static order below. An explicit ``backend=`` or SSLD_KERNELS_BACKEND always wins
over the table.
"""

from __future__ import annotations

import functools
import os

import torch

from ssld_kernels import _tune_table
from ssld_kernels._torch_compat import known_int
from ssld_kernels._tune_table import BACKENDS, TUNE_MODES, describe_tune, tuned_order

ENV_VAR = "SSLD_KERNELS_BACKEND"
_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _load_ext():
    """Return (module or None, reason it is missing)."""
    try:
        from ssld_kernels import _C  # noqa: F401
    except ImportError as e:
        return None, f"ssld_kernels._C could not be imported ({e}); reinstall with `pip install .`"
    return _C, ""


def ext():
    return _load_ext()[0]


@functools.cache
def _triton_status():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    return True, ""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _cuda_ext_status():
    mod = ext()
    if mod is None:
        return False, _load_ext()[1]
    if not mod.with_cuda:
        return False, "ssld_kernels._C was built without CUDA (nvcc not found or SSLD_CUDA=0)"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    if mod.cuda_device_count() == 0:
        return False, "the extension's CUDA runtime sees no device (driver too old?)"
    return True, ""


def backend_status(device_type: str | None = None) -> dict[str, tuple[bool, str]]:
    """For each backend: (available, reason when not) for tensors on ``device_type``.

    ``device_type=None`` answers "usable on some device of this machine".
    """
    out = {}
    on_gpu = device_type in (None, "cuda")
    on_cpu = device_type in (None, "cpu")
    ok, why = _cuda_ext_status()
    out["cuda"] = (ok and on_gpu, why or ("cuda tensors only" if not on_gpu else ""))
    ok, why = _triton_status()
    if ok:
        if device_type == "cpu" and not triton_interpret():
            ok, why = False, "CPU tensors need TRITON_INTERPRET=1 (slow; for testing)"
        elif device_type == "cuda" or (device_type is None and not triton_interpret()):
            if not torch.cuda.is_available():
                ok, why = False, "no CUDA device (set TRITON_INTERPRET=1 to run on CPU)"
    out["triton"] = (ok, why)
    mod = ext()
    if mod is None:
        out["cpu"] = (False, _load_ext()[1])
    else:
        out["cpu"] = (on_cpu, "" if on_cpu else "cpu tensors only")
    out["torch"] = (True, "")
    return out


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable for tensors on ``device`` (default: any device of this machine)."""
    dtype = None if device is None else torch.device(device).type
    return [name for name, (ok, _) in backend_status(dtype).items() if ok]


# Which backends implement each op family.
OP_BACKENDS = {"divergence": BACKENDS, "match": BACKENDS}
# "auto" on GPU tensors, first available wins. Matching prefers triton until the CUDA matcher
# (csrc/match.cu, not yet run on a GPU) has passed tests/test_match_cuda.py on a device; the
# Triton kernel's results are verified bit for bit in the interpreter.
GPU_AUTO_ORDER = {"divergence": ("cuda", "triton", "torch"), "match": ("triton", "cuda", "torch")}


def supports_dtype(backend: str, dtype: torch.dtype, op: str = "divergence") -> bool:
    if op == "match":
        return dtype in (torch.uint8, torch.float32)
    if dtype == torch.float64:
        return backend in ("cpu", "torch")
    return dtype in _LOW_PRECISION


def _op_status(op: str, device_type: str) -> dict[str, tuple[bool, str]]:
    status = dict(backend_status(device_type))
    for name in BACKENDS:
        if name not in OP_BACKENDS[op]:
            status[name] = (False, f"{op} has no {name} backend yet")
    mod = ext()
    if op == "match":
        for name in ("cpu", "cuda"):
            if status[name][0] and not hasattr(mod, f"match_knn_{name}"):
                status[name] = (False, f"ssld_kernels._C predates match_knn_{name}; rebuild it")
    return status


def _auto_order(
    op: str, device_type: str, dtypes: tuple, n_cols: int | None, mode: str, index: int | None
) -> tuple[str, ...]:
    if device_type == "cpu":
        return ("cpu", "torch")
    order = GPU_AUTO_ORDER[op]
    if device_type == "cuda":
        ranked = tuned_order(op, dtypes, n_cols, mode, index)
        order = ranked + tuple(name for name in order if name not in ranked)
    return order


@functools.cache
def _resolve(
    requested: str,
    device_type: str,
    dtypes: tuple,
    op: str = "divergence",
    n_cols: int | None = None,
    mode: str = "fwdbwd",
    index: int | None = None,
) -> str:
    status = _op_status(op, device_type)
    if requested == "auto":
        for name in _auto_order(op, device_type, dtypes, n_cols, mode, index):
            if status[name][0] and all(supports_dtype(name, d, op) for d in dtypes):
                return name
        return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
    ok, why = status[requested]
    if not ok:
        raise RuntimeError(
            f"backend {requested!r} is not available for {device_type} tensors: {why}"
        )
    for d in dtypes:
        if not supports_dtype(requested, d, op):
            raise TypeError(f"backend {requested!r} does not support dtype {d}")
    return requested


_tune_table.on_clear(_resolve.cache_clear)  # a new table changes "auto"'s answers


@torch.compiler.assume_constant_result
def _resolve_static(
    backend: str | None,
    device_type: str,
    dtypes: tuple,
    op: str,
    n_cols: int | None = None,
    mode: str = "fwdbwd",
    index: int | None = None,
) -> str:
    if backend is None:  # the environment is a preference: ops without that backend use auto
        backend = os.environ.get(ENV_VAR, "auto").lower() or "auto"
        if backend in BACKENDS and backend not in OP_BACKENDS[op]:
            backend = "auto"
    return _resolve(backend.lower(), device_type, dtypes, op, n_cols, mode, index)


def resolve_backend(
    backend: str | None,
    device: torch.device,
    dtypes: tuple,
    op: str = "divergence",
    n_cols: int | None = None,
    mode: str = "fwdbwd",
) -> str:
    """Pick the backend of ``op`` for tensors on ``device`` with ``dtypes`` (static facts only).

    ``n_cols`` (the class count C) and ``mode`` ("fwdbwd" or "fused") let "auto" use a tune
    table on CUDA tensors; without ``n_cols`` the static order applies. A symbolic C (dynamic
    shapes under torch.compile) is not specialised on: it counts as unknown.
    torch.compile evaluates this once while tracing and bakes the answer into the graph.
    """
    if mode not in TUNE_MODES:
        raise ValueError(f"mode must be one of {TUNE_MODES}, got {mode!r}")
    index = device.index
    if device.type == "cuda" and op == "divergence":
        n_cols = known_int(n_cols)
    else:
        n_cols = None
    if n_cols is None:
        mode, index = "fwdbwd", None  # no table applies: one cache entry
    return _resolve_static(backend, device.type, tuple(dtypes), op, n_cols, mode, index)


def describe() -> str:
    """Human-readable report: version, backends and why any is missing."""
    from ssld_kernels import __version__

    lines = [f"ssld_kernels {__version__} (torch {torch.__version__})"]
    mod = ext()
    if mod is not None:
        lines.append(f"  extension: {mod.__file__}")
        try:
            isa = mod.cpu_isa()
        except ValueError as e:  # a bad SSLD_KERNELS_CPU_ISA: say so, the report goes on
            isa = f"unusable ({e})"
        lines.append(f"    cpu kernels: {isa}; cuda kernels: {'yes' if mod.with_cuda else 'no'}")
    try:
        import triton

        lines.append(
            f"  triton {triton.__version__} (TRITON_INTERPRET={'1' if triton_interpret() else '0'})"
        )
    except ImportError:
        pass
    lines.append(f"  {ENV_VAR}={os.environ.get(ENV_VAR, '') or '(unset: auto)'}")
    for name, (ok, why) in backend_status(None).items():
        lines.append(f"  {name:7s} {'available' if ok else 'missing'}{'' if ok else ': ' + why}")
    lines.append("  " + describe_tune())
    for op in OP_BACKENDS:
        usable = [n for n, (ok, _) in _op_status(op, "cpu").items() if ok]
        lines.append(f"  {op} on CPU tensors: {', '.join(usable)}")
    return "\n".join(lines)
