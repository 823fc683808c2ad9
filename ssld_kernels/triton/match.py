"""Exact k-nearest-neighbour descriptor matching over ragged groups, in Triton.

The contract is the one of ``csrc/match.h`` (implemented on the CPU by ``csrc/match_cpu.cpp``):
group g matches its queries ``[q_off[g], q_off[g+1])`` against its database rows
``[db_off[g], db_off[g+1])``; for each query the k rows with the smallest squared L2 distance
are returned, ascending, ties to the lower row, indices local to the group's database, and
``+inf`` / ``-1`` in slots beyond the group's database size.

Distances::

    uint8    sum_d (a_d - b_d)^2, exact in int32 (dim <= 33025, so dim * 255^2 < 2^31).
             With a' = a - 128 and b' = b - 128 (int8, so tensor-core int8 x int8 -> int32
             dots apply) a - b = a' - b', hence

                 dist = |a'|^2 + |b'|^2 - 2 a'.b'

             where a'.b' comes from tl.dot(int8, int8) with int32 accumulation and the norms
             are summed from the same shifted tiles. Every term is below dim * 2^15 < 2^31,
             so nothing overflows and the result is the exact integer (identical to the cpu
             backend). The shift is a flip of the top bit (x ^ 0x80 reinterpreted as int8),
             with no widening. Padding of the descriptor dimension is loaded as 128, i.e. a
             shifted 0, so it adds nothing to the dots or the norms. The float32 output is the int32
             rounded to nearest (exact for dim <= 258), as on the CPU.
    float32  difference form, acc = fma(a_d - b_d, a_d - b_d, acc) over d in ascending order,
             one dimension per step for the whole (BLOCK_M, BLOCK_N) tile: exactly the
             operations of the FMA variants of the CPU kernel (avx2 / avx512), so results are
             bit-identical to them on a GPU and in the interpreter (which emulates tl.fma
             exactly); the SSE2 base variant rounds the product separately and can differ in
             the last bits. The dot form |a|^2 + |b|^2 - 2 a.b is NOT used: it cancels
             catastrophically for near duplicates (the case that matters for dedup) and can
             go negative (it would need a clamp at 0). The price is CUDA-core FMAs instead
             of tensor cores, and per-dimension column loads (strided, served by L1/L2).
             NaN (a NaN input, or inf - inf) sorts after +inf and is reported as NaN with its
             index.

Fused top-k (the distance tile never reaches global memory). One program owns up to BLOCK_M
consecutive queries of one group (a host-side schedule, built from the CPU offsets, lists
``(first query row, end row, first db row, end db row)`` per program) and walks the group's
database in BLOCK_N tiles. Every candidate becomes one int64 sort key::

    key = (dist_bits << 32) | local_index

with dist_bits the int32 distance (uint8) or the float32 bits with the sign cleared, clamped
to 0x7f800001 (float32: the order of non-negative floats, +inf < NaN). Keys are unique and
their order is "ascending distance, then ascending index", so plain integer min/max give
the contract's order, ties included. The running top-k of each query is a (BLOCK_M, KP)
int64 register tile (KP = next power of two >= k) kept as an unordered set: slots < k hold
distinct "missing" keys at first (0x7fffffff_ffffffff - slot, above every real key), slots
>= k hold -1 and are never touched. Per database tile:

    n = max over the block's queries of #{tile keys < that query's current worst key}
    repeat min(n, k) times: c = row-wise min of the tile (then removed from it); where
        c < worst, c replaces the worst key (the row-wise max of the set)

so a tile that cannot improve any query costs one comparison pass, and candidates are taken
smallest first (after k extractions nothing left in the tile can enter a top-k). Typical
data improves few queries per tile after the first ones; the worst case (a database in
descending distance order) costs k extraction passes per tile. At the end k
min-extractions write the set in ascending order. Only reductions (tl.min / tl.max / tl.sum),
tl.where and tl.dot are used: tl.sort / tl.topk / tl.flip rely on xor_sum, whose generic
reduction the interpreter (TRITON_INTERPRET=1, how CI runs these kernels) evaluates element
by element in Python, far too slowly for these tiles.

Nothing here synchronises with the device: offsets arrive on the CPU and the schedule is
copied to the device once per call. Local indices must fit 31 bits (group database sizes
below 2^31 rows).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ssld_kernels._backends import triton_interpret

__all__ = ["knn_ragged"]

MAX_K = 64
MAX_U8_DIM = 33025  # dim * 255^2 < 2^31: uint8 distances are exact in int32
_MAX_GROUP_ROWS = (1 << 31) - 1  # local indices live in the low 32 bits of a key

# int64 key of a missing neighbour (distinct per slot: MISSING - slot); dist bits 0x7fffffff
# are above every real distance (uint8 < 0x7fff7e02, float32 <= 0x7f800001).
_MISSING = tl.constexpr(0x7FFFFFFFFFFFFFFF)
_NAN_BITS = tl.constexpr(0x7F800001)


# ----------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------
@triton.jit
def _shift_u8(x):
    """uint8 a -> int8 a - 128: the same bits with the top one flipped (no widening)."""
    return (x ^ 0x80).to(tl.int8, bitcast=True)


@triton.jit
def _sum_squares(x):
    """Row sums of squares of an int8 tile, exact in int32 (each square <= 2^14)."""
    x = x.to(tl.int16)
    return tl.sum((x * x).to(tl.int32), axis=1)


@triton.jit
def _u8_tile_dist(
    q_rows,
    row_ok,
    db_ptr,
    db_stride,
    cols,
    col_ok,
    a_norm,
    dim,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Exact int32 distances (BLOCK_M, BLOCK_N): |a'|^2 + |b'|^2 - 2 a'.b', x' = x - 128."""
    offs_k = tl.arange(0, BLOCK_K)
    b_rows = db_ptr + cols[:, None] * db_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    b_norm = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, dim, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < dim
        # padding reads 128 (shifted: 0), so it adds nothing to the dot or the norms
        a = _shift_u8(
            tl.load(q_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=128)
        )
        b = _shift_u8(
            tl.load(b_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=128)
        )
        b_norm += _sum_squares(b)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    return a_norm[:, None] + b_norm[None, :] - 2 * acc


@triton.jit
def _f32_tile_dist(
    q_rows,
    row_ok,
    db_ptr,
    db_stride,
    cols,
    col_ok,
    dim,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """float32 distances (BLOCK_M, BLOCK_N): acc += (a_d - b_d)^2, d ascending."""
    a_ptrs = q_rows
    b_ptrs = db_ptr + cols * db_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, dim):
        a = tl.load(a_ptrs, mask=row_ok, other=0.0)
        b = tl.load(b_ptrs, mask=col_ok, other=0.0)
        diff = a[:, None] - b[None, :]
        acc = tl.fma(diff, diff, acc)
        a_ptrs += 1
        b_ptrs += 1
    return acc


@triton.jit
def _knn_kernel(
    q_ptr,
    q_stride,
    db_ptr,
    db_stride,
    sched_ptr,
    out_dist_ptr,
    out_idx_ptr,
    dim,
    k,
    IS_U8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    KP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    q0 = tl.load(sched_ptr + pid * 4 + 0)
    q1 = tl.load(sched_ptr + pid * 4 + 1)
    db0 = tl.load(sched_ptr + pid * 4 + 2)
    db1 = tl.load(sched_ptr + pid * 4 + 3)

    rows = q0 + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < q1
    q_rows = q_ptr + rows * q_stride
    slot = tl.arange(0, KP)
    # running top-k set: distinct missing keys in slots < k, -1 (never the max) beyond
    best = tl.where(slot < k, _MISSING - slot.to(tl.int64), -1)
    best = tl.broadcast_to(best[None, :], (BLOCK_M, KP))

    if IS_U8:
        offs_k = tl.arange(0, BLOCK_K)
        a_norm = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for k0 in range(0, dim, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < dim
            a = tl.load(
                q_rows[:, None] + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=128
            )
            a_norm += _sum_squares(_shift_u8(a))

    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    for n0 in range(db0, db1, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < db1
        if IS_U8:
            dist_bits = _u8_tile_dist(
                q_rows[:, None],
                row_ok,
                db_ptr,
                db_stride,
                cols,
                col_ok,
                a_norm,
                dim,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
            )
        else:
            acc = _f32_tile_dist(
                q_rows, row_ok, db_ptr, db_stride, cols, col_ok, dim, BLOCK_M, BLOCK_N
            )
            dist_bits = acc.to(tl.int32, bitcast=True) & 0x7FFFFFFF
            dist_bits = tl.minimum(dist_bits, _NAN_BITS)
        keys = (dist_bits.to(tl.int64) << 32) | (cols - db0)[None, :]
        keys = tl.where(row_ok[:, None] & col_ok[None, :], keys, _MISSING)

        # merge: the tile's candidates, smallest first, replace each query's worst key
        worst = tl.max(best, axis=1)
        n_better = tl.max(tl.sum((keys < worst[:, None]).to(tl.int32), axis=1), axis=0)
        for _ in range(0, tl.minimum(n_better, k)):
            c = tl.min(keys, axis=1)
            keys = tl.where(keys == c[:, None], _MISSING, keys)
            replace = (best == worst[:, None]) & (c < worst)[:, None]
            best = tl.where(replace, c[:, None], best)
            worst = tl.max(best, axis=1)

    # ascending order by k min-extractions, then decode
    best = tl.where(slot[None, :] < k, best, _MISSING)
    ordered = tl.full((BLOCK_M, KP), _MISSING, dtype=tl.int64)
    for j in range(0, k):
        m = tl.min(best, axis=1)
        best = tl.where(best == m[:, None], _MISSING, best)
        ordered = tl.where(slot[None, :] == j, m[:, None], ordered)
    bits = (ordered >> 32).to(tl.int32)
    missing = bits == 0x7FFFFFFF
    index = tl.where(missing, -1, ordered - (bits.to(tl.int64) << 32))
    if IS_U8:
        dist = bits.to(tl.float32)
    else:
        dist = tl.where(bits == _NAN_BITS, float("nan"), bits.to(tl.float32, bitcast=True))
    dist = tl.where(missing, float("inf"), dist)
    out_offs = rows[:, None] * k + slot[None, :]
    out_mask = row_ok[:, None] & (slot < k)[None, :]
    tl.store(out_dist_ptr + out_offs, dist, mask=out_mask)
    tl.store(out_idx_ptr + out_offs, index, mask=out_mask)


# ----------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------
# Larger tiles under the interpreter (see _block_config). tests/conftest.py turns this off
# while bench/triton_aot.py records launches, so that the GPU's tiles are the ones compiled.
INTERPRETER_TILES = True


def _block_config(dim: int, is_u8: bool, aligned: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps).

    GPU: 64 x 64 tiles over 8 warps. uint8: int8 tensor-core dots over K chunks of
    next_pow2(D) clamped to [32, 128] when D and the rows are 16-byte aligned (vector loads),
    else 32: unaligned rows load byte by byte and a wide chunk would hold too many addresses.
    (Checked by compiling for sm_80 / sm_90 with ptxas, not timed: no spills for k <= 64.)
    float32: 64 x 64 FMAs per dimension (BLOCK_K unused).
    Interpreter: the cost is per operation, not per element, so tiles are larger (fewer
    loop trips)."""
    block_k = min(128, max(32, triton.next_power_of_2(dim))) if is_u8 and aligned else 32
    if triton_interpret() and INTERPRETER_TILES:
        return 128, 256, max(block_k, min(256, triton.next_power_of_2(dim))), 4
    return 64, 64, block_k, 8


def _schedule(q_off: torch.Tensor, db_off: torch.Tensor, block_m: int) -> torch.Tensor:
    """(n_programs, 4) int64 rows (q_start, q_end, db_start, db_end), built on the CPU.

    One row per block of up to ``block_m`` queries of a group (groups without queries get
    none, groups without database rows still get theirs: they write +inf / -1). Programs are
    ordered by decreasing database size so the longest ones start first."""
    nq = q_off[1:] - q_off[:-1]
    tiles = (nq + block_m - 1) // block_m
    group = torch.repeat_interleave(torch.arange(nq.numel()), tiles)
    first = torch.cumsum(tiles, 0) - tiles
    t = torch.arange(group.numel()) - first[group]
    q0 = q_off[group] + t * block_m
    sched = torch.stack([q0, q_off[group + 1], db_off[group], db_off[group + 1]], dim=1)
    order = torch.argsort(sched[:, 2] - sched[:, 3], stable=True)
    return sched[order].contiguous()


def _check_offsets(name: str, off, n_total: int) -> None:
    if not isinstance(off, torch.Tensor) or off.dtype != torch.int64 or off.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int64 tensor of group offsets")
    if off.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor (reading it from {off.device} would sync)")
    if off.numel() < 1 or off[0].item() != 0 or off[-1].item() != n_total:
        raise ValueError(
            f"{name} must run from 0 to {n_total} (the packed row count), got "
            f"{off[0].item() if off.numel() else 'nothing'} .. "
            f"{off[-1].item() if off.numel() else 'nothing'}"
        )
    if off.numel() > 1 and bool((off[1:] < off[:-1]).any()):
        raise ValueError(f"{name} must be nondecreasing")


def _device_guard(x: torch.Tensor):
    if x.is_cuda:
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def knn_ragged(
    q: torch.Tensor,
    db: torch.Tensor,
    q_off: torch.Tensor,
    db_off: torch.Tensor,
    k: int,
    *,
    blocks: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dist2 float32 (nq, k), local index int64 (nq, k)) per ragged group (see module doc).

    ``q`` (nq, D) and ``db`` (ndb, D): both uint8 or both float32, on one device (CUDA, or the
    CPU under TRITON_INTERPRET=1), unit stride along D (any row stride). ``q_off`` /
    ``db_off``: int64 CPU tensors of n_groups + 1 offsets into the packed rows. ``blocks``
    overrides ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)`` (powers of two; for tests and tuning).
    """
    if q.dim() != 2 or db.dim() != 2:
        raise ValueError(
            f"q and db must be 2-D (n, D), got shapes {tuple(q.shape)} and {tuple(db.shape)}"
        )
    if q.dtype != db.dtype or q.dtype not in (torch.uint8, torch.float32):
        raise TypeError(
            f"the triton matcher needs q and db both uint8 or both float32, got {q.dtype} "
            f"and {db.dtype}"
        )
    if q.device != db.device:
        raise ValueError(f"q is on {q.device} but db is on {db.device}")
    if q.device.type != "cuda" and not triton_interpret():
        raise RuntimeError(
            f"the triton matcher needs CUDA tensors (got {q.device}; set TRITON_INTERPRET=1 "
            "before importing triton to run it on the CPU)"
        )
    dim = q.shape[1]
    if db.shape[1] != dim:
        raise ValueError(f"descriptor length mismatch: q has D={dim}, db has D={db.shape[1]}")
    if dim < 1:
        raise ValueError("descriptors must have length D >= 1")
    is_u8 = q.dtype == torch.uint8
    if is_u8 and dim > MAX_U8_DIM:
        raise ValueError(
            f"uint8 descriptors need D <= {MAX_U8_DIM} (D * 255^2 < 2^31), got D={dim}"
        )
    if dim > 1 and (q.stride(1) != 1 or db.stride(1) != 1):
        raise ValueError("q and db need a unit stride along the descriptor dimension")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer in [1, {MAX_K}], got {k!r}")
    _check_offsets("q_off", q_off, q.shape[0])
    _check_offsets("db_off", db_off, db.shape[0])
    if q_off.numel() != db_off.numel():
        raise ValueError(
            f"q_off and db_off must have the same length (n_groups + 1), got {q_off.numel()} "
            f"and {db_off.numel()}"
        )
    if db_off.numel() > 1 and int((db_off[1:] - db_off[:-1]).max()) > _MAX_GROUP_ROWS:
        raise ValueError(f"a group's database has more than {_MAX_GROUP_ROWS} rows")

    nq = q.shape[0]
    dist = torch.empty((nq, k), dtype=torch.float32, device=q.device)
    index = torch.empty((nq, k), dtype=torch.int64, device=q.device)
    kp = triton.next_power_of_2(k)
    if blocks is None:
        aligned = dim % 16 == 0 and all(
            x.data_ptr() % 16 == 0 and x.stride(0) % 16 == 0 for x in (q, db)
        )
        blocks = _block_config(dim, is_u8, aligned)
    block_m, block_n, block_k, num_warps = (int(b) for b in blocks)
    if any(b < 1 or b & (b - 1) for b in (block_m, block_n, block_k, num_warps)):
        raise ValueError(f"block sizes and num_warps must be powers of two, got {blocks}")
    sched = _schedule(q_off, db_off, block_m)
    if sched.shape[0] == 0:
        return dist, index
    if q.is_cuda:  # pinned + non_blocking: the copy does not wait for the device
        sched = sched.pin_memory().to(q.device, non_blocking=True)
    with _device_guard(q):
        _knn_kernel[(sched.shape[0],)](
            q,
            q.stride(0),
            db,
            db.stride(0),
            sched,
            dist,
            index,
            dim,
            k,
            IS_U8=is_u8,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            KP=kp,
            num_warps=num_warps,
            # uint8: the K loop has 1-4 trips, nothing to pipeline; staging costs registers
            num_stages=1 if is_u8 else 2,
        )
    return dist, index
