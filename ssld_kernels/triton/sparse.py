"""Fused softmax + divergence loss against a sparse (top-m) teacher, forward and gradient.

The teacher of row r is given by its top-m probabilities ``probs[r]`` at class ids
``index[r]`` (already at the loss temperature); the dense teacher it stands for is, with
S = sum_k probs[r, k] (``ssld_kernels/reference.py``, the executable specification)::

    remainder "uniform", m < C:   rest = max(1 - S, 0),  Z = S + rest,  u = rest / (C - m)
    remainder "ignore" or m == C: rest = 0,              Z = S,         u = 0
    Q[index[k]] = probs[k] / Z,   Q[j] = u for every other class j

so Q sums to 1; the loss (``coef_a*A + coef_b*B`` over the row sums A = sum_j p_j ls_j and
B = sum_j q_j lt_j) and its gradient are the dense ones of ``reference.py`` with q = Q.

The correction trick (a dense B x C teacher is never formed). Pass 2 sums the terms as if the
teacher were u on every class,

    A_u = sum_j p_j ls(p_j, u),   B_u = sum_j u lt(p_j, u),

then the m top classes are corrected with the student logits gathered at ``index``:

    A = A_u + sum_k [p_k ls(p_k, Q_k) - p_k ls(p_k, u)],   B likewise with q lt.

A +inf term (mode 0 with u = 0: p log(p / 0), or p = 0 where u > 0) would turn the
subtraction into inf - inf, so each sum carries its +inf terms as a count: pass 2 counts
them, the correction removes the top classes' u-terms from the count and adds their true
ones, and A (B) is +inf exactly when the count stays positive. That keeps m == C, probs
summing to exactly 1 and -inf student logits exact.

Gradient: the dense closed form of ``reference.py`` with q = Q. Pass 3 writes it with q_j = u
on every class, a barrier orders those stores before the m top entries are rewritten with
q = Q_k (a scatter by the same program), so each gradient element is written at most twice
and read never.

Device-side guard (no host sync): a row with an index outside [0, C), a repeated index, a
negative or NaN probability, or S > 1 + sum_tol gets u = Z = NaN, hence a NaN loss and a NaN
gradient; out-of-range indices are never dereferenced. Masked rows read neither the student
nor the teacher and give exactly 0 loss and 0 gradient.

Kernels: one program per row; classes in chunks of BLOCK, top entries in chunks of M_BLOCK.
All accumulation is float32; student logits and probs may be float32 / float16 / bfloat16,
index int32 / int64, any row strides (unit stride along the last dimension).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssld_kernels._abi import SPARSE_STATS_WIDTH  # floats saved per row for the backward
from ssld_kernels.triton.divergence import (
    _block_config,
    _device_guard,
    _kernel_mode,
    _load_logits,
    _log_ratios,
    _row_scale,
    _store_row_loss,
)

__all__ = ["sparse_divergence_forward", "sparse_divergence_backward"]

# Largest chunk of top entries a program holds at once (the duplicate check compares
# M_BLOCK x M_BLOCK index pairs per step).
MAX_M_BLOCK = 64


@triton.jit
def _teacher_consts(
    probs_row,
    idx_row,
    m,
    m_load,
    n_cols,
    sum_tol,
    UNIFORM: tl.constexpr,
    M_BLOCK: tl.constexpr,
):
    """(u, Z) of one row; both NaN for an invalid row. Reads m_load (0 when masked) entries."""
    k = tl.arange(0, M_BLOCK)
    acc = tl.zeros([M_BLOCK], dtype=tl.float32)
    bad = tl.zeros([M_BLOCK], dtype=tl.int32)
    for start in range(0, m_load, M_BLOCK):
        kk = start + k
        km = kk < m_load
        pt = tl.load(probs_row + kk, mask=km, other=0.0).to(tl.float32)
        idx = tl.load(idx_row + kk, mask=km, other=0).to(tl.int64)
        acc += pt
        wrong = (idx < 0) | (idx >= n_cols) | (tl.where(pt >= 0.0, 0, 1) != 0)
        bad = tl.maximum(bad, (km & wrong).to(tl.int32))
        # repeated ids: every ordered pair (k1 < k2) once, chunk by chunk
        for start2 in range(start, m_load, M_BLOCK):
            kk2 = start2 + k
            km2 = kk2 < m_load
            idx2 = tl.load(idx_row + kk2, mask=km2, other=0).to(tl.int64)
            same = (idx[:, None] == idx2[None, :]) & (kk[:, None] < kk2[None, :])
            same = same & km[:, None] & km2[None, :]
            bad = tl.maximum(bad, tl.max(same.to(tl.int32), axis=1))
    total = tl.sum(acc, axis=0)
    if UNIFORM:
        rest = tl.where(n_cols > m, tl.maximum(1.0 - total, 0.0), 0.0)
    else:
        rest = total * 0.0
    z = total + rest
    u = rest / tl.maximum(n_cols - m, 1).to(tl.float32)
    invalid = (tl.max(bad, axis=0) > 0) | (total > 1.0 + sum_tol)
    u = tl.where(invalid, float("nan"), u)
    z = tl.where(invalid, float("nan"), z)
    return u, z


@triton.jit
def _top_chunk(s_row, probs_row, idx_row, kk, m_load, n_cols, inv_temp, m_s, log_d_s, z):
    """One chunk of top entries: (idx, in-range mask, log p at idx, Q = probs / Z)."""
    km = kk < m_load
    idx = tl.load(idx_row + kk, mask=km, other=0).to(tl.int64)
    gm = km & (idx >= 0) & (idx < n_cols)
    x = tl.load(s_row + idx, mask=gm, other=0.0).to(tl.float32) * inv_temp
    logp = x - m_s - log_d_s
    q = tl.load(probs_row + kk, mask=km, other=0.0).to(tl.float32) / z
    return idx, gm, logp, q


@triton.jit
def _terms(p, logp, q, logq, beta, MODE: tl.constexpr):
    """(p * ls, q * lt) with the p == 0 (q == 0) terms exactly 0."""
    ls, lt = _log_ratios(logp, logq, beta, MODE)
    ta = tl.where(p == 0.0, 0.0, p * ls)
    tb = tl.where(q == 0.0, 0.0, q * lt)
    return ta, tb


@triton.jit
def _split_inf(t):
    """(t with +inf replaced by 0, 1.0 where t was +inf)."""
    is_inf = t == float("inf")
    return tl.where(is_inf, 0.0, t), tl.where(is_inf, 1.0, 0.0)


@triton.jit
def _grad_s(p, ls, q, a, g, coef_a, coef_b, MODE: tl.constexpr):
    gs = tl.where(coef_a == 0.0, 0.0, coef_a * tl.where(p == 0.0, 0.0, p * (ls - a)))
    if MODE == 0:
        gs = gs + coef_b * (p - q)
    return g * gs


@triton.jit
def _sparse_grad_pass(
    s_row,
    probs_row,
    idx_row,
    grad_row,
    n_cols,
    n_load,
    m_load,
    keep,
    inv_temp,
    m_s,
    log_d_s,
    a,
    g,
    u,
    z,
    beta,
    coef_a,
    coef_b,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    M_BLOCK: tl.constexpr,
):
    """dL/ds of one row: every class with q = u, then the top classes rewritten with q = Q."""
    log_u = tl.log(u)
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        logp = _load_logits(s_row, cols, n_cols, n_load, inv_temp) - m_s - log_d_s
        p = tl.exp(logp)
        ls, _ = _log_ratios(logp, log_u, beta, MODE)
        gs = tl.where(keep, _grad_s(p, ls, u, a, g, coef_a, coef_b, MODE), 0.0)
        tl.store(grad_row + cols, gs.to(grad_row.dtype.element_ty), mask=cols < n_cols)
    # the scatter below may rewrite elements another thread of this program stored above
    tl.debug_barrier()
    k = tl.arange(0, M_BLOCK)
    for start in range(0, m_load, M_BLOCK):
        idx, gm, logp, q = _top_chunk(
            s_row, probs_row, idx_row, start + k, m_load, n_cols, inv_temp, m_s, log_d_s, z
        )
        p = tl.exp(logp)
        ls, _ = _log_ratios(logp, tl.log(q), beta, MODE)
        gs = _grad_s(p, ls, q, a, g, coef_a, coef_b, MODE)
        tl.store(grad_row + idx, gs.to(grad_row.dtype.element_ty), mask=gm)


@triton.jit
def _row_setup(mask_ptr, row, n_cols, m, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
        n_load = tl.where(keep, n_cols, 0)
        m_load = tl.where(keep, m, 0)
    else:
        keep = True
        n_load = n_cols
        m_load = m
    return keep, n_load, m_load


# ----------------------------------------------------------------------------------------
# Forward (+ fused gradient)
# ----------------------------------------------------------------------------------------
# Row r: (u, Z) from the m probabilities; pass 1 online log-sum-exp of s / T; pass 2 the
# u-sums A_u, B_u with their +inf counts; the top correction (gather of m student logits);
# row_loss = T^2 (coef_a A + coef_b B) weight[r]; stats[r] = (max_s, log_sum_s, A, B);
# with WRITE_GRAD pass 3 + scatter (``_sparse_grad_pass``).
@triton.jit
def _sparse_fwd_kernel(
    s_ptr,
    s_stride,
    probs_ptr,
    probs_stride,
    idx_ptr,
    idx_stride,
    weight_ptr,
    mask_ptr,
    grad_rows_ptr,
    grad_rows_stride,
    loss_ptr,
    stats_ptr,
    grad_s_ptr,
    n_cols,
    m,
    beta,
    coef_a,
    coef_b,
    inv_temp,
    loss_scale,
    grad_scale,
    sum_tol,
    MODE: tl.constexpr,
    UNIFORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    M_BLOCK: tl.constexpr,
    STATS_WIDTH: tl.constexpr = SPARSE_STATS_WIDTH,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    probs_row = probs_ptr + row * probs_stride
    idx_row = idx_ptr + row * idx_stride
    keep, n_load, m_load = _row_setup(mask_ptr, row, n_cols, m, HAS_MASK)
    u, z = _teacher_consts(probs_row, idx_row, m, m_load, n_cols, sum_tol, UNIFORM, M_BLOCK)
    log_u = tl.log(u)
    offs = tl.arange(0, BLOCK)

    # pass 1: log-sum-exp of the student row
    m_s = float("-inf")
    d_s = 0.0
    for start in range(0, n_cols, BLOCK):
        xs = _load_logits(s_row, start + offs, n_cols, n_load, inv_temp)
        new_m_s = tl.maximum(m_s, tl.max(xs, axis=0))
        shift_s = tl.where(new_m_s == float("-inf"), 0.0, new_m_s)
        d_s = d_s * tl.exp(m_s - shift_s) + tl.sum(tl.exp(xs - shift_s), axis=0)
        m_s = new_m_s
    log_d_s = tl.log(d_s)

    # pass 2: the sums with q = u on every class (finite parts and +inf counts). The finite
    # parts are summed in float64: the u-terms of the top classes are O(1) and cancel against
    # the correction below, which in float32 would leave an absolute error ~1e-7 * |log u|
    # (large relative to the loss of a nearly converged student). The terms stay float32
    # and are bit-identical in both places, so only the small ones survive the subtraction.
    acc_a = tl.zeros([1], dtype=tl.float64)
    acc_b = tl.zeros([1], dtype=tl.float64)
    inf_a = tl.zeros([BLOCK], dtype=tl.float32)
    inf_b = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        logp = _load_logits(s_row, cols, n_cols, n_load, inv_temp) - m_s - log_d_s
        p = tl.exp(logp)
        ta, tb = _terms(p, logp, u, log_u, beta, MODE)
        fa, ia = _split_inf(ta)
        fb, ib = _split_inf(tl.where(cols < n_cols, tb, 0.0))
        acc_a += tl.sum(fa.to(tl.float64), axis=0)
        inf_a += ia
        acc_b += tl.sum(fb.to(tl.float64), axis=0)
        inf_b += ib

    # top correction: - u-terms + true terms at the m gathered classes
    k = tl.arange(0, M_BLOCK)
    top_a = tl.zeros([M_BLOCK], dtype=tl.float64)
    top_b = tl.zeros([M_BLOCK], dtype=tl.float64)
    tinf_a = tl.zeros([M_BLOCK], dtype=tl.float32)
    tinf_b = tl.zeros([M_BLOCK], dtype=tl.float32)
    for start in range(0, m_load, M_BLOCK):
        _, gm, logp, q = _top_chunk(
            s_row, probs_row, idx_row, start + k, m_load, n_cols, inv_temp, m_s, log_d_s, z
        )
        p = tl.exp(logp)
        ua, ub = _terms(p, logp, u, log_u, beta, MODE)
        ta, tb = _terms(p, logp, q, tl.log(q), beta, MODE)
        fua, iua = _split_inf(ua)
        fub, iub = _split_inf(ub)
        fta, ita = _split_inf(ta)
        ftb, itb = _split_inf(tb)
        top_a += tl.where(gm, fta.to(tl.float64) - fua.to(tl.float64), 0.0)
        top_b += tl.where(gm, ftb.to(tl.float64) - fub.to(tl.float64), 0.0)
        tinf_a += tl.where(gm, ita - iua, 0.0)
        tinf_b += tl.where(gm, itb - iub, 0.0)
    a = (tl.sum(acc_a, axis=0) + tl.sum(top_a, axis=0)).to(tl.float32)
    b = (tl.sum(acc_b, axis=0) + tl.sum(top_b, axis=0)).to(tl.float32)
    a = tl.where(tl.sum(inf_a, axis=0) + tl.sum(tinf_a, axis=0) > 0.5, float("inf"), a)
    b = tl.where(tl.sum(inf_b, axis=0) + tl.sum(tinf_b, axis=0) > 0.5, float("inf"), b)

    _store_row_loss(loss_ptr, weight_ptr, row, keep, a, b, coef_a, coef_b, loss_scale, HAS_WEIGHT)
    stats_row = stats_ptr + row * STATS_WIDTH
    tl.store(stats_row + 0, m_s)
    tl.store(stats_row + 1, log_d_s)
    tl.store(stats_row + 2, a)
    tl.store(stats_row + 3, b)

    if WRITE_GRAD:
        g = _row_scale(
            row, keep, weight_ptr, grad_rows_ptr, grad_rows_stride, grad_scale, HAS_WEIGHT
        )
        _sparse_grad_pass(
            s_row,
            probs_row,
            idx_row,
            grad_s_ptr + row * n_cols,
            n_cols,
            n_load,
            m_load,
            keep,
            inv_temp,
            m_s,
            log_d_s,
            a,
            g,
            u,
            z,
            beta,
            coef_a,
            coef_b,
            MODE,
            BLOCK,
            M_BLOCK,
        )


# ----------------------------------------------------------------------------------------
# Backward: (u, Z) recomputed from the m probabilities (the same instructions as the
# forward, so the same values), (max_s, log_sum_s, A) from stats, then pass 3 + scatter.
# ----------------------------------------------------------------------------------------
@triton.jit
def _sparse_bwd_kernel(
    s_ptr,
    s_stride,
    probs_ptr,
    probs_stride,
    idx_ptr,
    idx_stride,
    weight_ptr,
    mask_ptr,
    grad_rows_ptr,
    grad_rows_stride,
    stats_ptr,
    grad_s_ptr,
    n_cols,
    m,
    beta,
    coef_a,
    coef_b,
    inv_temp,
    grad_scale,
    sum_tol,
    MODE: tl.constexpr,
    UNIFORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
    M_BLOCK: tl.constexpr,
    STATS_WIDTH: tl.constexpr = SPARSE_STATS_WIDTH,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    probs_row = probs_ptr + row * probs_stride
    idx_row = idx_ptr + row * idx_stride
    keep, n_load, m_load = _row_setup(mask_ptr, row, n_cols, m, HAS_MASK)
    u, z = _teacher_consts(probs_row, idx_row, m, m_load, n_cols, sum_tol, UNIFORM, M_BLOCK)
    stats_row = stats_ptr + row * STATS_WIDTH
    m_s = tl.load(stats_row + 0)
    log_d_s = tl.load(stats_row + 1)
    a = tl.load(stats_row + 2)
    g = _row_scale(row, keep, weight_ptr, grad_rows_ptr, grad_rows_stride, grad_scale, HAS_WEIGHT)
    _sparse_grad_pass(
        s_row,
        probs_row,
        idx_row,
        grad_s_ptr + row * n_cols,
        n_cols,
        n_load,
        m_load,
        keep,
        inv_temp,
        m_s,
        log_d_s,
        a,
        g,
        u,
        z,
        beta,
        coef_a,
        coef_b,
        MODE,
        BLOCK,
        M_BLOCK,
    )


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
def _m_block(m: int) -> int:
    return min(max(triton.next_power_of_2(max(m, 1)), 16), MAX_M_BLOCK)


def _check(s: torch.Tensor, probs: torch.Tensor, index: torch.Tensor) -> None:
    if s.dim() != 2 or probs.dim() != 2 or index.dim() != 2:
        raise ValueError(
            f"student logits, probs and index must be 2-D, got {tuple(s.shape)}, "
            f"{tuple(probs.shape)} and {tuple(index.shape)}"
        )
    if probs.shape != index.shape or probs.shape[0] != s.shape[0]:
        raise ValueError(
            f"probs {tuple(probs.shape)} and index {tuple(index.shape)} must be "
            f"({s.shape[0]}, m) for student logits {tuple(s.shape)}"
        )
    for name, x in (("student logits", s), ("probs", probs), ("index", index)):
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} need a unit stride along the last dimension")


def _common(s, probs, index, weight, mask, spec, uniform, sum_tol):
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    n, n_cols = s.shape
    m = probs.shape[1]
    block, num_warps = _block_config(n_cols)
    temperature = 1.0 / float(spec.inv_temp)
    args = (s, s.stride(0), probs, probs.stride(0), index, index.stride(0), weight, mask)
    scalars = (
        float(spec.beta),
        float(spec.coef_a),
        float(spec.coef_b),
        float(spec.inv_temp),
    )
    meta = dict(
        MODE=_kernel_mode(spec),
        UNIFORM=bool(uniform),
        HAS_WEIGHT=weight is not None,
        HAS_MASK=mask is not None,
        BLOCK=block,
        M_BLOCK=_m_block(m),
        num_warps=num_warps,
    )
    return n, n_cols, m, temperature, args, scalars, float(sum_tol), meta


def sparse_divergence_forward(
    s, probs, index, weight, mask, spec, uniform, sum_tol, grad_rows=None, need_grad_s=False
):
    """-> (row_loss[n] float32, stats[n, 4] float32 = (max_s, log_sum_s, A, B), grad_s or None)

    ``s``: (n, C) student logits; ``probs``, ``index``: (n, m) top-m teacher probabilities
    (float32 / float16 / bfloat16) and class ids (int32 / int64); unit stride along the last
    dimension, any row stride. ``weight``: None or float32 (n,); ``mask``: None or bool /
    uint8 (n,). ``uniform``: spread 1 - sum(probs) over the other classes (else renormalise).
    With ``need_grad_s`` the gradient of sum_r grad_rows[r] * row_loss[r] comes from the same
    launch (``grad_rows``: float32, n elements, any stride).
    """
    _check(s, probs, index)
    if need_grad_s and grad_rows is None:
        raise ValueError("gradients need grad_rows")
    n, n_cols, m, temperature, args, scalars, tol, meta = _common(
        s, probs, index, weight, mask, spec, uniform, sum_tol
    )
    row_loss = torch.empty(n, dtype=torch.float32, device=s.device)
    stats = torch.empty((n, SPARSE_STATS_WIDTH), dtype=torch.float32, device=s.device)
    grad_s = torch.empty((n, n_cols), dtype=s.dtype, device=s.device) if need_grad_s else None
    if n == 0:
        return row_loss, stats, grad_s
    if not need_grad_s:
        grad_rows = None
    grad_rows_stride = 0 if grad_rows is None else grad_rows.stride(0)
    with _device_guard(s):
        _sparse_fwd_kernel[(n,)](
            *args,
            grad_rows,
            grad_rows_stride,
            row_loss,
            stats,
            grad_s,
            n_cols,
            m,
            *scalars,
            temperature * temperature,
            temperature,
            tol,
            WRITE_GRAD=bool(need_grad_s),
            **meta,
        )
    return row_loss, stats, grad_s


def sparse_divergence_backward(
    s, probs, index, weight, mask, stats, grad_rows, spec, uniform, sum_tol
):
    """-> grad_s: the gradient of sum_r grad_rows[r] * row_loss[r] from the forward's
    ``stats``, one launch and one pass over each row."""
    _check(s, probs, index)
    n, n_cols, m, temperature, args, scalars, tol, meta = _common(
        s, probs, index, weight, mask, spec, uniform, sum_tol
    )
    grad_s = torch.empty((n, n_cols), dtype=s.dtype, device=s.device)
    if n == 0:
        return grad_s
    if stats.shape != (n, SPARSE_STATS_WIDTH) or not stats.is_contiguous():
        raise ValueError(
            f"stats must be a contiguous ({n}, {SPARSE_STATS_WIDTH}) tensor, got {tuple(stats.shape)}"
        )
    with _device_guard(s):
        _sparse_bwd_kernel[(n,)](
            *args,
            grad_rows,
            grad_rows.stride(0),
            stats,
            grad_s,
            n_cols,
            m,
            *scalars,
            temperature,
            tol,
            **meta,
        )
    return grad_s
