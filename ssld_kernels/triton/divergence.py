"""Fused softmax + divergence loss from logits, forward and backward, in Triton.

The math is ``ssld_kernels/reference.py``, the executable specification: its docstring states
the loss (``coef_a*A + coef_b*B`` over the row sums A and B, mode 0 the KL family, mode 1 the
JSD mixture), the closed-form gradients and the stable log M these kernels use; the
parameters are the terms of ``DivParams`` in ``csrc/common.h``.

Kernels: one program per row, looping over the classes in chunks of ``BLOCK``:

* ``_divergence_fwd_kernel``: pass 1 online max / sum-exp of s and t (log-sum-exp),
  pass 2 the sums A and B, and, when gradients are requested (the fused path), pass 3
  writes dL/ds and/or dL/dt. Saves ``stats[r] = (max_s, log_sum_s, max_t, log_sum_t, A, B)``.
* ``_divergence_bwd_kernel``: one pass that rebuilds p and q from the saved stats.

All accumulation is float32; the logits may be float32 / float16 / bfloat16 independently,
with any row stride (last-dim stride 1). Nothing here synchronises with the host.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ssld_kernels._abi import STATS_WIDTH  # floats saved per row for the backward

__all__ = ["divergence_forward", "divergence_backward", "row_fits_one_chunk"]

# Largest chunk of classes a program holds at once (4096 lanes over 8 warps: 16 elements
# per thread per live vector). Longer rows loop over chunks.
MAX_BLOCK = 4096


# ----------------------------------------------------------------------------------------
# Elementwise helpers
# ----------------------------------------------------------------------------------------
# tl.math has no expm1 / log1p, and libdevice (tl.extra) is not available under
# TRITON_INTERPRET=1, so both are written out here, accurate to a few float32 ulps:
#   expm1(x): degree-8 Taylor polynomial for |x| < 0.5 (truncation < 1e-8 relative),
#             exp(x) - 1 otherwise (no cancellation there: |expm1(x)| >= 0.39).
#   log1p(y): for -0.5 < y < 1, log1p(y) = 2 atanh(r) with r = y / (2 + y), |r| < 1/3,
#             as an odd series through r^15 (truncation < 4e-9 relative);
#             otherwise log(1 + y), where 1 + y is exact (y <= -0.5) or |log| >= log 2.
# Both select with tl.where, so every input takes the same instructions (no divergence).
@triton.jit
def _expm1(x):
    # Horner form of x + x^2/2! + ... + x^8/8!
    poly = 1.0 / 40320.0
    poly = poly * x + 1.0 / 5040.0
    poly = poly * x + 1.0 / 720.0
    poly = poly * x + 1.0 / 120.0
    poly = poly * x + 1.0 / 24.0
    poly = poly * x + 1.0 / 6.0
    poly = poly * x + 1.0 / 2.0
    poly = poly * x + 1.0
    return tl.where(tl.abs(x) < 0.5, x * poly, tl.exp(x) - 1.0)


@triton.jit
def _log1p(y, SERIES_ONLY: tl.constexpr = False):
    # 2 atanh(r) = 2 (r + r^3/3 + ... + r^15/15), r = y / (2 + y)
    r = y / (2.0 + y)
    r2 = r * r
    poly = 1.0 / 15.0
    poly = poly * r2 + 1.0 / 13.0
    poly = poly * r2 + 1.0 / 11.0
    poly = poly * r2 + 1.0 / 9.0
    poly = poly * r2 + 1.0 / 7.0
    poly = poly * r2 + 1.0 / 5.0
    poly = poly * r2 + 1.0 / 3.0
    poly = poly * r2 + 1.0
    series = (2.0 * r) * poly
    if SERIES_ONLY:  # the caller guarantees -0.5 < y < 1
        return series
    # Outside the series range u = 1 + y is exact (y <= -0.5) or its rounding moves
    # log(u) >= log 2 by at most 2^-24 relative, so no rounding correction is needed.
    large = tl.log(1.0 + y)
    return tl.where((y > -0.5) & (y < 1.0), series, large)


@triton.jit
def _log_ratios(logp, logq, beta, MODE: tl.constexpr):
    """(ls, lt) = (log p - log X, log q - log Y), elementwise."""
    if MODE == 0:
        ls = logp - logq
        lt = -ls
    else:
        # log M - log p = z + max(d, 0), log M - log q = z - min(d, 0)
        d = logq - logp
        if MODE == 2:  # beta = 0.5: w * expm1(-|d|) lies in (-0.5, 0], the series' range
            z = _log1p(0.5 * _expm1(-tl.abs(d)), True)
        else:
            w = tl.where(d <= 0.0, beta, 1.0 - beta)
            z = _log1p(w * _expm1(-tl.abs(d)))
        ls = -(z + tl.maximum(d, 0.0))
        lt = -(z - tl.minimum(d, 0.0))
    return ls, lt


@triton.jit
def _load_logits(row_ptr, cols, n_cols, n_load, inv_temp):
    """Temperature-scaled float32 logits of one chunk; -inf past the row end.

    Only the first ``n_load`` classes are read: n_load = 0 for masked rows, which then see
    all-zero logits (uniform P and Q: zero loss and finite intermediates, whatever their
    memory holds)."""
    x = tl.load(row_ptr + cols, mask=cols < n_load, other=0.0)
    return tl.where(cols < n_cols, x.to(tl.float32) * inv_temp, float("-inf"))


@triton.jit
def _row_grads(p, q, ls, lt, a, b, g, coef_a, coef_b, MODE: tl.constexpr):
    """(dL/ds, dL/dt) of one chunk; the p == 0 (q == 0) terms are exactly 0."""
    # a term with a zero coefficient is skipped: an infinite A or B must not give 0 * inf
    gs = tl.where(coef_a == 0.0, 0.0, coef_a * tl.where(p == 0.0, 0.0, p * (ls - a)))
    gt = tl.where(coef_b == 0.0, 0.0, coef_b * tl.where(q == 0.0, 0.0, q * (lt - b)))
    if MODE == 0:
        gs = gs + coef_b * (p - q)
        gt = gt + coef_a * (q - p)
    return g * gs, g * gt


@triton.jit
def _row_scale(
    row, keep, weight_ptr, grad_rows_ptr, grad_rows_stride, grad_scale, HAS_WEIGHT: tl.constexpr
):
    """g = grad_scale * grad_rows[row] * weight[row], 0 for masked rows."""
    g = tl.load(grad_rows_ptr + row * grad_rows_stride).to(tl.float32) * grad_scale
    if HAS_WEIGHT:
        g = g * tl.load(weight_ptr + row).to(tl.float32)
    return tl.where(keep, g, 0.0)


@triton.jit
def _store_row_loss(
    loss_ptr, weight_ptr, row, keep, a, b, coef_a, coef_b, loss_scale, HAS_WEIGHT: tl.constexpr
):
    """row_loss[row] = loss_scale * (coef_a A + coef_b B) * weight[row], 0 for masked rows."""
    loss_a = tl.where(coef_a == 0.0, 0.0, coef_a * a)  # 0 * inf stays 0
    loss_b = tl.where(coef_b == 0.0, 0.0, coef_b * b)
    loss = loss_scale * (loss_a + loss_b)
    if HAS_WEIGHT:
        loss = loss * tl.load(weight_ptr + row).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(keep, loss, 0.0))


@triton.jit
def _store_grads(
    grad_s_ptr,
    grad_t_ptr,
    row,
    n_cols,
    cols,
    keep,
    gs,
    gt,
    WRITE_GRAD_S: tl.constexpr,
    WRITE_GRAD_T: tl.constexpr,
):
    """Store the wanted gradients of a chunk of a contiguous (n, C) output; exact zeros on
    masked rows (keep False)."""
    in_row = cols < n_cols
    if WRITE_GRAD_S:
        out = grad_s_ptr + row * n_cols + cols
        tl.store(out, tl.where(keep, gs, 0.0).to(grad_s_ptr.dtype.element_ty), mask=in_row)
    if WRITE_GRAD_T:
        out = grad_t_ptr + row * n_cols + cols
        tl.store(out, tl.where(keep, gt, 0.0).to(grad_t_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _grad_pass(
    s_row,
    t_row,
    grad_s_ptr,
    grad_t_ptr,
    row,
    n_cols,
    n_load,
    keep,
    inv_temp,
    m_s,
    log_d_s,
    m_t,
    log_d_t,
    a,
    b,
    g,
    beta,
    coef_a,
    coef_b,
    MODE: tl.constexpr,
    WRITE_GRAD_S: tl.constexpr,
    WRITE_GRAD_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One pass over a row writing dL/ds and/or dL/dt from its statistics (shared by the
    fused forward's pass 3 and the backward); masked rows (keep False) write exact zeros."""
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        logp = _load_logits(s_row, cols, n_cols, n_load, inv_temp) - m_s - log_d_s
        logq = _load_logits(t_row, cols, n_cols, n_load, inv_temp) - m_t - log_d_t
        p = tl.exp(logp)
        q = tl.exp(logq)
        ls, lt = _log_ratios(logp, logq, beta, MODE)
        gs, gt = _row_grads(p, q, ls, lt, a, b, g, coef_a, coef_b, MODE)
        _store_grads(grad_s_ptr, grad_t_ptr, row, n_cols, cols, keep, gs, gt, WRITE_GRAD_S,
                     WRITE_GRAD_T)  # fmt: skip


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------
# For row r (x_s = s[r] / T, x_t = t[r] / T, classes j < C):
#   pass 1: lse_s = log sum_j exp(x_s_j), lse_t = log sum_j exp(x_t_j)
#           online over chunks: m' = max(m, max_j x_j), d' = d exp(m - m') + sum_j exp(x_j - m')
#           (with m' = -inf treated as 0, so fully -inf chunks add 0 instead of NaN)
#   pass 2: log p = (x_s - m_s) - log d_s, log q likewise,  (ls, lt) as in _log_ratios,
#           A = sum_j [p_j != 0] p_j ls_j,  B = sum_j [q_j != 0] q_j lt_j
#           row_loss = T^2 (coef_a A + coef_b B) weight[r],  stats[r] = (max_s, log_sum_s, max_t, log_sum_t, A, B)
#   pass 3 (WRITE_GRAD_S / WRITE_GRAD_T): the closed-form gradients of reference.py with
#           g = T grad_rows[r] weight[r]; masked rows write exact zeros.
# SINGLE (C <= BLOCK): the row is loaded once and every pass works on the registers, the
# gradient from the same p, q, ls, lt as the sums (one read of each logit, one write of each
# gradient). Otherwise pass 2 walks the chunks last to first, so that it starts on the ones
# pass 1 read last (the likeliest still in L2), and pass 3 first to last for the same reason.
# Programs loop over rows (grid <= n_rows): fewer programs than rows bound the rows in
# flight, hence the L2 footprint of the re-reads.
@triton.jit
def _divergence_fwd_kernel(
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    weight_ptr,
    mask_ptr,
    grad_rows_ptr,
    grad_rows_stride,
    loss_ptr,
    stats_ptr,
    grad_s_ptr,
    grad_t_ptr,
    n_rows,
    n_cols,
    beta,
    coef_a,
    coef_b,
    inv_temp,
    loss_scale,
    grad_scale,
    MODE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WRITE_GRAD_S: tl.constexpr,
    WRITE_GRAD_T: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
    STATS_WIDTH: tl.constexpr = STATS_WIDTH,
):
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        s_row = s_ptr + row * s_stride
        t_row = t_ptr + row * t_stride
        offs = tl.arange(0, BLOCK)
        if HAS_MASK:
            keep = tl.load(mask_ptr + row) != 0
            n_load = tl.where(keep, n_cols, 0)
        else:
            keep = True
            n_load = n_cols
        if WRITE_GRAD_S or WRITE_GRAD_T:
            g = _row_scale(
                row, keep, weight_ptr, grad_rows_ptr, grad_rows_stride, grad_scale, HAS_WEIGHT
            )

        if SINGLE:
            # the whole row in registers
            xs = _load_logits(s_row, offs, n_cols, n_load, inv_temp)
            xt = _load_logits(t_row, offs, n_cols, n_load, inv_temp)
            m_s = tl.max(xs, axis=0)
            m_t = tl.max(xt, axis=0)
            d_s = tl.sum(tl.exp(xs - tl.where(m_s == float("-inf"), 0.0, m_s)), axis=0)
            d_t = tl.sum(tl.exp(xt - tl.where(m_t == float("-inf"), 0.0, m_t)), axis=0)
            log_d_s = tl.log(d_s)
            log_d_t = tl.log(d_t)
            logp = xs - m_s - log_d_s
            logq = xt - m_t - log_d_t
            p = tl.exp(logp)
            q = tl.exp(logq)
            ls, lt = _log_ratios(logp, logq, beta, MODE)
            a = tl.sum(tl.where(p == 0.0, 0.0, p * ls), axis=0)
            b = tl.sum(tl.where(q == 0.0, 0.0, q * lt), axis=0)
            if WRITE_GRAD_S or WRITE_GRAD_T:
                gs, gt = _row_grads(p, q, ls, lt, a, b, g, coef_a, coef_b, MODE)
                _store_grads(grad_s_ptr, grad_t_ptr, row, n_cols, offs, keep, gs, gt,
                             WRITE_GRAD_S, WRITE_GRAD_T)  # fmt: skip
        else:
            # pass 1: log-sum-exp of both rows
            m_s = float("-inf")
            d_s = 0.0
            m_t = float("-inf")
            d_t = 0.0
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                xs = _load_logits(s_row, cols, n_cols, n_load, inv_temp)
                xt = _load_logits(t_row, cols, n_cols, n_load, inv_temp)
                new_m_s = tl.maximum(m_s, tl.max(xs, axis=0))
                new_m_t = tl.maximum(m_t, tl.max(xt, axis=0))
                shift_s = tl.where(new_m_s == float("-inf"), 0.0, new_m_s)
                shift_t = tl.where(new_m_t == float("-inf"), 0.0, new_m_t)
                d_s = d_s * tl.exp(m_s - shift_s) + tl.sum(tl.exp(xs - shift_s), axis=0)
                d_t = d_t * tl.exp(m_t - shift_t) + tl.sum(tl.exp(xt - shift_t), axis=0)
                m_s = new_m_s
                m_t = new_m_t
            # log p = (x - m) - log d: folding log d into m first (x - lse) would round it to
            # the ulp of m, which costs relative accuracy on near-one probabilities.
            log_d_s = tl.log(d_s)
            log_d_t = tl.log(d_t)

            # pass 2: A and B, last chunk first
            acc_a = tl.zeros([BLOCK], dtype=tl.float32)
            acc_b = tl.zeros([BLOCK], dtype=tl.float32)
            n_chunks = tl.cdiv(n_cols, BLOCK)
            for i in range(0, n_chunks):
                cols = (n_chunks - 1 - i) * BLOCK + offs
                logp = _load_logits(s_row, cols, n_cols, n_load, inv_temp) - m_s - log_d_s
                logq = _load_logits(t_row, cols, n_cols, n_load, inv_temp) - m_t - log_d_t
                p = tl.exp(logp)
                q = tl.exp(logq)
                ls, lt = _log_ratios(logp, logq, beta, MODE)
                acc_a += tl.where(p == 0.0, 0.0, p * ls)
                acc_b += tl.where(q == 0.0, 0.0, q * lt)
            a = tl.sum(acc_a, axis=0)
            b = tl.sum(acc_b, axis=0)

            # pass 3 (fused path): gradients
            if WRITE_GRAD_S or WRITE_GRAD_T:
                _grad_pass(
                    s_row,
                    t_row,
                    grad_s_ptr,
                    grad_t_ptr,
                    row,
                    n_cols,
                    n_load,
                    keep,
                    inv_temp,
                    m_s,
                    log_d_s,
                    m_t,
                    log_d_t,
                    a,
                    b,
                    g,
                    beta,
                    coef_a,
                    coef_b,
                    MODE,
                    WRITE_GRAD_S,
                    WRITE_GRAD_T,
                    BLOCK,
                )

        _store_row_loss(
            loss_ptr, weight_ptr, row, keep, a, b, coef_a, coef_b, loss_scale, HAS_WEIGHT
        )
        stats_row = stats_ptr + row * STATS_WIDTH
        tl.store(stats_row + 0, m_s)
        tl.store(stats_row + 1, log_d_s)
        tl.store(stats_row + 2, m_t)
        tl.store(stats_row + 3, log_d_t)
        tl.store(stats_row + 4, a)
        tl.store(stats_row + 5, b)


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------
# One pass per row from the saved stats (max_s, log_sum_s, max_t, log_sum_t, A, B):
#   log p = (s / T - max_s) - log_sum_s,  log q likewise,  (ls, lt) as in _log_ratios,
#   dL/ds, dL/dt as in reference.py's docstring with g = T grad_rows[r] weight[r]
#   (grad_rows read on the device, any stride including 0); masked rows write exact zeros
#   and read no logits.
@triton.jit
def _divergence_bwd_kernel(
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    weight_ptr,
    mask_ptr,
    grad_rows_ptr,
    grad_rows_stride,
    stats_ptr,
    grad_s_ptr,
    grad_t_ptr,
    n_rows,
    n_cols,
    beta,
    coef_a,
    coef_b,
    inv_temp,
    grad_scale,
    MODE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WRITE_GRAD_S: tl.constexpr,
    WRITE_GRAD_T: tl.constexpr,
    BLOCK: tl.constexpr,
    STATS_WIDTH: tl.constexpr = STATS_WIDTH,
):
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        if HAS_MASK:
            keep = tl.load(mask_ptr + row) != 0
            n_load = tl.where(keep, n_cols, 0)
        else:
            keep = True
            n_load = n_cols
        stats_row = stats_ptr + row * STATS_WIDTH
        g = _row_scale(
            row, keep, weight_ptr, grad_rows_ptr, grad_rows_stride, grad_scale, HAS_WEIGHT
        )
        _grad_pass(
            s_ptr + row * s_stride,
            t_ptr + row * t_stride,
            grad_s_ptr,
            grad_t_ptr,
            row,
            n_cols,
            n_load,
            keep,
            inv_temp,
            tl.load(stats_row + 0),
            tl.load(stats_row + 1),
            tl.load(stats_row + 2),
            tl.load(stats_row + 3),
            tl.load(stats_row + 4),
            tl.load(stats_row + 5),
            g,
            beta,
            coef_a,
            coef_b,
            MODE,
            WRITE_GRAD_S,
            WRITE_GRAD_T,
            BLOCK,
        )


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
def _block_config(n_cols: int, block: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps): the whole row in one chunk up to MAX_BLOCK classes, and about
    eight fp32 elements per thread (1 warp up to 256 classes, 8 warps from 2048)."""
    if block is None:
        block = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK)
    block = max(int(block), 16)
    if block & (block - 1):
        raise ValueError(f"BLOCK must be a power of two, got {block}")
    num_warps = max(1, min(8, block // 256))
    return block, num_warps


def _kernel_mode(spec) -> int:
    """The kernels' MODE: 0 KL family, 1 JSD, 2 JSD with beta = 0.5 (the paper's; cheaper
    log ratios, see _log_ratios)."""
    return 2 if int(spec.mode) == 1 and float(spec.beta) == 0.5 else int(spec.mode)


def _launch_config(n_rows: int, n_cols: int, config: dict | None) -> tuple[int, int, int]:
    """(BLOCK, num_warps, programs) of a launch: ``config`` (keys ``block``, ``num_warps``,
    ``programs``; any may be missing) over the defaults of :func:`_block_config` and one
    program per row. ``programs`` < n_rows makes each program loop over rows."""
    config = config or {}
    block = config.get("block")
    if block is not None:  # never more than the row needs
        block = min(int(block), max(16, triton.next_power_of_2(max(n_cols, 1))))
    block, num_warps = _block_config(n_cols, block)
    num_warps = int(config.get("num_warps") or num_warps)
    if num_warps < 1 or num_warps & (num_warps - 1) or num_warps > 32:
        raise ValueError(f"num_warps must be a power of two in [1, 32], got {num_warps}")
    programs = config.get("programs")
    programs = n_rows if programs is None else max(1, min(n_rows, int(programs)))
    return block, num_warps, programs


def row_fits_one_chunk(s: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether a fused launch on (n, C) logits holds each row in one chunk (reads it once):
    then computing the gradient in the forward saves the backward's second pass."""
    n, c = s.shape
    return c <= _launch_config(n, c, _config_for(s, t, "fused"))[0]


def _config_for(s: torch.Tensor, t: torch.Tensor, mode: str) -> dict | None:
    from ssld_kernels._tune_table import launch_config

    return launch_config("triton", s, t, mode)


def _device_guard(x: torch.Tensor):
    if x.is_cuda:
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _check_logits(s: torch.Tensor, t: torch.Tensor) -> None:
    if s.dim() != 2 or t.dim() != 2:
        raise ValueError(
            f"logits must be 2-D (rows, classes), got {tuple(s.shape)} and {tuple(t.shape)}"
        )
    if s.shape != t.shape:
        raise ValueError(f"student and teacher shapes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
    if s.shape[1] > 1 and (s.stride(1) != 1 or t.stride(1) != 1):
        raise ValueError("logits need a unit stride along the class dimension")


def _row_args(weight, mask, grad_rows):
    """Kernel arguments for the optional per-row arrays (unused pointers are None)."""
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    grad_rows_stride = 0 if grad_rows is None else grad_rows.stride(0)
    return weight, mask, grad_rows, grad_rows_stride


def _divergence_forward(
    s, t, weight, mask, spec, grad_rows=None, need_grad_s=False, need_grad_t=False, config=None
):
    _check_logits(s, t)
    n, n_cols = s.shape
    if (need_grad_s or need_grad_t) and grad_rows is None:
        raise ValueError("gradients need grad_rows")
    row_loss = torch.empty(n, dtype=torch.float32, device=s.device)
    stats = torch.empty((n, STATS_WIDTH), dtype=torch.float32, device=s.device)
    grad_s = torch.empty((n, n_cols), dtype=s.dtype, device=s.device) if need_grad_s else None
    grad_t = torch.empty((n, n_cols), dtype=t.dtype, device=t.device) if need_grad_t else None
    if n == 0:
        return row_loss, stats, grad_s, grad_t
    weight, mask, grad_rows, grad_rows_stride = _row_args(weight, mask, grad_rows)
    if not (need_grad_s or need_grad_t):
        grad_rows, grad_rows_stride = None, 0
    block, num_warps, programs = _launch_config(n, n_cols, config)
    temperature = 1.0 / float(spec.inv_temp)
    with _device_guard(s):
        _divergence_fwd_kernel[(programs,)](
            s,
            s.stride(0),
            t,
            t.stride(0),
            weight,
            mask,
            grad_rows,
            grad_rows_stride,
            row_loss,
            stats,
            grad_s,
            grad_t,
            n,
            n_cols,
            float(spec.beta),
            float(spec.coef_a),
            float(spec.coef_b),
            float(spec.inv_temp),
            temperature * temperature,
            temperature,
            MODE=_kernel_mode(spec),
            HAS_WEIGHT=weight is not None,
            HAS_MASK=mask is not None,
            WRITE_GRAD_S=bool(need_grad_s),
            WRITE_GRAD_T=bool(need_grad_t),
            BLOCK=block,
            SINGLE=n_cols <= block,
            num_warps=num_warps,
        )
    return row_loss, stats, grad_s, grad_t


def _divergence_backward(
    s, t, weight, mask, stats, grad_rows, spec, need_grad_s=True, need_grad_t=False, config=None
):
    _check_logits(s, t)
    n, n_cols = s.shape
    grad_s = torch.empty((n, n_cols), dtype=s.dtype, device=s.device) if need_grad_s else None
    grad_t = torch.empty((n, n_cols), dtype=t.dtype, device=t.device) if need_grad_t else None
    if n == 0 or not (need_grad_s or need_grad_t):
        return grad_s, grad_t
    if grad_rows is None or stats is None:
        raise ValueError("backward needs stats and grad_rows")
    if stats.shape != (n, STATS_WIDTH) or not stats.is_contiguous():
        raise ValueError(
            f"stats must be a contiguous ({n}, {STATS_WIDTH}) tensor, got {tuple(stats.shape)}"
        )
    weight, mask, grad_rows, grad_rows_stride = _row_args(weight, mask, grad_rows)
    block, num_warps, programs = _launch_config(n, n_cols, config)
    temperature = 1.0 / float(spec.inv_temp)
    with _device_guard(s):
        _divergence_bwd_kernel[(programs,)](
            s,
            s.stride(0),
            t,
            t.stride(0),
            weight,
            mask,
            grad_rows,
            grad_rows_stride,
            stats,
            grad_s,
            grad_t,
            n,
            n_cols,
            float(spec.beta),
            float(spec.coef_a),
            float(spec.coef_b),
            float(spec.inv_temp),
            temperature,
            MODE=_kernel_mode(spec),
            HAS_WEIGHT=weight is not None,
            HAS_MASK=mask is not None,
            WRITE_GRAD_S=bool(need_grad_s),
            WRITE_GRAD_T=bool(need_grad_t),
            BLOCK=block,
            num_warps=num_warps,
        )
    return grad_s, grad_t


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------
def divergence_forward(
    s, t, weight, mask, spec, grad_rows=None, need_grad_s=False, need_grad_t=False
):
    """-> (row_loss[n] float32, stats[n,6] float32 = (max_s, log_sum_s, max_t, log_sum_t, A, B), grad_s or None, grad_t or None)

    ``s``, ``t``: (n, C) logits (float32 / float16 / bfloat16, unit class stride, any row
    stride). ``weight``: None or float32 (n,). ``mask``: None or bool / uint8 (n,).
    With ``need_grad_s`` / ``need_grad_t`` the gradients of sum_r grad_rows[r] * row_loss[r]
    are produced by the same kernel launch (``grad_rows``: float32, n elements, any stride).
    """
    mode = "fused" if need_grad_s or need_grad_t else "fwdbwd"
    config = _config_for(s, t, mode)
    return _divergence_forward(
        s, t, weight, mask, spec, grad_rows, need_grad_s, need_grad_t, config
    )


def divergence_backward(
    s, t, weight, mask, stats, grad_rows, spec, need_grad_s=True, need_grad_t=False
):
    """-> (grad_s or None, grad_t or None)

    Gradients of sum_r grad_rows[r] * row_loss[r] from the ``stats`` saved by
    :func:`divergence_forward`, in one kernel launch and one pass over each row.
    """
    config = _config_for(s, t, "fwdbwd")
    return _divergence_backward(
        s, t, weight, mask, stats, grad_rows, spec, need_grad_s, need_grad_t, config
    )
