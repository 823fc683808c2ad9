"""Fused softmax-divergence loss: every backend against float64 oracles."""

import pytest
import torch
from _helpers import backend_params, naive_divergence_rows

import ssld_kernels as sk
from ssld_kernels import reference

SHAPES_C = [2, 10, 1000, 1001, 32768]
ROWS = {2: 7, 10: 13, 1000: 9, 1001: 5, 32768: 3, 131072: 2}
# (dtype, loss rtol, grad rtol): low-precision inputs are upcast exactly and accumulated in
# fp32, so the loss stays fp32-accurate; the gradient is rounded to the input dtype.
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-5, 2e-3),
    (torch.bfloat16, 1e-5, 1.6e-2),
]
KINDS = [("jsd", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0), ("sym_kl", 0.5), ("kl", 0.0)]
BACKENDS = backend_params()


def _logits(n, c, dtype, device, scale=3.0):
    return (torch.randn(n, c, dtype=torch.float64) * scale).to(dtype).to(device)


def _check_grad(got, ref, rtol):
    scale = ref.double().abs().max().item() + 1e-30
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,loss_rtol,grad_rtol", DTYPES, ids=lambda x: str(x))
@pytest.mark.parametrize("c", SHAPES_C)
@pytest.mark.parametrize("kind,beta", KINDS)
def test_matches_float64_oracle(backend, device, dtype, loss_rtol, grad_rtol, c, kind, beta):
    """Per-row loss and gradient (grad_output != 1) against an independent float64 autograd."""
    n = ROWS[c]
    temperature = 1.0 if c != 10 else 2.5
    s = _logits(n, c, dtype, device).requires_grad_()
    t = _logits(n, c, dtype, device)
    loss = sk.softmax_divergence(
        s, t, kind=kind, beta=beta, temperature=temperature, reduction="none", backend=backend
    )
    s64 = s.detach().double().cpu().requires_grad_()
    ref = naive_divergence_rows(s64, t.double().cpu(), kind, beta, temperature)
    assert loss.shape == (n,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=loss_rtol, atol=1e-7)
    go = torch.rand(n, dtype=torch.float64) + 0.5
    loss.backward(go.to(loss.dtype).to(device))
    ref.backward(go)
    assert s.grad.dtype == dtype and s.grad.shape == s.shape
    _check_grad(s.grad.cpu(), s64.grad, grad_rtol)


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
    # oracle
    s64 = s.double().cpu().requires_grad_()
    rows = naive_divergence_rows(s64, t.double().cpu(), kind, beta, 1.5) * w.double().cpu()
    rows = torch.where(m.cpu(), rows, torch.zeros_like(rows))
    if reduction == "none":
        ref = rows
    elif reduction == "sum":
        ref = rows.sum()
    else:
        ref = rows.sum() / m.sum().cpu()
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-7)
    go = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    loss.backward(go.float().to(device))
    ref.backward(go, retain_graph=True)
    _check_grad(sg.grad.cpu(), s64.grad, 1e-5)
    # fused loss + gradient (gradient of loss.sum() for "none")
    fl, fg = sk.softmax_divergence_and_grad(s, t, backend=backend, **kw)
    torch.testing.assert_close(fl.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-7)
    s64.grad = None
    ref.sum().backward() if reduction == "none" else ref.backward()
    assert fg.shape == s.shape
    _check_grad(fg.cpu(), s64.grad, 1e-5)
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
        s64 = s.detach().double().cpu().requires_grad_()
        t64 = t.detach().double().cpu().requires_grad_()
        naive_divergence_rows(s64, t64, kind, beta, 1.0).mean().backward()
        _check_grad(s.grad.cpu(), s64.grad, 1e-5)
        _check_grad(t.grad.cpu(), t64.grad, 1e-5)
        loss, gs, gt = sk.softmax_divergence_and_grad(
            s.detach(), t.detach(), kind=kind, beta=beta, teacher_grad=True, backend=backend
        )
        _check_grad(gs.cpu(), s64.grad, 1e-5)
        _check_grad(gt.cpu(), t64.grad, 1e-5)
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
    torch.testing.assert_close(loss.double().cpu(), torch.tensor(ref), rtol=1e-5, atol=1e-8)


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
    s64 = s.detach().double().cpu().requires_grad_()
    ref = naive_divergence_rows(s64, t.double().cpu(), "jsd", 0.5, 1.0).mean()
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-7)
    loss.backward()
    ref.backward()
    assert s.grad.dtype == sdtype
    _check_grad(s.grad.cpu(), s64.grad, 2e-2 if sdtype == torch.bfloat16 else 2e-3)


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
        s64 = s.double().cpu().requires_grad_()
        ref = naive_divergence_rows(s64, t.double().cpu(), "sym_kl", 0.5, 1.0)
        assert got.shape == s.shape[:-1]
        torch.testing.assert_close(got.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-7)
        got.sum().backward()
        ref.sum().backward()
        _check_grad(sg.grad.cpu(), s64.grad, 1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind,beta", [("jsd", 0.5), ("jsd", 0.3), ("sym_kl", 0.5)])
def test_near_identical_rows_relative_accuracy(backend, device, kind, beta):
    """Student within ~1e-3 of the teacher: the loss is ~1e-7 and stays accurate relative to
    itself (log M - log p is formed from d = log q - log p without cancellation; measured
    <= 2.7e-4 on cpu / triton / torch). KL alone is not held to this: its value carries the
    rounding of log-sum-exp(t) - log-sum-exp(s) (~1e-7 absolute), as any fp32 log-softmax."""
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(8, 500, dtype=torch.float64, generator=gen) * 3).float()
    s = (t.double() + 1e-3 * torch.randn(8, 500, dtype=torch.float64, generator=gen)).float()
    ref = naive_divergence_rows(s.double(), t.double(), kind, beta, 1.0)
    assert ref.max() < 1e-6
    loss = sk.softmax_divergence(
        s.to(device), t.to(device), kind=kind, beta=beta, reduction="none", backend=backend
    )
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-3, atol=0)


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
    for kind, beta in KINDS:
        loss, g = sk.softmax_divergence_and_grad(
            s2, t2, kind=kind, beta=beta, reduction="none", backend=backend
        )
        keep = torch.cat([torch.arange(0, 10), torch.arange(20, c)])
        ref = naive_divergence_rows(s[:, keep].cpu(), t[:, keep].cpu(), kind, beta, 1.0)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
        torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=1e-7)
        assert torch.all(g[:, 10:20] == 0)
        # the autograd path (forward stats + one-pass backward) agrees with the fused one
        sg = s2.clone().requires_grad_()
        sk.softmax_divergence(
            sg, t2, kind=kind, beta=beta, reduction="sum", backend=backend
        ).backward()
        assert torch.isfinite(sg.grad).all()
        _check_grad(sg.grad.cpu(), g.cpu(), 1e-5)
    # teacher puts zero mass where the student has some: JSD and KL(Pt||Ps) stay finite
    # (scipy's rel_entr is the independent check); KL(Ps||Pt) is +inf
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
        torch.testing.assert_close(
            loss.double().cpu(), torch.from_numpy(want), rtol=1e-5, atol=1e-7
        )
        loss.sum().backward()
        _, g = sk.softmax_divergence_and_grad(
            s, t3, kind=kind, beta=beta, reduction="sum", backend=backend
        )
        assert torch.isfinite(sg.grad).all() and torch.isfinite(g).all()
        _check_grad(sg.grad.cpu(), g.cpu(), 1e-5)
    for kind, beta in [("jsd", 1.0), ("sym_kl", 0.5)]:
        loss = sk.softmax_divergence(s, t3, kind=kind, beta=beta, reduction="none", backend=backend)
        assert torch.all(loss == float("inf"))
    # huge logits do not overflow
    big = s * 1e4 / s.abs().max()
    bigt = t * 1e4 / t.abs().max()
    for kind, beta in KINDS:
        loss, g = sk.softmax_divergence_and_grad(
            big, bigt, kind=kind, beta=beta, reduction="none", backend=backend
        )
        ref = reference.divergence_rows(
            reference.make_spec(kind, beta), big.double().cpu(), bigt.double().cpu()
        )
        assert torch.isfinite(g).all()
        torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-4, atol=1e-2)
        # backward from the saved stats is as accurate as the fused pass at this magnitude
        sg = big.clone().requires_grad_()
        sk.softmax_divergence(
            sg, bigt, kind=kind, beta=beta, reduction="sum", backend=backend
        ).backward()
        _check_grad(sg.grad.cpu(), g.cpu(), 1e-5)
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
    for dtype, grad_rtol in [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)]:
        s = _logits(2, 131072, dtype, "cpu").requires_grad_()
        t = _logits(2, 131072, dtype, "cpu")
        loss = sk.softmax_divergence(s, t, kind=kind, beta=beta, reduction="none", backend="cpu")
        s64 = s.detach().double().requires_grad_()
        ref = naive_divergence_rows(s64, t.double(), kind, beta, 1.0)
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
        loss.sum().backward()
        ref.sum().backward()
        _check_grad(s.grad, s64.grad, grad_rtol)
