"""Plain-PyTorch reference of every ssld_kernels op: the executable specification.

Everything here is readable, differentiable PyTorch. It is the ``torch`` backend and the
oracle the compiled backends are tested against (run it on float64 inputs for that).

Softmax divergence (class dimension last, every leading dimension is a row)::

    P = softmax(student / T)        Q = softmax(teacher / T)
    kind="jsd", 0 < beta < 1:  M = beta*Q + (1-beta)*P
                               loss = beta*KL(Q||M) + (1-beta)*KL(P||M)
    kind="jsd", beta == 0:     loss = KL(Q||P)          (TRL's generalized_jsd_loss limits)
    kind="jsd", beta == 1:     loss = KL(P||Q)
    kind="sym_kl":             loss = 0.5*(KL(Q||P) + KL(P||Q))
    kind="kl":                 loss = KL(Q||P)          (Hinton's KD term)
    every kind is multiplied by T**2, then by weight[row]; rows with mask False give 0.

All kinds are written through two row sums,

    A = sum_j p_j (log p_j - log X_j)      B = sum_j q_j (log q_j - log Y_j)

with X = Y = M for the JSD mixture (mode 1) and X = Q, Y = P for the KL family (mode 0), so
``loss = coef_a*A + coef_b*B``. The closed-form gradients (with ls = log p - log X,
lt = log q - log Y) are

    mode 1: dL/ds = T * coef_a * p * (ls - A)              dL/dt = T * coef_b * q * (lt - B)
    mode 0: dL/ds = T * (coef_a*p*(ls - A) + coef_b*(p-q)) dL/dt = T * (coef_b*q*(lt - B) + coef_a*(q-p))

Terms with p == 0 (or q == 0) are exactly 0 (x log x -> 0, which makes -inf logits work),
and so are terms whose coefficient is 0 (KL(Q||P) stays finite when P has mass where Q has
none, although KL(P||Q) is then infinite); NaN propagates. log M is evaluated as

    d = log q - log p,  z = log1p(w * expm1(-|d|)),  w = beta if d <= 0 else 1 - beta
    log M - log p = z + max(d, 0),   log M - log q = z - min(d, 0)

which is exact for identical rows (zero loss and zero gradient) and never forms 0 * inf.

Sparse teacher (``sparse_*`` below): per row the teacher's top-m probabilities ``probs`` at
class ids ``index`` (already at the loss temperature: T scales the student only, the loss is
still multiplied by T**2). With S = sum(probs) the dense teacher is

    remainder="uniform", m < C:  r = max(1 - S, 0),  Z = S + r,  Q[index] = probs / Z,
                                 Q[other] = u = r / (C - m)
    remainder="ignore" or m == C: Z = S,  Q[index] = probs / Z,  Q[other] = 0

so Q always sums to 1 (Z = 1 for valid uniform rows; excess mass within the tolerance
``sparse_sum_tol`` is normalised away). The loss and gradients are then the dense ones with
log q = log Q. Invalid rows (an index out of [0, C), a repeated index, a negative or NaN
probability, S > 1 + tol) get a NaN teacher, hence NaN loss and gradient: the device-side guard used when
host validation is off; masked rows are exactly 0 whatever they hold.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DivSpec",
    "make_spec",
    "divergence_rows",
    "divergence_rows_and_grad",
    "reduce_rows",
    "row_count",
    "sparse_sum_tol",
    "sparse_invalid_rows",
    "sparse_teacher_probs",
    "sparse_divergence_rows",
    "sparse_divergence_rows_and_grad",
    "squared_distances",
    "knn",
]

KINDS = ("jsd", "sym_kl", "kl")
REDUCTIONS = ("none", "sum", "mean", "batchmean")
REMAINDERS = ("uniform", "ignore")


class DivSpec(NamedTuple):
    """Static description of one divergence: what the kernels are specialised on."""

    mode: int  # 0: KL family, 1: JSD mixture
    beta: float  # teacher weight inside M (mode 1)
    coef_a: float  # loss = coef_a * A + coef_b * B
    coef_b: float
    inv_temp: float  # 1 / T

    @property
    def temperature(self) -> float:
        return 1.0 / self.inv_temp


def make_spec(kind: str = "jsd", beta: float = 0.5, temperature: float = 1.0) -> DivSpec:
    """Map the public (kind, beta, temperature) onto the kernels' (mode, coefficients)."""
    inv_temp = 1.0 / float(temperature)
    if kind == "jsd":
        beta = float(beta)
        if beta == 0.0:
            return DivSpec(0, 0.0, 0.0, 1.0, inv_temp)  # KL(Q||P) = B
        if beta == 1.0:
            return DivSpec(0, 1.0, 1.0, 0.0, inv_temp)  # KL(P||Q) = A
        return DivSpec(1, beta, 1.0 - beta, beta, inv_temp)
    if kind == "sym_kl":
        return DivSpec(0, 0.5, 0.5, 0.5, inv_temp)
    if kind == "kl":
        return DivSpec(0, 0.0, 0.0, 1.0, inv_temp)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def _xlogy_terms(spec: DivSpec, logp: Tensor, logq: Tensor) -> tuple[Tensor, Tensor]:
    """Return (ls, lt): log p - log X and log q - log Y, elementwise."""
    if spec.mode == 0:
        ls = logp - logq
        return ls, -ls
    d = logq - logp
    # where both probabilities are 0, d = -inf - -inf is NaN: those terms are masked out later,
    # and d = 0 keeps autograd's local derivatives finite there. NaN logits stay NaN.
    both_zero = (logp == float("-inf")) & (logq == float("-inf"))
    d = torch.where(both_zero, torch.zeros_like(d), d)
    w = torch.full_like(d, 1.0 - spec.beta).masked_fill(d <= 0, spec.beta)
    z = torch.log1p(w * torch.expm1(-d.abs()))
    log_m_minus_logp = z + d.clamp(min=0)
    log_m_minus_logq = z - d.clamp(max=0)
    return -log_m_minus_logp, -log_m_minus_logq


def _weighted(coef: float, value: Tensor) -> Tensor:
    """coef * value, skipped when coef == 0 (so an infinite KL with weight 0 is 0, not NaN)."""
    return coef * value if coef != 0 else torch.zeros_like(value)


def _masked_product(prob: Tensor, value: Tensor) -> Tensor:
    """prob * value with 0 where prob == 0 (so 0 * inf = 0), NaN kept.

    ``value`` is cleaned before the product (not after), so autograd never multiplies a zero
    gradient by an infinite local derivative either."""
    safe = torch.where(prob == 0, torch.zeros_like(value), value)
    return prob * safe


def _row_stats(spec: DivSpec, s: Tensor, t: Tensor):
    acc = _acc_dtype(s, t)
    return _row_stats_logq(spec, s, torch.log_softmax(t.to(acc) * spec.inv_temp, dim=-1))


def _row_stats_logq(spec: DivSpec, s: Tensor, logq: Tensor):
    """Row statistics from student logits and the teacher's log-probabilities (its dtype)."""
    logp = torch.log_softmax(s.to(logq.dtype) * spec.inv_temp, dim=-1)
    p, q = logp.exp(), logq.exp()
    ls, lt = _xlogy_terms(spec, logp, logq)
    a = _masked_product(p, ls).sum(-1)
    b = _masked_product(q, lt).sum(-1)
    return p, q, ls, lt, a, b


def divergence_rows(
    spec: DivSpec, s: Tensor, t: Tensor, weight: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    """Per-row loss of 2-D logits (n, C): T^2 * (coef_a*A + coef_b*B) * weight, 0 where masked.

    Differentiable in ``s``, ``t`` and ``weight``; the logits' gradients are the closed forms
    of :func:`divergence_rows_and_grad` (module docstring), not autograd through log M."""
    if mask is not None:  # masked rows compute on zeros: exact 0 loss and 0 gradient, even for NaN
        keep = mask.bool()[:, None]
        s = torch.where(keep, s, torch.zeros_like(s))
        t = torch.where(keep, t, torch.zeros_like(t))
    return _closed_form_rows().apply(spec, s, t, weight, mask, False)


class _ClosedFormRows(torch.autograd.Function):
    """Row losses whose backward is the closed-form gradient (``_rows_and_grad``).

    Autograd through ``_xlogy_terms`` differentiates log1p(w * expm1(-|d|)): its chain forms
    expm1(-|d|) + 1, which rounds away e^-|d| and loses the gradient's small terms once
    |log p - log q| >~ 10 in float32 (whole rows of 1e-10-sized gradients came out 0). The
    closed form has no such chain. ``t`` is the teacher's logits, or with ``logq=True`` its
    log-probabilities (a sparse teacher: no gradient). The backward recomputes the row
    statistics from the saved inputs with differentiable ops, so double backward works."""

    generate_vmap_rule = True  # torch.func.vmap / grad / jacrev work through it

    @staticmethod
    def forward(spec, s, t, weight, mask, logq):
        _, _, _, _, a, b = _stats(spec, s, t, logq)
        return _row_loss(spec, a, b, weight, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, s, t, weight, mask, logq = inputs
        ctx.spec, ctx.logq = spec, logq
        ctx.save_for_backward(s, t, weight, mask)
        ctx.save_for_forward(s, t, weight, mask)

    @staticmethod
    def backward(ctx, grad_rows):
        s, t, weight, mask = ctx.saved_tensors
        spec, need_s, need_t, need_w = ctx.spec, *ctx.needs_input_grad[1:4]
        stats = _stats(spec, s, t, ctx.logq)
        need_t = need_t and not ctx.logq
        _, grad_s, grad_t = _rows_and_grad(
            spec, stats, grad_rows, weight, mask, need_t, s.dtype, t.dtype
        )
        grad_w = None
        if need_w:
            grad_w = (_row_loss(spec, stats[4], stats[5], None, mask) * grad_rows).to(weight.dtype)
        return None, grad_s if need_s else None, grad_t, grad_w, None, None


class _ClosedFormRowsFwdAD(_ClosedFormRows):
    """:class:`_ClosedFormRows` with forward-mode AD (torch.func.jvp, forward_ad). Separate
    because dynamo refuses Functions that define ``jvp``: under torch.compile the base class
    runs (reverse mode is what compiled training needs)."""

    @staticmethod
    def jvp(ctx, _spec, ds, dt, dw, _mask, _logq):
        """Forward mode: sum_j (dL_r/ds_rj ds_rj + dL_r/dt_rj dt_rj) + L_r / w_r dw_r."""
        s, t, weight, mask = ctx.saved_tensors
        spec = ctx.spec
        stats = _stats(spec, s, t, ctx.logq)
        need_t = dt is not None and not ctx.logq
        ones = torch.ones((), dtype=stats[4].dtype, device=s.device)
        loss, grad_s, grad_t = _rows_and_grad(
            spec, stats, ones, weight, mask, need_t, stats[4].dtype, stats[4].dtype
        )
        out = torch.zeros_like(loss)
        if ds is not None:
            out = out + (grad_s * ds.to(out.dtype)).sum(-1)
        if need_t:
            out = out + (grad_t * dt.to(out.dtype)).sum(-1)
        if dw is not None:
            out = out + _row_loss(spec, stats[4], stats[5], None, mask) * dw.to(out.dtype)
        return out


def _closed_form_rows():
    return _ClosedFormRows if torch.compiler.is_compiling() else _ClosedFormRowsFwdAD


def _stats(spec: DivSpec, s: Tensor, t: Tensor, logq: bool):
    return _row_stats_logq(spec, s, t) if logq else _row_stats(spec, s, t)


def _row_loss(spec: DivSpec, a: Tensor, b: Tensor, weight, mask) -> Tensor:
    """T^2 * (coef_a*A + coef_b*B) * weight, 0 where masked, from the row sums A and B."""
    loss = (_weighted(spec.coef_a, a) + _weighted(spec.coef_b, b)) * spec.temperature**2
    if weight is not None:
        loss = loss * weight.to(loss.dtype)
    if mask is not None:
        loss = torch.where(mask.bool(), loss, torch.zeros_like(loss))
    return loss


def divergence_rows_and_grad(
    spec: DivSpec,
    s: Tensor,
    t: Tensor,
    grad_rows: Tensor,
    weight: Tensor | None = None,
    mask: Tensor | None = None,
    need_grad_t: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row loss and the closed-form gradients of sum_r grad_rows[r] * loss[r]."""
    stats = _row_stats(spec, s, t)
    return _rows_and_grad(spec, stats, grad_rows, weight, mask, need_grad_t, s.dtype, t.dtype)


def _rows_and_grad(spec, stats, grad_rows, weight, mask, need_grad_t, s_dtype, t_dtype):
    p, q, ls, lt, a, b = stats
    loss = (_weighted(spec.coef_a, a) + _weighted(spec.coef_b, b)) * spec.temperature**2
    g = grad_rows.to(loss.dtype).expand(loss.shape[0]) * spec.temperature
    if weight is not None:
        loss = loss * weight.to(loss.dtype)
        g = g * weight.to(loss.dtype)
    if mask is not None:
        keep = mask.bool()
        loss = torch.where(keep, loss, torch.zeros_like(loss))
        g = torch.where(keep, g, torch.zeros_like(g))
    g = g[:, None]
    grad_s = _weighted(spec.coef_a, _masked_product(p, ls - a[:, None]))
    if spec.mode == 0:
        grad_s = grad_s + spec.coef_b * (p - q)
    grad_s = g * grad_s
    if mask is not None:  # masked rows get exactly 0, even where their logits are NaN
        grad_s = torch.where(mask.bool()[:, None], grad_s, torch.zeros_like(grad_s))
    grad_t = None
    if need_grad_t:
        grad_t = _weighted(spec.coef_b, _masked_product(q, lt - b[:, None]))
        if spec.mode == 0:
            grad_t = grad_t + spec.coef_a * (q - p)
        grad_t = g * grad_t
        if mask is not None:
            grad_t = torch.where(mask.bool()[:, None], grad_t, torch.zeros_like(grad_t))
        grad_t = grad_t.to(t_dtype)
    return loss, grad_s.to(s_dtype), grad_t


def reduce_rows(row_loss: Tensor, reduction: str, mask: Tensor | None, lead_shape) -> Tensor:
    """Apply a reduction to per-row losses. mean/batchmean divide by the unmasked row count."""
    if reduction == "none":
        return row_loss.reshape(lead_shape)
    if reduction == "sum" or row_loss.shape[0] == 0:
        return row_loss.sum()  # an empty batch's mean is 0, not NaN
    if mask is None:
        return row_loss.mean()  # one reduction kernel (sum then divide would be two)
    return row_loss.sum() / row_count(row_loss.shape[0], mask, row_loss.dtype, row_loss.device)


def row_count(n: int, mask: Tensor | None, dtype, device) -> Tensor | float:
    """Number of rows a mean divides by (at least 1, so an empty batch gives 0, not NaN)."""
    if mask is None:
        return float(max(n, 1))
    return mask.reshape(-1).sum().clamp(min=1).to(dtype)


# ----------------------------------------------------------------------------------------------
# Softmax divergence against a sparse (top-m) teacher
# ----------------------------------------------------------------------------------------------


def sparse_sum_tol(dtype: torch.dtype) -> float:
    """How far above 1 a row's top-m probabilities may sum: max(1e-3, 2 eps(dtype)).

    1e-3 for float32/float64 (probabilities computed in a lower precision and cast up),
    2e-3 for float16 and 1.6e-2 for bfloat16 (rounding each of m positive values to the dtype
    moves their sum by at most eps/2 relative)."""
    return max(1e-3, 2.0 * torch.finfo(dtype).eps)


def sparse_invalid_rows(
    probs: Tensor, index: Tensor, n_classes: int, sum_tol: float | None = None
) -> Tensor:
    """Bool (...,): rows with an index outside [0, C), a repeated index, a negative (or NaN)
    probability, or probabilities summing above 1 + sum_tol. On the device, no host sync."""
    tol = sparse_sum_tol(probs.dtype) if sum_tol is None else sum_tol
    pr = probs.to(_acc_dtype(probs))
    bad = ((index < 0) | (index >= n_classes)).any(-1) | ~(pr >= 0).all(-1)
    bad = bad | (pr.sum(-1) > 1.0 + tol)
    if index.shape[-1] > 1:
        srt = index.sort(dim=-1).values
        bad = bad | (srt[..., 1:] == srt[..., :-1]).any(-1)
    return bad


def sparse_teacher_probs(
    probs: Tensor,
    index: Tensor,
    n_classes: int,
    remainder: str = "uniform",
    sum_tol: float | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The dense (..., C) teacher distribution Q of a sparse teacher (module docstring).

    ``dtype`` defaults to float64 for float64 probs, else float32. Invalid rows
    (:func:`sparse_invalid_rows`) are NaN."""
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    acc = dtype or _acc_dtype(probs)
    pr = probs.to(acc)
    m = pr.shape[-1]
    total = pr.sum(-1, keepdim=True)
    if remainder == "uniform" and n_classes > m:
        rest = (1.0 - total).clamp(min=0.0)
    else:
        rest = torch.zeros_like(total)
    u = rest / max(n_classes - m, 1)
    q = u.expand(*pr.shape[:-1], n_classes).contiguous()
    idx = index.long().clamp(0, max(n_classes - 1, 0))  # out-of-range rows become NaN below
    q = q.scatter(-1, idx, pr / (total + rest))
    bad = sparse_invalid_rows(probs, index, n_classes, sum_tol)
    return torch.where(bad[..., None], torch.full_like(q, float("nan")), q)


def _sparse_logq(s, probs, index, remainder, sum_tol, mask):
    q = sparse_teacher_probs(probs, index, s.shape[-1], remainder, sum_tol, _acc_dtype(s, probs))
    logq = q.log()
    if mask is not None:  # masked rows: uniform P and Q (exact 0 loss and gradient)
        keep = mask.bool()[:, None]
        logq = torch.where(keep, logq, torch.log_softmax(torch.zeros_like(logq), dim=-1))
    return logq


def sparse_divergence_rows(
    spec: DivSpec,
    s: Tensor,
    probs: Tensor,
    index: Tensor,
    remainder: str = "uniform",
    weight: Tensor | None = None,
    mask: Tensor | None = None,
    sum_tol: float | None = None,
) -> Tensor:
    """Per-row loss of (n, C) student logits against a sparse teacher ((n, m) probs, index):
    the dense loss with Q = :func:`sparse_teacher_probs`; differentiable in ``s`` (its
    closed-form gradient), not in ``probs`` (data: a ValueError if they require grad)."""
    if probs.requires_grad and torch.is_grad_enabled():
        raise ValueError("probs: a sparse teacher's probabilities get no gradient; detach them")
    logq = _sparse_logq(s, probs, index, remainder, sum_tol, mask)
    if mask is not None:
        s = torch.where(mask.bool()[:, None], s, torch.zeros_like(s))
    return _closed_form_rows().apply(spec, s, logq, weight, mask, True)


def sparse_divergence_rows_and_grad(
    spec: DivSpec,
    s: Tensor,
    probs: Tensor,
    index: Tensor,
    grad_rows: Tensor,
    remainder: str = "uniform",
    weight: Tensor | None = None,
    mask: Tensor | None = None,
    sum_tol: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row loss and the closed-form gradient in ``s`` of sum_r grad_rows[r] * loss[r]."""
    logq = _sparse_logq(s, probs, index, remainder, sum_tol, mask)
    if mask is not None:
        s = torch.where(mask.bool()[:, None], s, torch.zeros_like(s))
    stats = _row_stats_logq(spec, s, logq)
    loss, grad_s, _ = _rows_and_grad(spec, stats, grad_rows, weight, mask, False, s.dtype, None)
    return loss, grad_s


# ----------------------------------------------------------------------------------------------
# Descriptor matching
# ----------------------------------------------------------------------------------------------


def squared_distances(queries: Tensor, database: Tensor) -> Tensor:
    """Exact squared L2 distances (nq, ndb): int64 for uint8 descriptors, float64 otherwise.

    Computed as sum_d (a_d - b_d)^2 (no |a|^2 + |b|^2 - 2ab expansion, which cancels).
    """
    acc = torch.int64 if queries.dtype == torch.uint8 else torch.float64
    diff = queries.to(acc)[:, None, :] - database.to(acc)[None, :, :]
    return (diff * diff).sum(-1)


def knn(queries: Tensor, database: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Brute-force k nearest neighbours: (dist2 float32 (nq, k), index int64 (nq, k)).

    Ascending by distance, ties to the lower database index (a stable sort). Queries are
    processed in chunks so memory stays O(chunk * ndb * dim).
    """
    nq, ndb = queries.shape[0], database.shape[0]
    dist = torch.empty((nq, k), dtype=torch.float32, device=queries.device)
    index = torch.empty((nq, k), dtype=torch.int64, device=queries.device)
    chunk = max(1, (1 << 24) // max(1, ndb * queries.shape[1]))
    for start in range(0, nq, chunk):
        d = squared_distances(queries[start : start + chunk], database)
        d = (
            torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
            if d.is_floating_point()
            else d
        )
        vals, idx = torch.sort(d, dim=1, stable=True)
        dist[start : start + chunk] = vals[:, :k].to(torch.float32)
        index[start : start + chunk] = idx[:, :k]
    return dist, index
