"""Compile the Triton divergence kernels for sm_90 (H100) without a GPU and count their SASS.

    python bench/triton_sass.py --out /tmp/triton_sass.json          # the whole grid
    python bench/triton_sass.py --single --out /tmp/triton_sass.json # + one-chunk rows
    python bench/triton_sass.py --kernels fwd --dtypes bf16 --modes 1 --blocks 4096 \\
        --warps 8 --sass-dir /tmp/sass --out /tmp/one.json          # one case, keep SASS

Needs only the ``triton`` wheel (its bundled ``ptxas`` and ``cuobjdump``) and torch on the
CPU: no GPU, no CUDA toolkit; TRITON_INTERPRET must stay unset. For each configuration the
launcher (``_divergence_forward`` / ``_divergence_backward`` of
``ssld_kernels/triton/divergence.py``) is called on small contiguous CPU tensors of
``--n-cols`` classes with a recording stand-in for its kernel, so the argument list,
constexprs and options are exactly the launcher's (BLOCK and num_warps from the grid,
HAS_WEIGHT / HAS_MASK False, WRITE_GRAD_T False). The arguments are specialised as
Triton's JIT does (types, ``tt.divisibility`` 16, None pointers and ints equal to 1 as
constexprs) and the kernel compiled with ``triton.compile`` for ``GPUTarget("cuda", 90,
32)``. Reported per configuration:

* ``regs``, ``spill_st`` / ``spill_ld`` (bytes) and ``stack`` from ptxas's ``-v`` log,
  ``smem`` (Triton's shared-memory allocation, bytes);
* whole-kernel SASS counts (``cuobjdump -sass``): global loads / stores by access width in
  bits (``LDG.E.128`` = 128, ``.64``, plain = 32, ``.U16`` = 16), ``MUFU.*``, ``FFMA`` /
  ``FMUL`` / ``FADD``, local-memory ``LDL`` / ``STL`` and the instruction total (NOPs
  excluded); the JSON also holds the full opcode histogram;
* the same counts for each innermost loop (a backward branch's target .. the branch),
  divided by the elements per thread per iteration ``ept = BLOCK / (32 * num_warps)`` in
  the per-element table. The forward's loops are, in address order, pass 1 (log-sum-exp),
  pass 2 (the sums A, B) and, with a gradient, pass 3 (gradient writes); with SINGLE
  (n_cols <= BLOCK, ``--single`` adds n_cols = BLOCK) it is the loop over rows; the
  backward's is the gradient loop. Loops that do not match these names are ``loopN``.

An element is one class of a row: one s and one t logit read (and one gradient written in
the gradient loops). ``*`` marks the launcher's default (BLOCK, num_warps) for ``--n-cols``
(``_block_config``). Triton / ptxas versions go into the JSON's ``meta``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import native_specialize_impl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_sha  # noqa: E402

from ssld_kernels.triton import divergence as div  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# kernel -> (launcher, kernel) names in the module
NAMES = {
    "fwd": ("_divergence_forward", "_divergence_fwd_kernel"),
    "bwd": ("_divergence_backward", "_divergence_bwd_kernel"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# innermost loops in address order, by (kernel, gradient written, SINGLE)
LOOP_NAMES = {
    ("fwd", False, False): ["pass1", "pass2"],
    ("fwd", True, False): ["pass1", "pass2", "pass3"],
    ("fwd", False, True): ["row"],
    ("fwd", True, True): ["row"],
    ("bwd", True, None): ["grad"],
}

SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+(?:`\()?0x([0-9a-f]+)")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


# ----------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def launch_args(cfg: dict) -> tuple[tuple, dict]:
    """(args, kwargs) that the launcher ``_divergence_forward`` / ``_divergence_backward``
    passes to its kernel for contiguous CPU logits (only their dtype and 16-byte alignment
    matter), BLOCK = cfg["block"] and num_warps = cfg["num_warps"]."""
    n = 3  # neither 1 nor a multiple of 16: no specialisation on the row count
    dtype = DTYPES[cfg["dtype"]]
    s = torch.zeros((n, cfg["n_cols"]), dtype=dtype)
    t = torch.zeros((n, cfg["n_cols"]), dtype=dtype)
    grad_rows = torch.ones(n, dtype=torch.float32)
    spec = SimpleNamespace(mode=cfg["mode"], beta=0.5, coef_a=0.5, coef_b=0.5, inv_temp=0.5)
    launcher_name, kernel_name = NAMES[cfg["kernel"]]
    launcher = getattr(div, launcher_name)
    params = inspect.signature(launcher).parameters
    size = {"block": cfg["block"]}
    if "config" in params:  # newer launchers take config={"block", "num_warps", ...}
        size = {"config": {"block": cfg["block"], "num_warps": cfg["num_warps"]}}
    grads = {"need_grad_s": cfg["write_grad_s"], "need_grad_t": False}
    recorder = _Recorder()
    original = getattr(div, kernel_name)
    setattr(div, kernel_name, recorder)
    try:
        if cfg["kernel"] == "fwd":
            launcher(s, t, None, None, spec, grad_rows, **grads, **size)
        else:
            stats = torch.zeros((n, div.STATS_WIDTH), dtype=torch.float32)
            launcher(s, t, None, None, stats, grad_rows, spec, **grads, **size)
    finally:
        setattr(div, kernel_name, original)
    ((args, kwargs),) = recorder.calls
    kwargs["num_warps"] = cfg["num_warps"]
    return args, kwargs


def specialize(fn, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) for ASTSource / compile, derived from a
    launch's arguments the way Triton's JIT does."""
    backend_cls = type(make_backend(TARGET))
    bound = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    signature, consts, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            consts[name] = bound.get(name, param.default)
            continue
        ty, spec = native_specialize_impl(backend_cls, bound[name], False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # None pointers, ints equal to 1
            consts[name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = backend_cls.parse_attr(spec)
    return signature, consts, attrs, options


def init_worker(cache_dir: str) -> None:
    """Fresh compiles into a private cache, with ptxas's -v log printed (and captured)."""
    knobs.cache.dir = cache_dir
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def run_tool(tool: str, *args: str) -> str:
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def compile_config(cfg: dict, sass_dir: str | None) -> dict:
    """Compile one configuration and return its record (with ``error`` on failure)."""
    fn = getattr(div, NAMES[cfg["kernel"]][1])
    wgs = cfg["write_grad_s"]
    args, kwargs = launch_args(cfg)
    signature, consts, attrs, options = specialize(fn, args, kwargs)
    rec = dict(cfg, single=consts.get("SINGLE"))
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                target=TARGET,
                options=options,
            )
    except Exception as exc:  # report and go on with the other configurations
        rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return rec

    ptxas_log = log.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        cuobjdump = knobs.nvidia.cuobjdump.path
        sass = run_tool(cuobjdump, "-sass", str(cubin))
        res_usage = run_tool(cuobjdump, "-res-usage", str(cubin))
    if sass_dir:
        name = "{kernel}_{dtype}_m{mode}_b{block}_w{num_warps}_g{g}_c{n_cols}".format(
            g=int(wgs), **cfg
        )
        Path(sass_dir, name + ".sass").write_text(sass)
        Path(sass_dir, name + ".ptx").write_text(compiled.asm["ptx"])

    regs = PTXAS_REGS.search(ptxas_log)
    spills = PTXAS_SPILLS.search(ptxas_log)
    usage = RES_USAGE.search(res_usage)
    rec["regs"] = int(regs.group(1)) if regs else (int(usage.group(1)) if usage else None)
    if spills:
        rec["stack"], rec["spill_st"], rec["spill_ld"] = map(int, spills.groups())
    else:  # no ptxas log: the stack size is the best available spill indicator
        rec["stack"] = int(usage.group(2)) if usage else None
        rec["spill_st"] = rec["spill_ld"] = None
    rec["smem"] = compiled.metadata.shared
    rec["ptxas_log"] = ptxas_log.strip()
    rec["res_usage"] = usage.group(0) if usage else None

    instrs = parse_sass(sass)
    rec["kernel_counts"] = count(instrs)
    ept = cfg["block"] // (32 * cfg["num_warps"])
    rec["ept"] = ept
    loops = find_loops(instrs)
    names = LOOP_NAMES.get((cfg["kernel"], wgs, rec["single"]), [])
    if len(names) != len(loops):
        names = [f"loop{i}" for i in range(len(loops))]
    rec["loops"] = []
    for name, (start, end) in zip(names, loops):
        counts = count([ins for ins in instrs if start <= ins[0] <= end])
        per_elt = {k: round(v / ept, 3) for k, v in counts.items() if k != "opcodes"}
        rec["loops"].append(
            {"name": name, "start": start, "end": end, "counts": counts, "per_element": per_elt}
        )
    return rec


# ----------------------------------------------------------------------------------------
# SASS analysis
# ----------------------------------------------------------------------------------------
def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """[(address, mnemonic with modifiers, operands)] of the (single) function."""
    out = []
    for line in sass.splitlines():
        m = SASS_LINE.search(line)
        if not m:
            continue
        text = m.group(2).strip()
        if text.startswith("@"):  # predicate guard
            text = text.split(None, 1)[1]
        op, _, operands = text.partition(" ")
        out.append((int(m.group(1), 16), op, operands))
    return out


def access_width(op: str) -> int:
    """Bits per thread of a LDG / STG / LDL / STL mnemonic (32 when unsuffixed)."""
    mods = set(op.split(".")[1:])
    for width, names in ((128, {"128"}), (64, {"64"}), (16, {"U16", "S16"}), (8, {"U8", "S8"})):
        if mods & names:
            return width
    return 32


def count(instrs) -> dict:
    ops = Counter(op for _, op, _ in instrs if op != "NOP")
    c = Counter()
    for op, n in ops.items():
        base = op.split(".")[0]
        if base in ("LDG", "STG"):
            c[f"{base.lower()}{access_width(op)}"] += n
            c[f"{base.lower()}_bytes"] += n * access_width(op) // 8
        elif base == "MUFU":
            c[op.lower().replace(".", "_")] += n
            c["mufu"] += n
        elif base in ("FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "LDL", "STL"):
            c[base.lower()] += n
        elif base in ("LDS", "STS", "SHFL", "BAR"):
            c[base.lower()] += n
    c["fp32"] = c["ffma"] + c["fmul"] + c["fadd"]
    c["total"] = sum(ops.values())
    out = dict(sorted(c.items()))
    out["opcodes"] = dict(ops.most_common())
    return out


def find_loops(instrs) -> list[tuple[int, int]]:
    """Innermost loops as (first, last address): each backward branch closes one (the
    trailing ``BRA`` to itself after ``EXIT`` is not a loop)."""
    loops = []
    for addr, op, operands in instrs:
        if op.split(".")[0] != "BRA":
            continue
        m = BRANCH.search(f"{op} {operands}")
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    inner = [
        lp for lp in loops if not any(o != lp and lp[0] <= o[0] <= o[1] <= lp[1] for o in loops)
    ]
    return sorted(inner)


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------
def configurations(args) -> list[dict]:
    """The grid of configurations; the backward only runs with a gradient to write, and
    ``--single`` adds forward configurations with n_cols = BLOCK (the one-chunk path)."""
    cfgs = []
    grid = itertools.product(args.kernels, args.dtypes, args.modes, args.blocks, args.warps)
    for kernel, dtype, mode, block, num_warps in grid:
        if not args.min_ept <= block // (32 * num_warps) <= args.max_ept:
            continue
        n_cols_list = [args.n_cols] + ([block] if args.single and kernel == "fwd" else [])
        for n_cols, wgs in itertools.product(
            n_cols_list, (True,) if kernel == "bwd" else (False, True)
        ):
            cfgs.append(
                {
                    "kernel": kernel,
                    "dtype": dtype,
                    "mode": mode,
                    "block": block,
                    "num_warps": num_warps,
                    "write_grad_s": wgs,
                    "n_cols": n_cols,
                }
            )
    return cfgs


def fmt_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def key_cells(r: dict, default: tuple[int, int]) -> list:
    mark = "*" if (r["block"], r["num_warps"]) == default else ""
    return [
        r["kernel"],
        r["dtype"],
        r["mode"],
        f"{r['block']}{mark}",
        r["num_warps"],
        r["block"] // (32 * r["num_warps"]),
        "S" if r["write_grad_s"] else "-",
        r["n_cols"],
        {True: "y", False: "n"}.get(r.get("single"), "-"),
    ]


def print_tables(records: list[dict], default: tuple[int, int]) -> None:
    key = ["kern", "dt", "M", "BLOCK", "nw", "ept", "grad", "C", "1chunk"]
    rows, loop_rows, errors = [], [], []
    for r in records:
        if "error" in r:
            errors.append(key_cells(r, default) + [r["error"].splitlines()[0][:100]])
            continue
        k = r["kernel_counts"]
        rows.append(
            key_cells(r, default)
            + [r["regs"], r["spill_st"], r["spill_ld"], r["smem"]]
            + [f"{k.get('ldg128', 0)}/{k.get('ldg64', 0)}/{k.get('ldg32', 0)}/{k.get('ldg16', 0)}"]
            + [f"{k.get('stg128', 0)}/{k.get('stg64', 0)}/{k.get('stg32', 0)}/{k.get('stg16', 0)}"]
            + [f"{k.get('mufu_ex2', 0)}/{k.get('mufu_lg2', 0)}/{k.get('mufu_rcp', 0)}"]
            + [k.get("ffma", 0), k.get("fmul", 0), k.get("fadd", 0), k.get("ldl", 0)]
            + [k.get("stl", 0), k["total"]]
        )
        for lp in r["loops"]:
            p = lp["per_element"]
            loop_rows.append(
                key_cells(r, default)
                + [lp["name"], lp["counts"]["total"], p["total"], p.get("mufu", 0)]
                + [p.get("mufu_ex2", 0), p.get("mufu_lg2", 0), p.get("mufu_rcp", 0)]
                + [p["fp32"], p.get("ffma", 0), p.get("fmul", 0), p.get("fadd", 0)]
                + [p.get("fsetp", 0), p.get("fsel", 0)]
                + [p.get("ldg_bytes", 0), p.get("stg_bytes", 0), p.get("ldl", 0), p.get("stl", 0)]
            )
    print("Whole kernel (sm_90a). LDG/STG: instructions of 128/64/32/16 bits; MUFU: EX2/LG2/RCP")
    heads = ["regs", "spillSt", "spillLd", "smem", "LDG", "STG", "MUFU"]
    heads += ["FFMA", "FMUL", "FADD", "LDL", "STL", "total"]
    print(fmt_table(key + heads, rows))
    print("\nLoops, per element (class) per thread: instruction counts / ept")
    heads = ["loop", "instrs", "tot/e", "MUFU/e", "EX2/e", "LG2/e", "RCP/e", "FP32/e"]
    heads += ["FFMA/e", "FMUL/e", "FADD/e", "FSETP/e", "FSEL/e", "LDG B/e", "STG B/e"]
    heads += ["LDL/e", "STL/e"]
    print(fmt_table(key + heads, loop_rows))
    if errors:
        print("\nFailed to compile:")
        print(fmt_table(key + ["error"], errors))


def csv_list(cast):
    return lambda text: [cast(v) for v in text.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="JSON file for the records")
    ap.add_argument("--kernels", type=csv_list(str), default=["fwd", "bwd"])
    ap.add_argument("--dtypes", type=csv_list(str), default=["fp32", "bf16"])
    ap.add_argument("--modes", type=csv_list(int), default=[0, 1])
    ap.add_argument("--blocks", type=csv_list(int), default=[1024, 4096, 8192, 16384])
    ap.add_argument("--warps", type=csv_list(int), default=[4, 8, 16, 32])
    ap.add_argument("--min-ept", type=int, default=4, help="fewest elements per thread")
    ap.add_argument("--max-ept", type=int, default=128, help="most elements per thread")
    ap.add_argument(
        "--n-cols", type=int, default=32000, help="row length (alignment specialisation only)"
    )
    ap.add_argument(
        "--single", action="store_true", help="also the forward with n_cols = BLOCK (one chunk)"
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sass-dir", help="also write each kernel's SASS and PTX here")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: this script compiles for the GPU target")
    if args.sass_dir:
        os.makedirs(args.sass_dir, exist_ok=True)

    cfgs = configurations(args)
    print(f"compiling {len(cfgs)} configurations for sm_90 with {args.jobs} job(s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="triton_sass_cache_") as cache_dir:
        with ProcessPoolExecutor(args.jobs, initializer=init_worker, initargs=(cache_dir,)) as ex:
            futures = [ex.submit(compile_config, c, args.sass_dir) for c in cfgs]
            records = [f.result() for f in futures]

    default = div._block_config(args.n_cols)
    print_tables(records, default)
    if args.out:
        meta = {
            "triton": triton.__version__,
            "ptxas": run_tool(get_ptxas(TARGET.arch).path, "--version").strip().splitlines()[-1],
            "target": "sm_90a",
            "n_cols": args.n_cols,
            "launcher_default_block_warps": list(default),
            "git_sha": git_sha(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
