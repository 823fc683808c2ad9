"""Fused softmax-divergence loss: every backend against float64 oracles.

Tolerances are error bounds of the float32 computation, derived in tests/_helpers.py
(divergence_bounds): per row for the loss, per element for the gradient, plus the rounding of
the gradient's storage dtype. They hold whatever the instruction set (tests/test_cpu_isa.py
runs these tests under every PyTorch CPU capability and every variant of the C++ kernels).
"""

import pytest
import torch
from _helpers import (
    assert_grad_close,
    assert_loss_close,
    backend_params,
    careful_loss_bound,
    divergence_bounds,
    naive_divergence_rows,
    prob_divergence_rows,
    reduced_bound,
)

import ssld_kernels as sk

SHAPES_C = [2, 10, 1000, 1001, 32768]
ROWS = {2: 7, 10: 13, 1000: 9, 1001: 5, 32768: 3, 131072: 2}
# Input dtypes: widened exactly and computed in float32 (the loss is float32-accurate); the
# gradient is stored in the input dtype, whose rounding assert_grad_close adds to the bound.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = [("jsd", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0), ("sym_kl", 0.5), ("kl", 0.0)]
BACKENDS = backend_params()


def _logits(n, c, dtype, device, scale=3.0):
    return (torch.randn(n, c, dtype=torch.float64) * scale).to(dtype).to(device)


def _oracle_grads(s, t, kind, beta, temperature, weight_rows=None, teacher=False):
    """Float64 rows and the gradients of sum_r weight_rows[r] * rows[r] (autograd)."""
    s64 = s.detach().double().cpu().requires_grad_()
    t64 = t.detach().double().cpu().requires_grad_(teacher)
    rows = naive_divergence_rows(s64, t64, kind, beta, temperature)
    w = torch.ones_like(rows) if weight_rows is None else weight_rows.double().cpu()
    gs, *gt = torch.autograd.grad((rows * w).sum(), [s64, t64] if teacher else [s64])
    return rows.detach(), gs, (gt[0] if teacher else None)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", SHAPES_C)
@pytest.mark.parametrize("kind,beta", KINDS)
def test_matches_float64_oracle(backend, device, dtype, c, kind, beta):
    """Per-row loss and gradient (grad_output != 1) against an independent float64 autograd."""
    n = ROWS[c]
    temperature = 1.0 if c != 10 else 2.5
    s = _logits(n, c, dtype, device).requires_grad_()
    t = _logits(n, c, dtype, device)
    loss = sk.softmax_divergence(
        s, t, kind=kind, beta=beta, temperature=temperature, reduction="none", backend=backend
    )
    go = torch.rand(n, dtype=torch.float64) + 0.5
    ref, ref_grad, _ = _oracle_grads(s, t, kind, beta, temperature, go)
    bound = divergence_bounds(s, t, kind, beta, temperature, backend)
    assert loss.shape == (n,) and loss.dtype == torch.float32
    assert_loss_close(loss, ref, bound.loss)
    loss.backward(go.to(loss.dtype).to(device))
    assert s.grad.dtype == dtype and s.grad.shape == s.shape
    assert_grad_close(s.grad, ref_grad, bound.grad_s * go[:, None], backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("kind,beta", [("jsd", 0.5), ("sym_kl", 0.5), ("kl", 0.0)])
def test_reductions_weight_mask_and_fused_grad(backend, device, reduction, kind, beta):
    """Reductions, per-row weight and mask; the fused path equals autograd's gradient."""
    lead, c = (3, 4), 37
    s = _logits(12, c, torch.float32, device).reshape(*lead, c)
    t = _logits(12, c, torch.float32, device).reshape(*lead, c)
    w = (torch.rand(lead, dtype=torch.float32) + 0.5).to(device)
    m = torch.rand(lead) > 0.3
    m[0, 0] = True
    m = m.to(device)
    kw = dict(kind=kind, beta=beta, temperature=1.5, reduction=reduction, weight=w, mask=m)
    sg = s.clone().requires_grad_()
    loss = sk.softmax_divergence(sg, t, backend=backend, **kw)
    # oracle: masked rows are 0; the mean divides by the unmasked count
    keep = m.cpu().reshape(-1).double()
    count = keep.sum()
    scale = w.double().cpu().reshape(-1) * keep / (1 if reduction in ("none", "sum") else count)
    rows = naive_divergence_rows(s.reshape(-1, c), t.reshape(-1, c), kind, beta, 1.5) * scale
    ref = rows.reshape(lead) if reduction == "none" else rows.sum()
    bound = divergence_bounds(s, t, kind, beta, 1.5, backend)
    loss_bound = reduced_bound(bound.loss * scale.abs(), rows, reduction)
    assert_loss_close(loss, ref, loss_bound.reshape(ref.shape))
    go = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    loss.backward(go.float().to(device))
    row_go = (go.reshape(-1) if reduction == "none" else go.expand(12)) * scale
    _, ref_grad, _ = _oracle_grads(s.reshape(-1, c), t.reshape(-1, c), kind, beta, 1.5, row_go)
    grad_bound = bound.grad_s * row_go.abs()[:, None]
    assert_grad_close(sg.grad.reshape(-1, c), ref_grad, grad_bound, backend=backend)
    # fused loss + gradient (gradient of loss.sum() for "none")
    fl, fg = sk.softmax_divergence_and_grad(s, t, backend=backend, **kw)
    assert_loss_close(fl, ref, loss_bound.reshape(ref.shape))
    _, ref_grad, _ = _oracle_grads(s.reshape(-1, c), t.reshape(-1, c), kind, beta, 1.5, scale)
    assert fg.shape == s.shape
    assert_grad_close(
        fg.reshape(-1, c), ref_grad, bound.grad_s * scale.abs()[:, None], backend=backend
    )
    assert torch.all(fg.cpu()[~m.cpu()] == 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_teacher_grad(backend, device):
    s = _logits(6, 50, torch.float32, device).requires_grad_()
    t = _logits(6, 50, torch.float32, device).requires_grad_()
    for kind, beta in [("jsd", 0.3), ("sym_kl", 0.5), ("kl", 0.0), ("jsd", 1.0)]:
        s.grad = t.grad = None
        sk.softmax_divergence(
            s, t, kind=kind, beta=beta, teacher_grad=True, backend=backend
        ).backward()
        mean = torch.full((6,), 1 / 6, dtype=torch.float64)
        _, ref_s, ref_t = _oracle_grads(s, t, kind, beta, 1.0, mean, teacher=True)
        bound = divergence_bounds(s, t, kind, beta, 1.0, backend)
        assert_grad_close(s.grad, ref_s, bound.grad_s / 6, "student", backend=backend)
        assert_grad_close(t.grad, ref_t, bound.grad_t / 6, "teacher", backend=backend)
        loss, gs, gt = sk.softmax_divergence_and_grad(
            s.detach(), t.detach(), kind=kind, beta=beta, teacher_grad=True, backend=backend
        )
        assert_grad_close(gs, ref_s, bound.grad_s / 6, "fused student", backend=backend)
        assert_grad_close(gt, ref_t, bound.grad_t / 6, "fused teacher", backend=backend)
    # without teacher_grad the teacher gets nothing
    s.grad = t.grad = None
    sk.softmax_divergence(s, t, backend=backend).backward()
    assert t.grad is None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_scipy_jensenshannon(backend, device):
    scipy_spatial = pytest.importorskip("scipy.spatial.distance")
    s = _logits(5, 101, torch.float32, device)
    t = _logits(5, 101, torch.float32, device)
    loss = sk.softmax_divergence(s, t, kind="jsd", beta=0.5, reduction="none", backend=backend)
    p = torch.softmax(s.double().cpu(), -1).numpy()
    q = torch.softmax(t.double().cpu(), -1).numpy()
    ref = [scipy_spatial.jensenshannon(p[i], q[i]) ** 2 for i in range(5)]
    bound = divergence_bounds(s, t, "jsd", 0.5, 1.0, backend)
    assert_loss_close(loss, torch.tensor(ref, dtype=torch.float64), bound.loss)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "sdtype,tdtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
        (torch.float16, torch.bfloat16),
    ],
)
def test_mixed_dtypes(backend, device, sdtype, tdtype):
    s = _logits(4, 300, sdtype, device).requires_grad_()
    t = _logits(4, 300, tdtype, device)
    loss = sk.softmax_divergence(s, t, backend=backend)
    mean = torch.full((4,), 0.25, dtype=torch.float64)
    rows, ref_grad, _ = _oracle_grads(s, t, "jsd", 0.5, 1.0, mean)
    bound = divergence_bounds(s, t, "jsd", 0.5, 1.0, backend)
    assert_loss_close(loss, rows.mean(), reduced_bound(bound.loss / 4, rows / 4, "mean"))
    loss.backward()
    assert s.grad.dtype == sdtype
    assert_grad_close(s.grad, ref_grad, bound.grad_s / 4, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_and_leading_dims(backend, device):
    base_s = _logits(10, 90, torch.float32, device)
    base_t = _logits(10, 90, torch.float32, device)
    cases = [
        (base_s[:, :77], base_t[:, 3:80]),  # row stride > C
        (base_s[::2, :50], base_t[1::2, 10:60]),  # strided rows
        (base_s.reshape(2, 5, 90).transpose(0, 1), base_t.reshape(2, 5, 90).transpose(0, 1)),
        (base_s.t()[:40, :10].t(), base_t.t()[:40, :10].t()),  # class dim not unit-stride
    ]
    for s, t in cases:
        sg = s.clone().requires_grad_()
        got = sk.softmax_divergence(sg, t, kind="sym_kl", reduction="none", backend=backend)
        c = s.shape[-1]
        ref, ref_grad, _ = _oracle_grads(s.reshape(-1, c), t.reshape(-1, c), "sym_kl", 0.5, 1.0)
        bound = divergence_bounds(s, t, "sym_kl", 0.5, 1.0, backend)
        assert got.shape == s.shape[:-1]
        assert_loss_close(got.reshape(-1), ref, bound.loss)
        got.sum().backward()
        assert_grad_close(sg.grad.reshape(-1, c), ref_grad, bound.grad_s, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind,beta", [("jsd", 0.5), ("jsd", 0.3), ("sym_kl", 0.5)])
def test_near_identical_rows_relative_accuracy(backend, device, kind, beta):
    """Student within ~1e-3 of the teacher: the loss is ~1e-7 and stays accurate relative to
    itself, to the bound of an evaluation without cancellation (careful_loss_bound: <= 15%
    of the loss here; the naive evaluation is off by 40%). KL alone is not held to this: its
    value carries the rounding of log-sum-exp(t) - log-sum-exp(s) (~1e-7 absolute), as any
    fp32 log-softmax."""
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(8, 500, dtype=torch.float64, generator=gen) * 3).float()
    s = (t.double() + 1e-3 * torch.randn(8, 500, dtype=torch.float64, generator=gen)).float()
    ref = naive_divergence_rows(s.double(), t.double(), kind, beta, 1.0)
    assert ref.max() < 1e-6
    loss = sk.softmax_divergence(
        s.to(device), t.to(device), kind=kind, beta=beta, reduction="none", backend=backend
    )
    bound = careful_loss_bound(s, t, kind, beta, backend)
    assert (bound < 0.15 * ref).all()  # the bound is a relative accuracy
    assert_loss_close(loss, ref, bound)


def _masked_oracle(s, t, keep, kind, beta):
    """Rows and gradient of loss.sum() over the classes ``keep`` only (the others -inf in
    both): the oracle on the kept columns, the gradient scattered back (0 elsewhere)."""
    rows, g, _ = _oracle_grads(s[:, keep], t[:, keep], kind, beta, 1.0)
    full = torch.zeros(s.shape, dtype=torch.float64)
    full[:, keep] = g
    return rows, full


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_edge_values(backend, device):
    c = 64
    s = _logits(6, c, torch.float32, device)
    t = _logits(6, c, torch.float32, device)
    # identical rows: exactly zero loss and gradient, for every kind and beta
    for kind, beta in KINDS:
        loss, g = sk.softmax_divergence_and_grad(
            s, s.clone(), kind=kind, beta=beta, backend=backend
        )
        assert loss.item() == 0.0 and torch.all(g == 0), (kind, beta)
    # -inf in the same classes of student and teacher (masked vocabulary): finite and correct
    s2, t2 = s.clone(), t.clone()
    s2[:, 10:20] = float("-inf")
    t2[:, 10:20] = float("-inf")
    keep = torch.cat([torch.arange(0, 10), torch.arange(20, c)])
    for kind, beta in KINDS:
        loss, g = sk.softmax_divergence_and_grad(
            s2, t2, kind=kind, beta=beta, reduction="none", backend=backend
        )
        ref, ref_grad = _masked_oracle(s.cpu(), t.cpu(), keep, kind, beta)
        bound = divergence_bounds(s2, t2, kind, beta, 1.0, backend)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
        assert_loss_close(loss, ref, bound.loss)
        assert torch.all(g[:, 10:20] == 0)
        assert_grad_close(g, ref_grad, bound.grad_s, "fused", backend=backend)
        # the autograd path (forward stats + one-pass backward) is as accurate as the fused one
        sg = s2.clone().requires_grad_()
        sk.softmax_divergence(
            sg, t2, kind=kind, beta=beta, reduction="sum", backend=backend
        ).backward()
        assert torch.isfinite(sg.grad).all()
        assert_grad_close(sg.grad, ref_grad, bound.grad_s, "autograd", backend=backend)
    # teacher puts zero mass where the student has some: JSD and KL(Pt||Ps) stay finite
    # (scipy's rel_entr is the independent check of the values, the xlogy oracle of the
    # gradients); KL(Ps||Pt) is +inf
    special = pytest.importorskip("scipy.special")
    t3 = t.clone()
    t3[:, :5] = float("-inf")
    p = torch.softmax(s.double().cpu(), -1).numpy()
    q = torch.softmax(t3.double().cpu(), -1).numpy()
    m = 0.5 * (p + q)
    expected = {
        ("jsd", 0.5): 0.5 * special.rel_entr(q, m).sum(-1) + 0.5 * special.rel_entr(p, m).sum(-1),
        ("kl", 0.0): special.rel_entr(q, p).sum(-1),
        ("jsd", 0.0): special.rel_entr(q, p).sum(-1),
    }
    for (kind, beta), want in expected.items():
        sg = s.clone().requires_grad_()
        loss = sk.softmax_divergence(
            sg, t3, kind=kind, beta=beta, reduction="none", backend=backend
        )
        bound = divergence_bounds(s, t3, kind, beta, 1.0, backend)
        assert_loss_close(loss, torch.from_numpy(want), bound.loss)
        loss.sum().backward()
        _, g = sk.softmax_divergence_and_grad(
            s, t3, kind=kind, beta=beta, reduction="sum", backend=backend
        )
        s64 = s.double().cpu().requires_grad_()
        rows = prob_divergence_rows(s64, torch.from_numpy(q), kind, beta, 1.0)
        (ref_grad,) = torch.autograd.grad(rows.sum(), [s64])
        assert torch.isfinite(sg.grad).all() and torch.isfinite(g).all()
        assert_grad_close(sg.grad, ref_grad, bound.grad_s, "autograd", backend=backend)
        assert_grad_close(g, ref_grad, bound.grad_s, "fused", backend=backend)
    for kind, beta in [("jsd", 1.0), ("sym_kl", 0.5)]:
        loss = sk.softmax_divergence(s, t3, kind=kind, beta=beta, reduction="none", backend=backend)
        assert torch.all(loss == float("inf"))
    # huge logits do not overflow; checked against the float64 composition of _helpers (not
    # the library's reference), to the bound of the analysis at |logits| <= 1e4
    big = s * 1e4 / s.abs().max()
    bigt = t * 1e4 / t.abs().max()
    for kind, beta in KINDS:
        loss, g = sk.softmax_divergence_and_grad(
            big, bigt, kind=kind, beta=beta, reduction="none", backend=backend
        )
        ref, ref_grad, _ = _oracle_grads(big, bigt, kind, beta, 1.0)
        bound = divergence_bounds(big, bigt, kind, beta, 1.0, backend)
        assert torch.isfinite(g).all()
        assert_loss_close(loss, ref, bound.loss)
        assert_grad_close(g, ref_grad, bound.grad_s, "fused", backend=backend)
        # backward from the saved stats is as accurate as the fused pass at this magnitude
        sg = big.clone().requires_grad_()
        sk.softmax_divergence(
            sg, bigt, kind=kind, beta=beta, reduction="sum", backend=backend
        ).backward()
        assert_grad_close(sg.grad, ref_grad, bound.grad_s, "autograd", backend=backend)
    # NaN in -> NaN out (never a silent 0); other rows unaffected
    s4 = s.clone()
    s4[2, 7] = float("nan")
    loss, g = sk.softmax_divergence_and_grad(s4, t, reduction="none", backend=backend)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()
    assert torch.isnan(g[2]).all()
    for kind, beta in KINDS:  # the teacher's gradient of a NaN row is NaN too, never 0
        _, _, gt = sk.softmax_divergence_and_grad(
            s4, t, kind=kind, beta=beta, reduction="none", teacher_grad=True, backend=backend
        )
        assert torch.isnan(gt[2]).all() and torch.isfinite(gt[[0, 1, 3, 4, 5]]).all(), (kind, beta)
    assert torch.isnan(sk.softmax_divergence(s4, t, backend=backend))
    t4 = t.clone()
    t4[1, 0] = float("nan")
    assert torch.isnan(sk.softmax_divergence(s, t4, reduction="none", backend=backend)[1])
    # masked NaN rows are exactly 0 with 0 gradient
    m = torch.ones(6, dtype=torch.bool, device=device)
    m[2] = False
    loss, g = sk.softmax_divergence_and_grad(s4, t, mask=m, reduction="none", backend=backend)
    assert loss[2] == 0 and torch.all(g[2] == 0) and torch.isfinite(g).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    s = torch.randn(0, 10, device=device, requires_grad=True)
    t = torch.randn(0, 10, device=device)
    for reduction in ("mean", "sum", "batchmean"):
        loss = sk.softmax_divergence(s, t, reduction=reduction, backend=backend)
        assert loss.item() == 0.0
        loss.backward()
        assert s.grad.shape == s.shape
    loss, g = sk.softmax_divergence_and_grad(s.detach(), t, backend=backend)
    assert loss.item() == 0.0 and g.shape == (0, 10)
    assert sk.softmax_divergence(s, t, reduction="none", backend=backend).shape == (0,)
    # all rows masked: mean is 0, not NaN
    s2 = torch.randn(3, 10, device=device)
    m = torch.zeros(3, dtype=torch.bool, device=device)
    assert sk.softmax_divergence(s2, s2 + 1, mask=m, backend=backend).item() == 0.0


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_float64(backend):
    if backend not in sk.available_backends("cpu"):
        pytest.skip(f"{backend} backend missing")
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    for kind, beta in KINDS:
        fn = lambda a, b, kind=kind, beta=beta: sk.softmax_divergence(
            a,
            b,
            kind=kind,
            beta=beta,
            temperature=1.7,
            weight=w,
            teacher_grad=True,
            reduction="none",
            backend=backend,
        )
        assert torch.autograd.gradcheck(fn, (s, t))


def test_modules():
    s = torch.randn(4, 20, requires_grad=True)
    t = torch.randn(4, 20)
    torch.testing.assert_close(sk.JSDLoss(beta=0.3)(s, t), sk.softmax_divergence(s, t, beta=0.3))
    torch.testing.assert_close(
        sk.SymmetricKLLoss(temperature=2.0)(s, t),
        sk.softmax_divergence(s, t, kind="sym_kl", temperature=2.0),
    )
    torch.testing.assert_close(
        sk.KLDivLoss(reduction="sum")(s, t), sk.softmax_divergence(s, t, kind="kl", reduction="sum")
    )
    assert "beta=0.3" in repr(sk.JSDLoss(beta=0.3))
    with pytest.raises(ValueError, match="beta"):
        sk.JSDLoss(beta=1.5)
    with pytest.raises(ValueError, match="reduction"):
        sk.KLDivLoss(reduction="avg")


@pytest.mark.parametrize("kind,beta", [("jsd", 0.5), ("kl", 0.0)])
def test_cpu_backend_very_wide_rows(kind, beta):
    """C = 131072 on the C++ backend (chunked rows, many threads), fp32 and bf16."""
    if "cpu" not in sk.available_backends("cpu"):
        pytest.skip("cpu backend missing")
    for dtype in (torch.float32, torch.bfloat16):
        s = _logits(2, 131072, dtype, "cpu").requires_grad_()
        t = _logits(2, 131072, dtype, "cpu")
        loss = sk.softmax_divergence(s, t, kind=kind, beta=beta, reduction="none", backend="cpu")
        ref, ref_grad, _ = _oracle_grads(s, t, kind, beta, 1.0)
        bound = divergence_bounds(s, t, kind, beta, 1.0, "cpu")
        assert_loss_close(loss, ref, bound.loss)
        loss.sum().backward()
        assert_grad_close(s.grad, ref_grad, bound.grad_s, backend="cpu")
