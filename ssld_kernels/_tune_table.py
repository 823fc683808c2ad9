"""Tune tables: the measured choice of GPU divergence backend and launch config.

``python -m ssld_kernels.tune`` times the divergence op of each GPU backend on this GPU and
writes a JSON table (format below) to ``$SSLD_KERNELS_TUNE_FILE`` or
``~/.cache/ssld_kernels/tune-<device name>.json``. When such a table exists for the current GPU
and this exact torch / triton / ssld_kernels version, "auto" for the divergence op on CUDA
tensors (:mod:`ssld_kernels._backends`) ranks the backends by the table's times for (mode,
dtype, class count C) and takes the fastest available one, and the launchers use the bucket's
launch config (:func:`launch_config`); without a table (or for C outside it, a dtype it lacks,
the match op, CPU tensors) the static order and the kernels' default launches apply. An
explicit ``backend=`` or SSLD_KERNELS_BACKEND always wins over the table. The table is read
once per device name and cached (:func:`clear_tune_cache` forgets it); a corrupt file, or one
written for another device or version, is ignored with a :class:`TuneTableWarning`.
``SSLD_KERNELS_TUNE_FILE=off`` disables tables.

Table format (``TUNE_FORMAT`` = 1)::

    {"format": 1, "device": "NVIDIA H100 80GB HBM3", "torch": "2.5.1", "triton": "3.1.0",
     "ssld_kernels": "0.1.0", "created": "...", "kind": "jsd", "rows": [256, 4096], ...,
     "entries": [{"op": "divergence", "mode": "fwdbwd", "dtype": "bfloat16",
                  "c_lo": 2024, "c_hi": 9459, "c": 4096, "backend": "triton",
                  "ms": {"cuda": 0.123, "triton": 0.101}, "ms_by_rows": {...},
                  "triton_config": {"block": 4096, "num_warps": 8}}, ...]}

``mode`` is "fwdbwd" (``softmax_divergence`` + autograd backward; also used for forward-only
calls) or "fused" (``softmax_divergence_and_grad``). An entry covers ``c_lo <= C < c_hi``
(``c_hi`` null: unbounded); ``ms`` is per backend the geometric mean over the measured row
counts of the median time, and ``backend`` its argmin. ``<backend>_config`` (optional, keys of
``LAUNCH_CONFIG_KEYS``) is the backend's fastest measured launch config in the bucket. Mixed
student/teacher dtypes look up the wider dtype.

This module knows nothing of backend availability: ssld_kernels._backends imports it, never
the other way round.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch

# Every backend name (ssld_kernels._backends discovers and orders them); a table names no other.
BACKENDS = ("cuda", "triton", "cpu", "torch")
TUNE_ENV_VAR = "SSLD_KERNELS_TUNE_FILE"
TUNE_FORMAT = 1
TUNE_MODES = ("fwdbwd", "fused")
_TUNE_OFF = ("off", "none", "0")


class TuneTableWarning(UserWarning):
    """A tune table exists but is ignored (corrupt, other device, other versions)."""


# ----------------------------------------------------------------------------------------------
# where a table lives and what it must have been measured with
# ----------------------------------------------------------------------------------------------


def sanitize_device_name(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"`` (safe in a file name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unknown"


def tune_path(device_name: str) -> Path | None:
    """Where the table of ``device_name`` lives: $SSLD_KERNELS_TUNE_FILE (``off``: nowhere),
    else ``~/.cache/ssld_kernels/tune-<sanitised device name>.json``."""
    env = os.environ.get(TUNE_ENV_VAR, "")
    if env.strip().lower() in _TUNE_OFF:
        return None
    if env:
        return Path(env).expanduser()
    return (
        Path.home() / ".cache" / "ssld_kernels" / f"tune-{sanitize_device_name(device_name)}.json"
    )


def tune_versions() -> dict[str, str | None]:
    """The versions a table must have been measured with to be used."""
    from ssld_kernels import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "ssld_kernels": __version__}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tune_dtype(dtypes: tuple) -> torch.dtype:
    """The dtype a table is looked up with: the widest of the inputs' (first on ties)."""
    return max(dtypes, key=lambda d: torch.finfo(d).bits if d.is_floating_point else 0)


def _device_name(index: int | None) -> str | None:
    """torch.cuda.get_device_name of CUDA device ``index`` (None: current), cached; None if
    it cannot be queried (then no table is used)."""
    try:
        if index is None:
            index = torch.cuda.current_device()
        return _device_name_at(index)
    except Exception:  # no driver or device: the static order applies
        return None


@functools.cache
def _device_name_at(index: int) -> str:
    return torch.cuda.get_device_name(index)


# ----------------------------------------------------------------------------------------------
# schema
# ----------------------------------------------------------------------------------------------

# Launch parameters of the divergence kernels a table may set per bucket ("<backend>_config"),
# with the ranges the launchers accept: powers of two, except row_cache (0 or 1).
# *_per_sm counts are multiplied by the GPU's SMs.
LAUNCH_CONFIG_KEYS = {
    "triton": ("block", "num_warps", "programs_per_sm"),
    "cuda": ("threads", "blocks_per_sm", "row_cache"),
}
_CONFIG_RANGES = {
    "block": (16, 1 << 20),
    "num_warps": (1, 32),
    "programs_per_sm": (1, 64),
    "threads": (64, 1024),
    "blocks_per_sm": (1, 64),
    "row_cache": (0, 1),
}
_PER_SM = {"programs_per_sm": "programs", "blocks_per_sm": "blocks"}


def _check_entry(e) -> None:
    if not isinstance(e, dict):
        raise ValueError(f"entry is not an object: {e!r}")
    for key, typ in (("op", str), ("mode", str), ("dtype", str), ("backend", str), ("ms", dict)):
        if not isinstance(e.get(key), typ):
            raise ValueError(f"entry lacks a {typ.__name__} {key!r}: {e!r}")
    c_lo, c_hi = e.get("c_lo"), e.get("c_hi", None)
    if type(c_lo) is not int or not (c_hi is None or (type(c_hi) is int and c_hi > c_lo)):
        raise ValueError(f"entry has bad bucket bounds c_lo={c_lo!r} c_hi={c_hi!r}")
    for name, ms in e["ms"].items():
        if name not in BACKENDS or not isinstance(ms, (int, float)) or not math.isfinite(ms):
            raise ValueError(f"entry has a bad time {name!r}: {ms!r}")
    if e["backend"] not in BACKENDS:
        raise ValueError(f"entry names an unknown backend {e['backend']!r}")
    for backend, keys in LAUNCH_CONFIG_KEYS.items():
        cfg = e.get(f"{backend}_config")
        if cfg is None:
            continue
        if not isinstance(cfg, dict) or not set(cfg) <= set(keys):
            raise ValueError(f"entry has a bad {backend}_config {cfg!r}")
        for key, v in cfg.items():
            lo, hi = _CONFIG_RANGES[key]
            ok = type(v) is int and lo <= v <= hi
            if ok and key != "row_cache":
                ok = not v & (v - 1)  # a power of two
            if not ok:
                raise ValueError(
                    f"entry's {backend}_config has a bad {key}: {v!r} (expected "
                    + ("0 or 1" if key == "row_cache" else f"a power of two in [{lo}, {hi}]")
                    + ")"
                )


def parse_tune_table(data, device_name: str, versions: dict) -> tuple[dict | None, str]:
    """Validate a decoded table for ``device_name`` and ``versions``: (table, "") or
    (None, why it is unusable)."""
    if not isinstance(data, dict):
        return None, "not a JSON object"
    if data.get("format") != TUNE_FORMAT:
        return None, f"format {data.get('format')!r}, expected {TUNE_FORMAT}"
    if data.get("device") != device_name:
        return None, f"measured on {data.get('device')!r}, this device is {device_name!r}"
    for key, want in versions.items():
        if data.get(key) != want:
            return None, f"measured with {key} {data.get(key)!r}, this is {key} {want!r}"
    entries = data.get("entries")
    if not isinstance(entries, list):
        return None, "no 'entries' list"
    try:
        for e in entries:
            _check_entry(e)
    except ValueError as e:
        return None, str(e)
    return data, ""


# ----------------------------------------------------------------------------------------------
# reading (once per device name) and looking up
# ----------------------------------------------------------------------------------------------


def _read_tune_table(path: Path, device_name: str, versions: dict) -> tuple[dict | None, str]:
    """(table, "") when usable; (None, "") when there is no file; (None, why) when unusable."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None, ""
    except OSError as e:
        return None, f"cannot read it ({e})"
    try:
        data = json.loads(text)
    except ValueError as e:
        return None, f"corrupt JSON ({e})"
    return parse_tune_table(data, device_name, versions)


def _warn_unusable(path: Path, why: str) -> None:
    warnings.warn(
        f"ssld_kernels: ignoring tune table {path}: {why}; rerun `python -m ssld_kernels.tune`",
        TuneTableWarning,
        stacklevel=3,
    )


@functools.cache
def _tune_table_for(device_name: str) -> tuple[dict | None, Path | None, str]:
    """(table or None, path looked at, why unusable) for ``device_name``; read once, cached.
    An unusable table warns (once, since cached)."""
    path = tune_path(device_name)
    if path is None:
        return None, None, ""
    table, why = _read_tune_table(path, device_name, tune_versions())
    if why:
        _warn_unusable(path, why)
    return table, path, why


def tune_table(device_name: str) -> dict | None:
    """The cached, validated tune table of ``device_name`` (None when there is none)."""
    return _tune_table_for(device_name)[0]


def _tune_entry(table: dict | None, op: str, mode: str, dtype: str, n_cols: int) -> dict | None:
    """The first entry of ``table`` for (op, mode, dtype) whose bucket c_lo <= C < c_hi holds."""
    if table is None:
        return None
    for e in table["entries"]:
        if e["op"] != op or e["mode"] != mode or e["dtype"] != dtype:
            continue
        if e["c_lo"] <= n_cols and (e["c_hi"] is None or n_cols < e["c_hi"]):
            return e
    return None


def lookup_tune(table: dict | None, op: str, mode: str, dtype: str, n_cols: int) -> tuple[str, ...]:
    """Backends measured for (op, mode, dtype, C) in ``table``, fastest first; () if none.

    Pure: no availability check (the caller skips unavailable backends).
    """
    e = _tune_entry(table, op, mode, dtype, n_cols)
    if e is None:
        return ()
    ranked = sorted(e["ms"], key=lambda name: (e["ms"][name], name != e["backend"]))
    return tuple(ranked) if ranked else (e["backend"],)


def tuned_order(
    op: str, dtypes: tuple, n_cols: int | None, mode: str, index: int | None
) -> tuple[str, ...]:
    """The table's ranking for ``op`` on CUDA device ``index`` (None: current) with ``dtypes``
    (looked up with the widest), a known class count ``n_cols`` and ``mode``, fastest first;
    () when no table or entry applies (the divergence op only)."""
    if op != "divergence" or n_cols is None or not dtypes:
        return ()
    device_name = _device_name(index)
    if device_name is None:
        return ()
    key = dtype_name(_tune_dtype(dtypes))
    return lookup_tune(tune_table(device_name), op, mode, key, n_cols)


# ----------------------------------------------------------------------------------------------
# launch configs
# ----------------------------------------------------------------------------------------------

_FORCED_CONFIGS: dict[str, dict] = {}


def lookup_launch_config(
    table: dict | None, backend: str, mode: str, dtype: str, n_cols: int
) -> dict[str, int] | None:
    """The measured-best launch config of ``backend`` in the divergence bucket, or None."""
    e = _tune_entry(table, "divergence", mode, dtype, n_cols)
    return None if e is None else e.get(f"{backend}_config")


def resolve_per_sm(config: dict | None, sm_count: int) -> dict | None:
    """``config`` with its *_per_sm counts multiplied out for a GPU with ``sm_count`` SMs."""
    if not config:
        return config
    return {_PER_SM.get(k, k): v * sm_count if k in _PER_SM else v for k, v in config.items()}


@functools.cache
def tuned_config(
    backend: str, index: int, mode: str, dtype: torch.dtype, n_cols: int
) -> dict[str, int] | None:
    """``backend``'s launch config on CUDA device ``index`` from its tune table (None: the
    defaults), *_per_sm counts resolved for this device. Cached."""
    device_name = _device_name(index)
    if device_name is None:
        return None
    cfg = lookup_launch_config(tune_table(device_name), backend, mode, dtype_name(dtype), n_cols)
    if not cfg:
        return None
    return resolve_per_sm(cfg, torch.cuda.get_device_properties(index).multi_processor_count)


@contextlib.contextmanager
def forced_launch_config(backend: str, config: dict | None):
    """Launch ``backend``'s divergence kernels with ``config`` (keys of LAUNCH_CONFIG_KEYS,
    *_per_sm already resolved) inside the block, whatever a tune table says ({}: the
    defaults). For measurements (``ssld_kernels.tune``) and tests."""
    old = _FORCED_CONFIGS.get(backend)
    _FORCED_CONFIGS[backend] = dict(config or {})
    try:
        yield
    finally:
        if old is None:
            _FORCED_CONFIGS.pop(backend, None)
        else:
            _FORCED_CONFIGS[backend] = old


def launch_config(backend: str, s: torch.Tensor, t: torch.Tensor, mode: str) -> dict | None:
    """The launch config of ``backend``'s divergence kernels for logits ``s``, ``t``: forced,
    else the tune table's for this GPU and bucket, else None (the kernels' defaults)."""
    forced = _FORCED_CONFIGS.get(backend)
    if forced is not None:
        return forced
    if not s.is_cuda:
        return None
    return tuned_config(backend, s.device.index, mode, _tune_dtype((s.dtype, t.dtype)), s.shape[-1])


# ----------------------------------------------------------------------------------------------
# cache and report
# ----------------------------------------------------------------------------------------------

# cache_clear of caches holding answers derived from tables (ssld_kernels._backends registers
# its resolution cache: this module cannot import it).
_DEPENDENT_CACHES: list = []


def on_clear(cache_clear) -> None:
    """Call ``cache_clear`` whenever :func:`clear_tune_cache` runs."""
    _DEPENDENT_CACHES.append(cache_clear)


def clear_tune_cache() -> None:
    """Forget loaded tune tables and cached resolutions (after writing a new table)."""
    _tune_table_for.cache_clear()
    tuned_config.cache_clear()
    for cache_clear in _DEPENDENT_CACHES:
        cache_clear()


def describe_tune() -> str:
    """One line for ``python -m ssld_kernels``: the table in use, or why there is none."""
    env = os.environ.get(TUNE_ENV_VAR, "")
    if env and env.strip().lower() in _TUNE_OFF:
        return f"tune table: disabled ({TUNE_ENV_VAR}={env})"
    if not torch.cuda.is_available():
        return "tune table: unused (no CUDA device; run `python -m ssld_kernels.tune` on a GPU)"
    name = _device_name(None)
    if name is None:
        return "tune table: unused (the CUDA device name cannot be queried)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TuneTableWarning)
        table, path, why = _tune_table_for(name)
    if table is not None:
        return (
            f"tune table: loaded from {path} ({len(table['entries'])} entries for {name}); "
            "auto picks the measured GPU divergence backend and launch configs"
        )
    state = f"ignored ({why})" if why else "none"
    return (
        f"tune table: {state} at {path} for {name}; static GPU order "
        "(`python -m ssld_kernels.tune` writes one)"
    )
