"""ssld_kernels.reference (the torch backend): gradients of far-apart distributions, the
autograd wiring of its closed-form gradients (weight, mask, double backward, sparse teacher).

Issue 15: the torch backend differentiated log M = log p + log1p(w expm1(-|d|)) (+ max(d, 0))
by autograd, whose backward of expm1 forms expm1(-|d|) + 1 and rounds e^-|d| away once
|d| = |log q - log p| >~ 10 in float32. On the rows below (logits +-30 apart) its JSD
gradients were 65-455x their error bound, whole rows of ~1e-10 gradients came out 0; the
closed-form backward (reference._ClosedFormRows) keeps them below 0.017 of it."""

import pytest
import torch
from _helpers import (
    U32,
    assert_grad_close,
    assert_loss_close,
    divergence_bounds,
    naive_divergence_rows,
    prob_divergence_rows,
)

import ssld_kernels as sk
from ssld_kernels import reference

SHAPES = [(6, 37), (5, 1000)]
KINDS = [("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9), ("sym_kl", 0.5), ("kl", 0.5)]
TEMPERATURES = [1.0, 2.0]


def _far_apart(n: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (n, c) student and teacher logits, one-hot-ish (+-30 on one class, noise
    elsewhere) at different classes: their log-probabilities differ by 15-60 (and 0-10)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(n)
    s = torch.randn(n, c, dtype=torch.float64, generator=gen)
    t = torch.randn(n, c, dtype=torch.float64, generator=gen)
    s[rows, rows % c] += 30.0
    t[rows, (5 * rows + 3) % c] += 30.0
    t[::2] = -t[::2]  # every other teacher row: one class far *below* the others
    return s, t


def _oracle_grads(s, t, kind, beta, temperature, go):
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    rows = naive_divergence_rows(s64, t64, kind, beta, temperature)
    gs, gt = torch.autograd.grad((rows * go).sum(), [s64, t64])
    return rows.detach(), gs, gt


@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_far_apart_rows_float32_gradients(n, c, kind, beta, temperature):
    """float32 torch backend vs the float64 oracle where |log p - log q| reaches 15-60:
    loss, student and teacher gradients within the float32 bounds, grad_output != 1."""
    s64, t64 = _far_apart(n, c)
    d = (torch.log_softmax(s64 / temperature, -1) - torch.log_softmax(t64 / temperature, -1)).abs()
    assert d.max() > 15.0  # the regime of the issue
    s = s64.float().requires_grad_()
    t = t64.float().requires_grad_()
    go = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    loss = sk.softmax_divergence(
        s, t, kind=kind, beta=beta, temperature=temperature, reduction="none",
        teacher_grad=True, backend="torch",
    )  # fmt: skip
    gs, gt = torch.autograd.grad(loss, [s, t], go.float())
    ref, rs, rt = _oracle_grads(s64, t64, kind, beta, temperature, go)
    bound = divergence_bounds(s, t, kind, beta, temperature, "torch")
    assert_loss_close(loss, ref, bound.loss)
    assert_grad_close(gs, rs, bound.grad_s * go[:, None], "grad student")
    assert_grad_close(gt, rt, bound.grad_t * go[:, None], "grad teacher")
    # the fused entry point runs the same closed form
    _, fs, ft = sk.softmax_divergence_and_grad(
        s.detach(), t.detach(), kind=kind, beta=beta, temperature=temperature,
        reduction="sum", teacher_grad=True, backend="torch",
    )  # fmt: skip
    _, us, ut = _oracle_grads(s64, t64, kind, beta, temperature, torch.ones(n))
    assert_grad_close(fs, us, bound.grad_s, "fused grad student")
    assert_grad_close(ft, ut, bound.grad_t, "fused grad teacher")


@pytest.mark.parametrize("kind,beta", KINDS)
def test_far_apart_sparse_teacher_float32_gradient(kind, beta):
    """The sparse-teacher torch path, with all C of a far-apart teacher's probabilities (in
    float32, shuffled; entries down to e^-60): only the normalisation by their float32 sum
    S (<= (C + 2) u relative) separates its Q from the oracle's."""
    n, c = 5, 37
    s64, t64 = _far_apart(n, c, seed=2)
    probs, index = torch.softmax(t64, -1).float().topk(c, -1)
    teacher = sk.SparseTeacher(probs, index)
    s = s64.float().requires_grad_()
    loss = sk.softmax_divergence(
        s, teacher, kind=kind, beta=beta, reduction="none", backend="torch"
    )
    (gs,) = torch.autograd.grad(loss.sum(), [s])
    q = torch.zeros(n, c, dtype=torch.float64).scatter(-1, index, probs.double())
    q = q / q.sum(-1, keepdim=True)
    s_ref = s64.clone().requires_grad_()
    ref = prob_divergence_rows(s_ref, q, kind, beta, 1.0)
    (rs,) = torch.autograd.grad(ref.sum(), [s_ref])
    rel = torch.full((n,), (c + 2) * U32, dtype=torch.float64)
    bound = divergence_bounds(s, None, kind, beta, 1.0, "torch", logq=q.log(), teacher_rel_err=rel)
    assert_loss_close(loss, ref, bound.loss)
    assert_grad_close(gs, rs, bound.grad_s, "grad student")


def test_weight_mask_and_double_backward_float64():
    """The closed-form Function keeps the reference fully differentiable in float64: logits
    (first and second order), the row weights, and masked rows (exact 0, even when NaN)."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(4, 9, dtype=torch.float64, generator=gen).requires_grad_()
    t = torch.randn(4, 9, dtype=torch.float64, generator=gen).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    mask = torch.tensor([True, False, True, True])
    for kind, beta in KINDS:
        spec = reference.make_spec(kind, beta, 1.5)

        def fn(s, t, w, spec=spec):
            return reference.divergence_rows(spec, s, t, w, mask)

        assert torch.autograd.gradcheck(fn, (s, t, w))
        assert torch.autograd.gradgradcheck(fn, (s, t, w))
    s_nan = s.detach().clone()
    s_nan[1] = float("nan")
    s_nan.requires_grad_()
    rows = reference.divergence_rows(reference.make_spec(), s_nan, t, w, mask)
    gs, gt, gw = torch.autograd.grad(rows.sum(), [s_nan, t, w])
    assert rows[1] == 0 and torch.all(gs[1] == 0) and torch.all(gt[1] == 0) and gw[1] == 0
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


def test_sparse_probs_requiring_grad_are_refused():
    s = torch.randn(2, 10)
    probs = torch.tensor([[0.5, 0.2], [0.6, 0.1]], requires_grad=True)
    index = torch.tensor([[1, 4], [0, 9]])
    with pytest.raises(ValueError, match="probs"):
        reference.sparse_divergence_rows(reference.make_spec(), s, probs, index)
    with torch.no_grad():
        reference.sparse_divergence_rows(reference.make_spec(), s, probs, index)


def test_torch_func_transforms_and_forward_ad():
    """The closed-form Function keeps the reference usable under torch.func (grad, vmap for
    per-sample gradients) and forward-mode AD, as plain PyTorch ops were: gradcheck with
    forward AD and batched gradients, and vmap(grad) against per-row autograd."""
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(4, 9, dtype=torch.float64, generator=gen).requires_grad_()
    t = torch.randn(4, 9, dtype=torch.float64, generator=gen).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    mask = torch.tensor([True, False, True, True])
    probs, index = torch.softmax(t.detach(), -1).topk(3, -1)
    for kind, beta in KINDS:
        spec = reference.make_spec(kind, beta, 1.5)

        def dense(s, t, w, spec=spec):
            return reference.divergence_rows(spec, s, t, w, mask)

        def sparse(s, w, spec=spec):
            return reference.sparse_divergence_rows(spec, s, probs, index, "uniform", w, mask)

        for fn, args in ((dense, (s, t, w)), (sparse, (s, w))):
            assert torch.autograd.gradcheck(
                fn, args, check_forward_ad=True, check_batched_grad=True
            )

        def one_row(a, b, spec=spec):  # a row's loss, differentiated by torch.func
            return reference.divergence_rows(spec, a[None], b[None])[0]

        per_row = torch.func.vmap(torch.func.grad(one_row))(s.detach(), t.detach())
        rows = reference.divergence_rows(spec, s, t)
        (expected,) = torch.autograd.grad(rows.sum(), s)  # rows are independent
        torch.testing.assert_close(per_row, expected, rtol=1e-12, atol=1e-14)
