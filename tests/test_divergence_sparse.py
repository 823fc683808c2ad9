"""Softmax divergence against a sparse (top-m) teacher: every backend vs float64 oracles.

The oracle is written here from SparseTeacher's documented definition (dense_teacher64) and
tests/_helpers.py's float64 formulas, never ssld_kernels.reference; the tolerances are the
float32 error bounds of tests/_helpers.py (divergence_bounds), with the teacher's own
rounding added (sparse_teacher_err).
"""

import pytest
import torch
from _helpers import (
    U32,
    assert_grad_close,
    assert_loss_close,
    assert_within,
    backend_params,
    careful_loss_bound,
    divergence_bounds,
    naive_divergence_rows,
    prob_divergence_rows,
    reduced_bound,
)

import ssld_kernels as sk
from ssld_kernels import SparseTeacher, reference
from ssld_kernels.divergence.sparse import _sparse_impl

# (leading shape, C, m): odd sizes; C = 4099 spans two class chunks of the Triton kernel,
# m = 64 a full chunk of top entries, m = C = 100 (below) two of them.
SHAPES = [((3,), 7, 2), ((17,), 1000, 5), ((5,), 4099, 64), ((2, 3), 100, 9)]
# (student dtype, probs dtype): logits and probs are widened exactly and accumulated in fp32;
# the gradient is rounded to the student's dtype (assert_grad_close adds that rounding).
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
KINDS = [("jsd", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0), ("sym_kl", 0.5), ("kl", 0.0)]
BACKENDS = backend_params()


def _needs_log_pt(kind, beta):
    """Kinds containing KL(Ps||Pt): +inf where the teacher has zero mass."""
    return kind == "sym_kl" or (kind == "jsd" and beta == 1.0)


# ----------------------------------------------------------------------------------------------
# independent float64 oracle
# ----------------------------------------------------------------------------------------------


def dense_teacher64(probs, index, c, remainder):
    """The documented dense teacher Q, row by row in float64 (independent of the library)."""
    m = probs.shape[-1]
    p = probs.detach().double().cpu().reshape(-1, m)
    i = index.cpu().reshape(-1, m).long()
    q = torch.zeros(p.shape[0], c, dtype=torch.float64)
    for r in range(p.shape[0]):
        total = float(p[r].sum())
        if remainder == "uniform" and m < c:
            z, u = max(total, 1.0), max(1.0 - total, 0.0) / (c - m)
        else:
            z, u = total, 0.0
        q[r] = u
        q[r, i[r]] = p[r] / z
    return q


oracle_rows = prob_divergence_rows  # loss rows from student logits and a distribution q


def sparse_teacher_err(probs, index, c, remainder):
    """Per-row bound on the relative error of the float32 teacher probabilities, from the
    definition: S sums m probabilities (relative error <= m u), Q[index] = probs / max(S, 1)
    (one more rounding); the uniform remainder r = max(1 - S, 0) then carries the absolute
    error (m + 1) u max(S, 1) of S, i.e. relative (m + 1) u max(S, 1) / r (a row with r = 0
    keeps r = 0 in float32 in these tests: S = 1 exactly, or S > 1 + m u)."""
    m = probs.shape[-1]
    p = probs.detach().double().cpu().reshape(-1, m)
    total = p.sum(-1)
    err = torch.full_like(total, (m + 1) * U32)
    if remainder == "uniform" and m < c:
        r = (1 - total).clamp(min=0)
        spread = (m + 1) * U32 * total.clamp(min=1) / r
        err = err + torch.where(r > 0, spread, 0.0)
    return err


def sparse_bounds(backend, device, s, probs, index, remainder, kind, beta, temperature):
    """divergence_bounds of the implementation that runs (the Triton kernel, or the
    reference for "cpu"/"torch"), with the dense teacher's log-probabilities."""
    c = s.shape[-1]
    q = dense_teacher64(probs, index, c, remainder)
    impl = _sparse_impl(backend, torch.device(device))
    return divergence_bounds(
        s,
        None,
        kind,
        beta,
        temperature,
        impl,
        logq=q.log(),
        teacher_rel_err=sparse_teacher_err(probs, index, c, remainder),
    )


def _sparse(lead, c, m, dtype=torch.float32, pdtype=torch.float32, device="cpu", scale=3.0):
    """Student logits and a sparse teacher: top-m of a random softmax, in shuffled order."""
    n = 1
    for d in lead:
        n *= d
    s = (torch.randn(n, c, dtype=torch.float64) * scale).to(dtype)
    q = torch.softmax(torch.randn(n, c, dtype=torch.float64) * scale, -1)
    probs, index = q.topk(m, -1)
    perm = torch.argsort(torch.rand(n, m), -1)
    probs, index = probs.gather(-1, perm), index.gather(-1, perm)
    return (
        s.reshape(*lead, c).to(device),
        probs.to(pdtype).reshape(*lead, m).to(device),
        index.reshape(*lead, m).to(device),
    )


def _check_against_oracle(backend, s, probs, index, remainder, kind, beta, temperature):
    """Values (reduction none), autograd gradient with grad_output != 1, fused gradient."""
    lead, c = s.shape[:-1], s.shape[-1]
    teacher = SparseTeacher(probs, index, remainder)
    kw = dict(kind=kind, beta=beta, temperature=temperature, backend=backend)
    sg = s.clone().requires_grad_()
    loss = sk.softmax_divergence(sg, teacher, reduction="none", **kw)
    q = dense_teacher64(probs, index, c, remainder)
    s64 = s.detach().double().cpu().reshape(-1, c).requires_grad_()
    ref = oracle_rows(s64, q, kind, beta, temperature)
    device = s.device.type
    bound = sparse_bounds(backend, device, s, probs, index, remainder, kind, beta, temperature)
    assert loss.shape == lead and loss.dtype == torch.float32
    assert_loss_close(loss.reshape(-1), ref, bound.loss)
    go = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    loss.backward(go.float().reshape(lead).to(s.device))
    (ref * go).sum().backward(retain_graph=True)
    assert sg.grad.dtype == s.dtype and sg.grad.shape == s.shape
    assert_grad_close(sg.grad.reshape(-1, c), s64.grad, bound.grad_s * go[:, None], backend=backend)
    fl, fg = sk.softmax_divergence_and_grad(s, teacher, reduction="sum", **kw)
    s64.grad = None
    ref.sum().backward()
    assert_loss_close(fl, ref.detach().sum(), reduced_bound(bound.loss, ref, "sum"))
    assert fg.dtype == s.dtype and fg.shape == s.shape
    assert_grad_close(fg.reshape(-1, c), s64.grad, bound.grad_s, "fused gradient", backend=backend)


# ----------------------------------------------------------------------------------------------
# values and gradients
# ----------------------------------------------------------------------------------------------


def test_oracle_agrees_with_dense_helper():
    """The sparse oracle equals tests/_helpers' naive formulas on the dense teacher T*log(Q)."""
    s, probs, index = _sparse((6,), 30, 4)
    q = dense_teacher64(probs, index, 30, "uniform")
    for kind, beta in KINDS:
        want = naive_divergence_rows(s, 1.7 * q.log(), kind, beta, 1.7)
        torch.testing.assert_close(oracle_rows(s, q, kind, beta, 1.7), want)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("remainder", ["uniform", "ignore"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=str)
def test_kinds_match_float64_oracle(backend, device, remainder, shape):
    lead, c, m = shape
    s, probs, index = _sparse(lead, c, m, device=device)
    for kind, beta in KINDS:
        if remainder == "ignore" and _needs_log_pt(kind, beta):
            continue  # raises (test_bad_inputs)
        _check_against_oracle(backend, s, probs, index, remainder, kind, beta, 2.5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,pdtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes_dtypes_match_float64_oracle(backend, device, dtype, pdtype, shape):
    lead, c, m = shape
    s, probs, index = _sparse(lead, c, m, dtype, pdtype, device)
    kind, beta, remainder = ("jsd", 0.5, "uniform") if c != 1000 else ("sym_kl", 0.5, "uniform")
    _check_against_oracle(backend, s, probs, index, remainder, kind, beta, 1.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nearly_converged_student(backend, device):
    """Student ~ teacher (loss ~1e-5): the correction trick must not cancel catastrophically
    (float32 sums of the top classes' u-terms gave ~4e-2 relative error here): the error
    stays within the bound of an evaluation without cancellation (careful_loss_bound)."""
    n, c, m = 4, 1000, 10
    _, probs, index = _sparse((n,), c, m, scale=4.0)
    q = dense_teacher64(probs, index, c, "uniform")
    s = (q.log() + 1e-2 * torch.randn(n, c, dtype=torch.float64)).float()
    for kind, beta in [("jsd", 0.5), ("sym_kl", 0.5)]:
        got = sk.softmax_divergence(
            s.to(device),
            SparseTeacher(probs.to(device), index.to(device)),
            kind=kind,
            beta=beta,
            reduction="none",
            backend=backend,
        )
        ref = oracle_rows(s, q, kind, beta, 1.0)
        assert ref.max() < 1e-4
        impl = _sparse_impl(backend, torch.device(device))
        err = sparse_teacher_err(probs, index, c, "uniform")
        bound = careful_loss_bound(s, None, kind, beta, impl, logq=q.log(), teacher_rel_err=err)
        assert (bound < 2e-2 * ref).all()  # well below the 4e-2 of a cancelling evaluation
        assert_loss_close(got, ref, bound)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "reduction,kind,beta",
    [("none", "jsd", 0.3), ("sum", "kl", 0.0), ("mean", "sym_kl", 0.5), ("batchmean", "jsd", 0.5)],
)
def test_reductions_weight_mask(backend, device, reduction, kind, beta):
    """Reductions, weight and mask; a masked row holding garbage is never checked, gives 0
    loss and 0 gradient."""
    lead, c, m = (3, 4), 37, 6
    s, probs, index = _sparse(lead, c, m, device=device)
    w = (torch.rand(lead, dtype=torch.float32) + 0.5).to(device)
    keep = torch.rand(lead) > 0.3
    keep[0, 0], keep[1, 2] = True, False
    keep = keep.to(device)
    probs, index, s = probs.clone(), index.clone(), s.clone()
    index[1, 2, 0], probs[1, 2, 1], s[1, 2, 3] = c + 5, float("nan"), float("nan")
    teacher = SparseTeacher(probs, index, "uniform")
    kw = dict(kind=kind, beta=beta, temperature=1.5, reduction=reduction, weight=w, mask=keep)
    sg = s.clone().requires_grad_()
    loss = sk.softmax_divergence(sg, teacher, backend=backend, **kw)
    # oracle and bounds on the valid rows (the masked one made valid: its scale is 0)
    kept = keep.cpu().reshape(-1)
    count = kept.sum().double()
    scale = w.double().cpu().reshape(-1) * kept / (1 if reduction in ("none", "sum") else count)
    valid = keep.reshape(*lead, 1)
    s_ok = torch.where(valid, s, torch.zeros_like(s))
    p_ok = torch.where(valid, probs, torch.full_like(probs, 0.1))
    i_ok = torch.where(valid, index, torch.arange(m, device=device).expand_as(index))
    q = dense_teacher64(p_ok, i_ok, c, "uniform")
    s64 = s_ok.double().cpu().reshape(-1, c).requires_grad_()
    rows = oracle_rows(s64, q, kind, beta, 1.5) * scale
    ref = rows.reshape(lead) if reduction == "none" else rows.sum()
    bound = sparse_bounds(backend, device, s_ok, p_ok, i_ok, "uniform", kind, beta, 1.5)
    loss_bound = reduced_bound(bound.loss * scale.abs(), rows, reduction).reshape(ref.shape)
    assert_loss_close(loss, ref, loss_bound)
    go = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    loss.backward(go.float().to(device))
    (ref * go).sum().backward(retain_graph=True)
    row_go = (go.reshape(-1) if reduction == "none" else go.expand(12)) * scale
    assert_grad_close(
        sg.grad.reshape(-1, c), s64.grad, bound.grad_s * row_go.abs()[:, None], backend=backend
    )
    fl, fg = sk.softmax_divergence_and_grad(s, teacher, backend=backend, **kw)
    assert_loss_close(fl, ref, loss_bound)
    s64.grad = None
    ref.sum().backward()
    assert_grad_close(
        fg.reshape(-1, c), s64.grad, bound.grad_s * scale.abs()[:, None], backend=backend
    )
    assert torch.all(fg[~keep] == 0) and torch.all(sg.grad[~keep] == 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_classes_equals_dense_teacher(backend, device):
    """A sparse teacher holding all C classes (shuffled) is the dense teacher with logits
    T * log(probs), through the dense path of the same backend; both remainders."""
    n, c, temperature = 4, 100, 1.5
    s = torch.randn(n, c, device=device) * 3
    t = torch.randn(n, c, device=device) * 3
    probs = torch.softmax(t / temperature, -1)
    t_dense = temperature * probs.log()
    perm = torch.argsort(torch.rand(n, c, device=device), -1)
    for remainder in ("uniform", "ignore"):
        teacher = SparseTeacher(probs.gather(-1, perm), perm, remainder)
        for kind, beta in KINDS:
            kw = dict(kind=kind, beta=beta, temperature=temperature, reduction="none")
            ls, gs = sk.softmax_divergence_and_grad(s, teacher, backend=backend, **kw)
            ld, gd = sk.softmax_divergence_and_grad(s, t_dense, backend=backend, **kw)
            # both against the dense float64 oracle, each to its implementation's bound
            s64 = s.double().cpu().requires_grad_()
            ref = naive_divergence_rows(s64, t_dense.double().cpu(), kind, beta, temperature)
            (ref_grad,) = torch.autograd.grad(ref.sum(), [s64])
            sparse = sparse_bounds(
                backend, device, s, teacher.probs, perm, remainder, kind, beta, temperature
            )
            dense = divergence_bounds(s, t_dense, kind, beta, temperature, backend)
            assert_loss_close(ls, ref, sparse.loss, "sparse loss")
            assert_loss_close(ld, ref, dense.loss, "dense loss")
            assert_grad_close(gs, ref_grad, sparse.grad_s, "sparse gradient", backend=backend)
            assert_grad_close(gd, ref_grad, dense.grad_s, "dense gradient", backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_full_and_exact_sums(backend, device):
    """m == C (nothing left to spread, both remainders) and probs summing to exactly 1 with
    m < C (the uniform remainder is 0: KL(Ps||Pt) is +inf, the other kinds finite)."""
    s, probs, index = _sparse((3,), 7, 7, device=device)
    for remainder in ("uniform", "ignore"):
        for kind, beta in KINDS:
            _check_against_oracle(backend, s, probs, index, remainder, kind, beta, 1.0)
    # exactly representable probabilities summing to 1 over m = 3 of C = 9 classes
    s = torch.randn(2, 9, device=device)
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.75, 0.125, 0.125]], device=device)
    index = torch.tensor([[4, 0, 8], [2, 7, 3]], device=device)
    for kind, beta in KINDS:
        teacher = SparseTeacher(probs, index, "uniform")
        if _needs_log_pt(kind, beta):
            loss = sk.softmax_divergence(
                s, teacher, kind=kind, beta=beta, reduction="none", backend=backend
            )
            assert torch.all(loss == float("inf")), (kind, beta)
        else:
            _check_against_oracle(backend, s, probs, index, "uniform", kind, beta, 1.0)
            # and the "ignore" remainder, which renormalises a sum that is already 1: the same
            # dense teacher
            _check_against_oracle(backend, s, probs, index, "ignore", kind, beta, 1.0)
    # a student with -inf logits outside the teacher's support: every kind is finite again
    s2 = s.clone()
    outside = torch.ones(2, 9, dtype=torch.bool, device=device).scatter(-1, index, False)
    s2[outside] = float("-inf")
    q = dense_teacher64(probs, index, 9, "uniform")
    teacher = SparseTeacher(probs, index, "uniform")
    for kind, beta in KINDS:
        kw = dict(kind=kind, beta=beta, reduction="none")
        loss, g = sk.softmax_divergence_and_grad(s2, teacher, backend=backend, **kw)
        ref = oracle_rows(s2.double().cpu(), q, kind, beta, 1.0)
        ref_grad = torch.zeros(2, 9, dtype=torch.float64)  # 0 outside the support
        for r, cols in enumerate(index.cpu()):  # autograd on the finite logits of each row
            s64 = s2[r, cols].double().cpu().requires_grad_()
            row = oracle_rows(s64, q[r, cols], kind, beta, 1.0)
            ref_grad[r, cols] = torch.autograd.grad(row, [s64])[0]
        bound = sparse_bounds(backend, device, s2, probs, index, "uniform", kind, beta, 1.0)
        assert_loss_close(loss, ref, bound.loss)
        assert torch.isfinite(g).all() and torch.all(g[outside] == 0), (kind, beta)
        assert_grad_close(g, ref_grad, bound.grad_s, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_inputs_and_int32_index(backend, device):
    """Row-strided student and probs, a transposed leading dim, int32 ids, a teacher summing
    above 1 within the tolerance (normalised away)."""
    base_s = torch.randn(6, 60, device=device) * 2
    s = base_s[:, 5:50]  # row stride 60 > C = 45
    index = torch.stack([torch.randperm(45)[:4] for _ in range(6)]).int().to(device)
    raw = torch.rand(6, 8, device=device)
    raw[:, :4] *= 1.0004 / raw[:, :4].sum(-1, keepdim=True)
    probs = raw[:, :4]  # row stride 8 > m; rows sum to 1 + 4e-4 (within the tolerance)
    _check_against_oracle(backend, s, probs, index, "uniform", "jsd", 0.4, 1.0)
    s3 = base_s.reshape(2, 3, 60).transpose(0, 1)
    p3 = probs.reshape(2, 3, 4).transpose(0, 1)
    i3 = index.reshape(2, 3, 4).transpose(0, 1)
    _check_against_oracle(backend, s3, p3, i3, "ignore", "kl", 0.0, 2.0)


# ----------------------------------------------------------------------------------------------
# validation, the device-side guard, backends, torch.library, modules
# ----------------------------------------------------------------------------------------------


def _teacher(**over):
    probs = torch.tensor([[0.5, 0.2], [0.3, 0.3], [0.6, 0.1]])
    index = torch.tensor([[1, 4], [0, 2], [5, 3]])
    kw = dict(probs=probs, index=index)
    kw.update(over)
    return kw


BAD_CALLS = [
    (dict(index=torch.tensor([[1, 6], [0, 2], [5, 3]])), {}, ValueError, r"row \(0,\).*outside"),
    (dict(index=torch.tensor([[1, 4], [0, -1], [5, 3]])), {}, ValueError, r"row \(1,\).*outside"),
    (dict(index=torch.tensor([[1, 4], [2, 2], [5, 3]])), {}, ValueError, "repeated class ids"),
    (dict(probs=torch.tensor([[0.5, -0.2], [0.3, 0.3], [0.6, 0.1]])), {}, ValueError, "negative"),
    (dict(probs=torch.tensor([[0.5, 0.6], [0.3, 0.3], [0.6, 0.1]])), {}, ValueError, "1.1 > 1"),
    (
        dict(probs=torch.tensor([[0.5, 0.2], [0.0, 0.0], [0.6, 0.1]]), remainder="ignore"),
        {},
        ValueError,
        "summing to 0",
    ),
    (
        dict(probs=torch.rand(3, 7), index=torch.arange(7).expand(3, 7)),
        {},
        ValueError,
        "m=7 entries.*6 classes",
    ),
    (
        dict(probs=torch.rand(4, 2), index=torch.zeros(4, 2, dtype=torch.long)),
        {},
        ValueError,
        "shape mismatch",
    ),
    ({}, dict(teacher_grad=True), ValueError, "teacher_grad"),
    (dict(remainder="ignore"), dict(kind="sym_kl"), ValueError, "sym_kl.*remainder='uniform'"),
    (dict(remainder="ignore"), dict(kind="jsd", beta=1.0), ValueError, "beta=1"),
    ({}, dict(kind="js"), ValueError, "kind"),
    ({}, dict(weight=torch.ones(4)), ValueError, "weight"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("over,kwargs,exc,match", BAD_CALLS)
def test_bad_inputs(backend, over, kwargs, exc, match):
    if backend not in sk.available_backends("cpu"):
        pytest.skip(f"{backend} missing")
    s = torch.randn(3, 6)
    teacher = SparseTeacher(**_teacher(**over))
    with pytest.raises(exc, match=match):
        sk.softmax_divergence(s, teacher, backend=backend, **kwargs)
    with pytest.raises(exc, match=match):
        sk.softmax_divergence_and_grad(s, teacher, backend=backend, **kwargs)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(probs=torch.ones(3, 2, dtype=torch.long)), TypeError, "probs"),
        (dict(index=torch.ones(3, 2)), TypeError, "index"),
        (dict(index=torch.ones(3, 2, dtype=torch.int16)), TypeError, "index"),
        (dict(index=torch.ones(3, 3, dtype=torch.long)), ValueError, "same shape"),
        (
            dict(probs=torch.ones(3, 0), index=torch.ones(3, 0, dtype=torch.long)),
            ValueError,
            "m >= 1",
        ),
        (dict(remainder="spread"), ValueError, "remainder"),
        (dict(validate=1), TypeError, "validate"),
    ],
)
def test_bad_sparse_teacher(over, exc, match):
    with pytest.raises(exc, match=match):
        SparseTeacher(**_teacher(**over))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_device_guard_without_validation(backend, device):
    """validate=False: no host check; each invalid row is NaN (loss and gradient), never an
    out-of-bounds access, and the valid rows are unaffected; masked invalid rows are 0."""
    s, probs, index = _sparse((6,), 11, 3, device=device)
    probs, index = probs.clone(), index.clone()
    index[1, 0] = 11  # out of range
    index[2, 1] = index[2, 2]  # repeated
    probs[3, 0] = -0.1  # negative
    probs[4] = torch.tensor([0.6, 0.5, 0.1])  # sums to 1.2
    teacher = SparseTeacher(probs, index, validate=False)
    good = [0, 5]
    for kind, beta in [("jsd", 0.5), ("kl", 0.0), ("sym_kl", 0.5), ("jsd", 1.0)]:
        kw = dict(kind=kind, beta=beta, reduction="none", backend=backend)
        loss, g = sk.softmax_divergence_and_grad(s, teacher, **kw)
        assert torch.isnan(loss[1:5]).all() and torch.isnan(g[1:5]).all(), (kind, beta)
        ref, gref = sk.softmax_divergence_and_grad(
            s[good], SparseTeacher(probs[good], index[good]), **kw
        )
        torch.testing.assert_close(loss[good], ref)
        torch.testing.assert_close(g[good], gref)
        sg = s.clone().requires_grad_()
        sk.softmax_divergence(sg, teacher, **kw).sum().backward()
        assert torch.isnan(sg.grad[1:5]).all()
        torch.testing.assert_close(sg.grad[good], gref)
        keep = torch.tensor([True, False, False, False, False, True], device=device)
        loss, g = sk.softmax_divergence_and_grad(s, teacher, mask=keep, **kw)
        assert torch.all(loss[1:5] == 0) and torch.all(g[1:5] == 0)
        torch.testing.assert_close(loss[good], ref)
    assert torch.isnan(sk.softmax_divergence(s, teacher, backend=backend))


def test_backend_routing():
    """cpu has no C++ sparse kernel: it (and auto on CPU) runs the reference; cuda runs the
    Triton kernel when triton is usable on that device."""
    cpu = torch.device("cpu")
    assert _sparse_impl("cpu", cpu) == "torch" and _sparse_impl("torch", cpu) == "torch"
    assert _sparse_impl("triton", cpu) == "triton"
    s, probs, index = _sparse((5,), 40, 3)
    teacher = SparseTeacher(probs, index)
    # every backend (and auto) against the independent float64 oracle, not against "torch"
    q = dense_teacher64(probs, index, 40, "uniform")
    rows = oracle_rows(s, q, "jsd", 0.5, 1.0)
    ref = rows.mean()
    for backend in [*sk.available_backends("cpu"), None]:
        bound = sparse_bounds(backend or "cpu", "cpu", s, probs, index, "uniform", "jsd", 0.5, 1)
        got = sk.softmax_divergence(s, teacher, backend=backend)
        assert_loss_close(got, ref, reduced_bound(bound.loss / 5, rows / 5, "mean"), backend)
    with pytest.raises(TypeError, match="float64"):
        sk.softmax_divergence(s.double(), SparseTeacher(probs.double(), index), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        sk.softmax_divergence(s.double(), teacher)
    # float64 end to end on the reference, to the float64 bound
    l64 = sk.softmax_divergence(s.double(), SparseTeacher(probs.double(), index), backend="torch")
    assert l64.dtype == torch.float64
    bound = divergence_bounds(s, None, "jsd", 0.5, 1.0, "torch", logq=q.log(), dtype=l64.dtype)
    u64 = torch.finfo(torch.float64).eps / 2
    assert_within(l64, ref, reduced_bound(bound.loss / 5, rows / 5, "mean", u64) + u64 * ref)


@pytest.mark.skipif("triton" not in sk.available_backends("cpu"), reason="triton missing")
def test_opcheck():
    s, probs, index = _sparse((5,), 33, 4)
    w = torch.rand(5) + 0.5
    m = torch.tensor([True, False, True, True, False])
    tol = reference.sparse_sum_tol(probs.dtype)
    ops = torch.ops.ssld_kernels
    args = (1, 0.5, 0.5, 0.5, 1.0, True, tol, "triton")  # Kernel.flat()
    torch.library.opcheck(ops.divergence_fwd, (s, probs, index, w, m, None, False, *args))
    args0 = (0, 0.0, 0.0, 1.0, 0.5, False, tol, "triton")
    torch.library.opcheck(ops.divergence_fwd, (s, probs, index, None, None, None, False, *args0))
    _, stats, _, _ = ops.divergence_fwd(s, probs, index, w, m, None, False, *args)
    assert stats.shape == (5, 4)
    g = torch.rand(5)
    for need_s in (True, False):  # a skipped gradient is an empty tensor, as the fake says
        torch.library.opcheck(
            ops.divergence_bwd, (s, probs, index, w, m, stats, g, need_s, False, *args)
        )
    torch.library.opcheck(ops.divergence_fwd, (s, probs, index.int(), w, m, g, False, *args0))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    if backend not in sk.available_backends("cpu"):
        pytest.skip(f"{backend} missing")
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    x = torch.randn(8, 16)
    _, probs, index = _sparse((8,), 10, 3)

    def step(x, probs, index):  # validate=True (the default) skips its host check when compiling
        teacher = SparseTeacher(probs, index)
        return sk.softmax_divergence(model(x), teacher, kind="jsd", backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, probs, index)
    loss.backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = step(x, probs, index)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for a, p in zip(g, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_modules_from_logits_and_to_dense():
    s = torch.randn(4, 20, requires_grad=True)
    t = torch.randn(4, 20)
    teacher = SparseTeacher.from_logits(t, 5, temperature=2.0)
    assert teacher.m == 5 and teacher.probs.dtype == torch.float32
    assert teacher.index.dtype == torch.int64
    want_p, want_i = torch.softmax(t / 2.0, -1).topk(5, -1)
    torch.testing.assert_close(teacher.probs, want_p)
    assert torch.equal(teacher.index, want_i)
    dense = teacher.to_dense(20)
    torch.testing.assert_close(dense.double(), dense_teacher64(want_p, want_i, 20, "uniform"))
    torch.testing.assert_close(dense.sum(-1), torch.ones(4))
    for module, kw in [
        (sk.JSDLoss(beta=0.3, temperature=2.0), dict(kind="jsd", beta=0.3)),
        (sk.SymmetricKLLoss(temperature=2.0), dict(kind="sym_kl")),
        (sk.KLDivLoss(reduction="sum", temperature=2.0), dict(kind="kl", reduction="sum")),
    ]:
        torch.testing.assert_close(
            module(s, teacher), sk.softmax_divergence(s, teacher, temperature=2.0, **kw)
        )
    sk.JSDLoss(temperature=2.0)(s, teacher).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="m must be"):
        SparseTeacher.from_logits(t, 21)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    s = torch.randn(0, 10, device=device, requires_grad=True)
    teacher = SparseTeacher(
        torch.rand(0, 3, device=device), torch.zeros(0, 3, dtype=torch.long, device=device)
    )
    for reduction in ("mean", "sum", "batchmean"):
        loss = sk.softmax_divergence(s, teacher, reduction=reduction, backend=backend)
        assert loss.item() == 0.0
        loss.backward()
        assert s.grad.shape == s.shape
    loss, g = sk.softmax_divergence_and_grad(s.detach(), teacher, backend=backend)
    assert loss.item() == 0.0 and g.shape == (0, 10)
    assert sk.softmax_divergence(s, teacher, reduction="none", backend=backend).shape == (0,)
