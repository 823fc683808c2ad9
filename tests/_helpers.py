"""Shared test helpers: backend/device grid and float64 oracles independent of the kernels."""

import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from ssld_kernels._backends import backend_status

HAS_CUDA = torch.cuda.is_available()


def backend_params():
    """(backend, device) pairs to test; GPU ones carry the `cuda` marker."""
    out = []
    cpu_status = backend_status("cpu")
    for name in ("torch", "cpu", "triton"):
        marks = [] if cpu_status[name][0] else [pytest.mark.skip(reason=cpu_status[name][1])]
        out.append(pytest.param(name, "cpu", id=f"{name}-cpu", marks=marks))
    for name in ("cuda", "triton", "torch"):
        out.append(pytest.param(name, "cuda", id=f"{name}-cuda", marks=[pytest.mark.cuda]))
    return out


def _combine(kind, beta, student, teacher, kl, mixture):
    """The kind/beta dispatch of the oracles below, on their own representation of the
    distributions: ``kl(x, y)`` is KL(x||y), ``mixture()`` gives M = beta*Q + (1-beta)*P."""
    if kind == "kl" or (kind == "jsd" and beta == 0):
        return kl(teacher, student)
    if kind == "jsd" and beta == 1:
        return kl(student, teacher)
    if kind == "sym_kl":
        return 0.5 * (kl(teacher, student) + kl(student, teacher))
    m = mixture()
    return beta * kl(teacher, m) + (1 - beta) * kl(student, m)


def naive_divergence_rows(s, t, kind, beta, temperature):
    """TRL-style composition in float64 (log_softmax + kl_div + logsumexp of the mixture).

    Written independently of ssld_kernels.reference: used as the oracle for values and, through
    autograd, for gradients.
    """
    ls = F.log_softmax(s.double() / temperature, -1)
    lt = F.log_softmax(t.double() / temperature, -1)

    def kl(target_log, input_log):  # KL(target || input), x log x -> 0
        return F.kl_div(input_log, target_log, reduction="none", log_target=True).sum(-1)

    def mixture():
        b = torch.tensor(beta, dtype=torch.float64)
        return torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), 0)

    return _combine(kind, beta, ls, lt, kl, mixture) * temperature**2


def prob_divergence_rows(s, q, kind, beta, temperature):
    """The same loss rows from student logits and a teacher *distribution* q (float64; zeros
    allowed: x log x -> 0 through xlogy). Differentiable in s."""
    ps = torch.softmax(s.double() / temperature, -1)
    q = q.double()

    def kl(a, b):
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)

    def mixture():
        return beta * q + (1 - beta) * ps

    return _combine(kind, beta, ps, q, kl, mixture) * temperature**2


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------------------------
# error bounds of the float32 computation (the tolerances of every divergence oracle test)
# ----------------------------------------------------------------------------------------------
#
# Every backend computes in float32 (inputs of lower precision are widened exactly); the
# oracle is float64. The bound below is a first-order worst-case bound on the float32 error,
# per row for the loss and per element for the gradient, evaluated on the float64 inputs. It
# does not depend on the instruction set, so it holds on every CPU (and, with the chain
# lengths below, on the GPU backends). u = 2^-24.
#
# Row quantities: x = s/T, y = t/T, lp = log_softmax(x), lq = log_softmax(y) (or log Q of a
# sparse teacher); L = max |x|, |y|, |lp|, |lq| over the row's finite entries;
# Z = L + log C + 1; n = the longest serial chain of float32 additions in the backend's row
# sums (sum_chain below).
#
# (1) Log-probabilities. However an implementation forms log p_j (x - m - log sum exp(x - m),
#     or exp and divide), it rounds x (2 ops, <= 2uL), the shift x - m (<= 2uL), exp and log
#     (<= 4 ulp each for the libraries used here: Sleef u10, csrc/cpu_math.h, libm/numpy; a
#     fast GPU exp adds ~1.2 ulp per unit of argument, <= 2.4uL), log sum (u log C), lse and
#     x - lse (<= u(L + log C) each), and the sum of C nonnegative terms in chains of n
#     additions, whose relative error is <= n u (Higham, Accuracy and Stability of Numerical
#     Algorithms, (4.4)). Altogether |d log p_j| <= delta = u (12 Z + n); likewise log q_j.
# (2) Gradients. With a_i the student's log ratio in the kind (log p_i - log M_i for the JSD
#     mixture, log p_i - log q_i for KL(P||Q)) and A = sum p a, every kind's student gradient
#     is T * c_a * p_i (a_i - A), plus T * c_b * (p_i - q_i) for KL(Q||P) (the teacher's
#     is the mirror image). Since M lies between p and q, a perturbation of the log-probs by
#     <= delta moves a_i by <= 2 delta, p_i by <= p_i (delta + 2u), and A by
#     <= (delta + 2u) Abar + 2 delta + n u Abar with Abar = sum p |a|; with the roundings of
#     the ~10 products, subtractions and elementary functions of the formula (<= 21 u) this
#     gives, per element,
#         |dg_i| <= u (48 Z + 5 n + 24) * T * (c_a p_i (1 + |a_i| + Abar) + c_b (p_i + q_i))
#     (the second term only for the KL(Q||P) part). The loss, T^2 (c_a A + c_b B), obeys the
#     same factor times T^2 (c_a (1 + Abar) + c_b (1 + Bbar)).
# (3) Storage. A gradient stored in a dtype of unit roundoff u_out adds u_out |g| and, below
#     that dtype's normal range, half its subnormal spacing, per rounding (at most two, see
#     assert_grad_close). Float32 values below 2^-126 (p underflowing in float32 but not in
#     float64, e.g. with logits of 1e4) may be lost entirely: an absolute 2^-126 * 4 Z per
#     element covers them.
# Observed (AVX2 CPU; ATen capabilities AVX2 and DEFAULT, kernel variants avx2 and base): the
# float32 errors of the cpu, torch and triton backends stay below 0.06 of the float32 part
# of the bound; the storage roundings are bounded tightly (up to 0.9 of their terms is
# reached). The torch backend's gradients are closed forms like the kernels' (until issue 15
# it differentiated log1p(w expm1(-|d|)) by autograd, whose expm1(-|d|) + 1 cancels for
# |d| >~ 10 and needed its own term here; tests/test_reference.py checks that it does not).
# Both sides of the comparison are then checked elementwise: |got - ref| <= bound.

U32 = 2.0**-24


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def half_subnormal(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2


def sum_chain(backend: str, c: int) -> int:
    """The longest serial chain of float32 additions in a backend's row sums over C classes."""
    if backend == "cpu":  # csrc: 4 float adds per lane and accumulator, then flushed to double
        return 5
    if backend == "triton":  # serial over chunks of min(next_pow2(C), 4096) + a tree per chunk
        return -(-c // 4096) + 32  # (numpy's pairwise sum in the interpreter: <= 16 + log2)
    if backend == "cuda":  # a warp per row (C <= 1024) or >= 256 threads, then a tree
        return -(-c // (32 if c <= 1024 else 256)) + 10
    # torch (ATen): 8 float lanes (AVX2 and the default build; 16 with AVX-512), each a serial
    # chain over the row, then a horizontal sum; also the default for anything else
    return -(-c // 8) + 8


class DivBounds(NamedTuple):
    """Absolute error bounds of a float32 computation, for unit weight and grad_output."""

    loss: torch.Tensor  # (n,) per row
    grad_s: torch.Tensor  # (n, C) per element, student logits
    grad_t: torch.Tensor  # (n, C) per element, teacher logits


def _kind_coefs(kind: str, beta: float) -> tuple[int, float, float]:
    """(mode, c_a, c_b): mode 1 is the JSD mixture, mode 0 the KL family
    (loss = c_a KL(P||Q) + c_b KL(Q||P))."""
    if kind == "jsd" and 0.0 < beta < 1.0:
        return 1, 1.0 - beta, beta
    if kind == "sym_kl":
        return 0, 0.5, 0.5
    if kind == "jsd" and beta == 1.0:
        return 0, 1.0, 0.0
    return 0, 0.0, 1.0  # kl, jsd with beta = 0


def _log_probs(s, t, temperature, logq):
    """Float64 rows: (x, lp, lq, Z) of the derivation, from logits or the teacher's logq."""
    c = s.shape[-1]
    x = s.detach().double().cpu().reshape(-1, c) / temperature
    lp = torch.log_softmax(x, -1)
    if logq is None:
        y = t.detach().double().cpu().reshape(-1, c) / temperature
        lq = torch.log_softmax(y, -1)
        mags = [x, y, lp, lq]
    else:
        lq = logq.detach().double().cpu().reshape(-1, c)
        mags = [x, lp, lq]
    big = torch.stack([torch.where(torch.isfinite(m), m.abs(), 0.0).amax(-1) for m in mags])
    return lp, lq, big.amax(0) + math.log(c) + 1.0


def divergence_bounds(
    s, t, kind, beta, temperature, backend, *, logq=None, teacher_rel_err=None, dtype=None
) -> DivBounds:
    """First-order error bounds of the float32 loss rows and gradients (derivation above).

    ``s``, ``t``: logits (any leading dims, flattened to rows); or ``t=None`` and ``logq`` the
    teacher's float64 log-probabilities (a sparse teacher), with ``teacher_rel_err`` an extra
    per-row bound on the relative error of its probabilities. ``dtype=torch.float64``: the
    same bounds for a float64 computation (any summation order: n = C).
    """
    c = s.shape[-1]
    lp, lq, z = _log_probs(s, t, temperature, logq)
    u = U32 if dtype in (None, torch.float32) else unit_roundoff(dtype)
    n = sum_chain(backend, c) if u == U32 else c
    factor = u * (48.0 * z + 5.0 * n + 24.0)
    if teacher_rel_err is not None:  # adds to delta, which enters the factor 4 times
        factor = factor + 4.0 * teacher_rel_err.double().reshape(-1)
    p, q = lp.exp(), lq.exp()
    mode, ca, cb = _kind_coefs(kind, beta)
    if mode == 1:
        lm = torch.logaddexp(lp + math.log1p(-beta), lq + math.log(beta))
        a, b = lp - lm, lq - lm
    else:
        a, b = lp - lq, lq - lp
    # x log x -> 0: a zero probability contributes nothing (and a - A is never formed there)
    a = torch.where(p > 0, a, 0.0)
    b = torch.where(q > 0, b, 0.0)
    zero = torch.zeros_like(p)
    env_s, env_t, loss_env = zero, zero, torch.zeros_like(z)
    if ca:  # (a term with coefficient 0 is skipped: KL(Q||P) is finite where q = 0 < p)
        abar = (p * a.abs()).sum(-1, keepdim=True)
        env_s = ca * p * (1 + a.abs() + abar)
        loss_env = loss_env + ca * (1 + abar.reshape(-1))
    if cb:
        bbar = (q * b.abs()).sum(-1, keepdim=True)
        env_t = cb * q * (1 + b.abs() + bbar)
        loss_env = loss_env + cb * (1 + bbar.reshape(-1))
    if mode == 0:  # the (p - q) terms of KL(Q||P) (student) and KL(P||Q) (teacher)
        env_s = env_s + cb * (p + q)
        env_t = env_t + ca * (p + q)
    tiny = torch.finfo(torch.float32 if u == U32 else dtype).smallest_normal * 4.0 * z[:, None]
    grad_s = factor[:, None] * temperature * env_s + tiny
    grad_t = factor[:, None] * temperature * env_t + tiny
    return DivBounds(loss=factor * loss_env, grad_s=grad_s, grad_t=grad_t)


def careful_loss_bound(s, t, kind, beta, backend, *, logq=None, teacher_rel_err=None):
    """Error bound of the loss rows (T = 1) of an evaluation without cancellation: log ratios
    formed from d = log q - log p, their roundings relative to the terms, not to log p.

    With the log-probabilities perturbed by <= delta = u (12 Z + n) (derivation above, (1)),
    the loss moves by <= delta * sum_j (|dL/dlp_j| + |dL/dlq_j|), the derivatives taken on
    unnormalised log-probabilities: c_a p_j a_j and c_b q_j b_j for the JSD mixture, linear
    in d and hence small for near-identical rows; the roundings of the terms c p_j a_j and of
    their sums add <= u (5 n + 24) sum_j |terms|. A naive log(beta q + (1 - beta) p) - log p
    instead carries ~u |log p| per term, ~u Z in all."""
    c = s.shape[-1]
    lp, lq, z = _log_probs(s, t, 1.0, logq)
    lp, lq = lp.requires_grad_(), lq.requires_grad_()
    mode, ca, cb = _kind_coefs(kind, beta)
    if mode == 1:
        lm = torch.logaddexp(lp + math.log1p(-beta), lq + math.log(beta))
        terms = ca * lp.exp() * (lp - lm) + cb * lq.exp() * (lq - lm)
    else:
        terms = ca * lp.exp() * (lp - lq) + cb * lq.exp() * (lq - lp)
    terms = torch.where(torch.isfinite(terms), terms, 0.0)  # x log x -> 0
    g_lp, g_lq = torch.autograd.grad(terms.sum(), [lp, lq])
    n = sum_chain(backend, c)
    delta = U32 * (12 * z + n)
    if teacher_rel_err is not None:
        delta = delta + teacher_rel_err.double().reshape(-1)
    sensitivity = (g_lp.abs() + g_lq.abs()).sum(-1)
    return delta * sensitivity + U32 * (5 * n + 24) * terms.detach().abs().sum(-1)


def assert_within(got, ref, bound, what="value"):
    """|got - ref| <= bound elementwise (NaN and infinities must match exactly)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand(ref.shape)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    same = (got == ref) | (torch.isnan(got) & torch.isnan(ref))
    err = torch.where(same, 0.0, (got - ref).abs())
    ratio = torch.where(err == 0, 0.0, err / bound)
    worst = ratio.nan_to_num(nan=float("inf")).max().item() if ratio.numel() else 0.0
    if not worst <= 1.0:
        i = int(ratio.nan_to_num(nan=float("inf")).reshape(-1).argmax())
        raise AssertionError(
            f"{what}: error {err.reshape(-1)[i].item():.3e} at flat index {i} is "
            f"{worst:.3g} x its bound {bound.reshape(-1)[i].item():.3e} "
            f"(got {got.reshape(-1)[i].item():.9g}, want {ref.reshape(-1)[i].item():.9g})"
        )
    return worst


def assert_loss_close(got, ref, row_bound, what="loss"):
    """Loss rows (or any float32 loss) against the oracle: the bound plus its float32 rounding."""
    ref = ref.detach().double().cpu()
    return assert_within(got, ref, row_bound + U32 * ref.abs(), what)


def store_roundoff(dtype: torch.dtype, backend: str | None, device_type: str) -> float:
    """The relative error of storing a float32 value in ``dtype``: u_out (round to nearest),
    except for the Triton interpreter (the triton backend on CPU tensors), which converts
    float32 to bfloat16 by truncation: up to 1 ulp, 2 u_out."""
    if backend == "triton" and device_type == "cpu" and dtype == torch.bfloat16:
        return 2 * unit_roundoff(dtype)
    return unit_roundoff(dtype)


def assert_grad_close(got, ref, bound, what="gradient", backend=None):
    """A gradient stored in ``got.dtype`` against the float64 oracle gradient ``ref``.

    The storage may round twice (2 u_out |g|): a gradient kept from the forward pass is
    stored in the input dtype and then scaled in place by grad_output (documented for
    bfloat16 in ssld_kernels.divergence._autograd.grad_in_forward). ``backend``: see store_roundoff."""
    u = store_roundoff(got.dtype, backend, got.device.type)
    ref = ref.detach().double().cpu()
    total = bound * (1 + 2 * u) + 2 * u * ref.abs() + 2 * half_subnormal(got.dtype)
    return assert_within(got, ref, total, what)


def reduced_bound(row_bound, rows, reduction, u=U32):
    """Bound of a reduced loss from its rows' bounds, both already weighted (and divided by
    the row count for "mean"/"batchmean"): their sum plus the summation's own rounding,
    n u sum |rows| for n rows in any order (a final division's rounding is the u |ref| of
    assert_loss_close)."""
    if reduction == "none":
        return row_bound
    rows = rows.detach().double().cpu()
    return row_bound.sum() + rows.numel() * u * rows.abs().sum()
