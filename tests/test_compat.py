"""ssld_kernels.compat against TRL's and Liger-Kernel's own formulas, restated here in float64
(the libraries are not imported; versions mirrored: see ssld_kernels/compat.py).

Tolerances: float64 inputs run the cpu kernel in float64 (1e-10 relative covers its row sums
over V terms, V u64 ~ 1e-14, with a wide margin). float32 inputs: the kernel's float32 row sums
over V terms and the log-softmax of O(1) logits give at most ~8 V u32 relative error
(u32 = 2^-24; as in tests/test_fused_linear.py, 8 covering the few elementwise roundings).
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from ssld_kernels import compat

BETAS = [0.0, 0.5, 1.0, 0.1]
U32 = 2.0**-24


# ----------------------------------------------------------------------------------------------
# the mirrored formulas, float64
# ----------------------------------------------------------------------------------------------


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
                             temperature=1.0, reduction="batchmean", num_items_in_batch=None):  # fmt: skip
    """TRL's GKDTrainer.generalized_jsd_loss (trl/experimental/gkd/gkd_trainer.py @ f2cd577):
    log-probabilities at T, per-element kl_div terms (beta=0: KL(teacher||student), beta=1:
    KL(student||teacher), else beta*KL(t||m) + (1-beta)*KL(s||m) with m the beta-mixture),
    labels == -100 dropped, then the reduction (no T^2)."""
    ls = F.log_softmax(student_logits.double() / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits.double() / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=torch.float64)
        lm = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(lm, lt, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            lm, ls, reduction="none", log_target=True
        )
    mask = None
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        return jsd.sum() / (mask.sum().clamp_min(1) if mask is not None else max(jsd.size(0), 1))
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def liger_jsd(log_q, log_p, shift_labels=None, beta=0.5, ignore_index=-100):
    """Liger's _jsd_kernel + jsd_forward (ops/jsd.py @ ead96b6): X = log_q (student), Y = log_p
    (teacher) taken as log-probabilities; beta=0: P (Y - X); beta=1: Q (X - Y); else
    beta P Y + (1-beta) Q X - M log M with M = beta P + (1-beta) Q; ignored rows 0, the sum
    divided by the number of rows not ignored (BT without labels)."""
    x, y = log_q.double(), log_p.double()
    q, p = x.exp(), y.exp()
    if beta == 0:
        el = p * (y - x)
    elif beta == 1:
        el = q * (x - y)
    else:
        m = beta * p + (1 - beta) * q
        el = beta * p * y + (1 - beta) * q * x - m * torch.log(m)
    rows = el.sum(-1)
    if shift_labels is None:
        return rows.sum() / rows.shape[0]
    keep = shift_labels != ignore_index
    n = keep.sum()
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    return rows.sum() / n if n > 0 else rows.sum()  # no row scaled when all are ignored


def liger_fused_linear_jsd(x_s, w_s, x_t, w_t, shift_labels, jsd_beta, ignore_index, temperature):
    """Liger's fused_linear_jsd_forward (ops/fused_linear_jsd.py @ ead96b6), unchunked:
    log_softmax of the logits over T on both sides, then the JSD above (no T^2)."""
    log_q = F.log_softmax((x_s.double() @ w_s.double().T) / temperature, dim=-1)
    log_p = F.log_softmax((x_t.double() @ w_t.double().T) / temperature, dim=-1)
    return liger_jsd(log_q, log_p, shift_labels, jsd_beta, ignore_index)


def _logits(*shape, dtype=torch.float64, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _labels(lead, v, every=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, lead, generator=gen)
    if every:
        y.view(-1)[::every] = -100
    return y


# ----------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_trl_generalized_jsd_loss(beta, reduction, with_labels):
    s = _logits(2, 7, 53).requires_grad_(True)
    t = _logits(2, 7, 53, seed=1)
    labels = _labels((2, 7), 53) if with_labels else None
    kw = dict(labels=labels, beta=beta, temperature=2.0, reduction=reduction)
    got = compat.generalized_jsd_loss(s, t, **kw)
    want = trl_generalized_jsd_loss(s, t, **kw)
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    g = torch.rand_like(want) + 0.5
    (gs,) = torch.autograd.grad(got, s, g)
    (ws,) = torch.autograd.grad(want, s, g)
    torch.testing.assert_close(gs, ws, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_trl_num_items_in_batch(as_tensor):
    """num_items_in_batch divides the sum whatever the reduction; two micro-batches add up."""
    s = _logits(4, 6, 31).requires_grad_(True)
    t = _logits(4, 6, 31, seed=2)
    labels = _labels((4, 6), 31)
    total = int((labels != -100).sum())
    num = torch.tensor(total) if as_tensor else total
    parts = [
        compat.generalized_jsd_loss(
            s[i : i + 2],
            t[i : i + 2],
            labels[i : i + 2],
            beta=0.3,
            num_items_in_batch=num,
            reduction=red,
        )  # fmt: skip
        for i, red in ((0, "batchmean"), (2, "sum"))
    ]
    whole = trl_generalized_jsd_loss(s, t, labels, beta=0.3)
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-10, atol=0)
    want = trl_generalized_jsd_loss(s[:2], t[:2], labels[:2], beta=0.3, num_items_in_batch=num)
    torch.testing.assert_close(parts[0], want, rtol=1e-10, atol=0)


def test_trl_all_ignored_and_no_labels_denominator():
    """Every row ignored: batchmean 0 (TRL clamps the count), mean NaN (TRL's empty mean);
    without labels batchmean divides by the first dimension (the batch, not B*T)."""
    s, t = _logits(3, 5, 17), _logits(3, 5, 17, seed=3)
    labels = torch.full((3, 5), -100)
    assert compat.generalized_jsd_loss(s, t, labels).item() == 0.0
    assert math.isnan(compat.generalized_jsd_loss(s, t, labels, reduction="mean").item())
    assert math.isnan(trl_generalized_jsd_loss(s, t, labels, reduction="mean").item())
    got = compat.generalized_jsd_loss(s, t)
    torch.testing.assert_close(got, trl_generalized_jsd_loss(s, t), rtol=1e-10, atol=0)
    rows = compat.generalized_jsd_loss(s, t, reduction="sum")
    torch.testing.assert_close(got, rows / 3, rtol=1e-12, atol=0)


def test_trl_float32_bfloat16_and_teacher_grad():
    """float32 within the kernel's bound; bfloat16 logits give a bfloat16 loss (TRL's dtype);
    a teacher that requires grad gets TRL's gradient."""
    s = _logits(6, 9, 211, dtype=torch.float32)
    t = _logits(6, 9, 211, dtype=torch.float32, seed=4).requires_grad_(True)
    got = compat.generalized_jsd_loss(s, t, beta=0.7, temperature=1.5)
    want = trl_generalized_jsd_loss(s, t, beta=0.7, temperature=1.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=8 * 211 * U32, atol=0)
    (gt,) = torch.autograd.grad(got, t)
    (wt,) = torch.autograd.grad(want, t)
    tol = 8 * 211 * U32
    torch.testing.assert_close(gt.double(), wt.double(), rtol=tol, atol=tol * wt.abs().max().item())
    sb, tb = s.bfloat16(), t.detach().bfloat16()
    got = compat.generalized_jsd_loss(sb, tb)
    assert got.dtype == torch.bfloat16
    want = trl_generalized_jsd_loss(sb, tb)
    torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=0)  # one bf16 rounding


def test_trl_staticmethod_assignment():
    """Assigning to a trainer class replaces its staticmethod; the instance call TRL makes
    (keyword arguments through self) works, and the function is callable directly too."""

    class FakeGKDTrainer:  # the shape of TRL's GKDTrainer.compute_loss call
        beta = 0.4

        @staticmethod
        def generalized_jsd_loss(*args, **kwargs):
            raise AssertionError("not replaced")

        def compute_loss(self, s, t, labels, num_items_in_batch=None):
            return self.generalized_jsd_loss(
                student_logits=s, teacher_logits=t, labels=labels, beta=self.beta,
                num_items_in_batch=num_items_in_batch,
            )  # fmt: skip

    FakeGKDTrainer.generalized_jsd_loss = compat.generalized_jsd_loss
    s, t, labels = _logits(2, 5, 23), _logits(2, 5, 23, seed=5), _labels((2, 5), 23)
    got = FakeGKDTrainer().compute_loss(s, t, labels, num_items_in_batch=7)
    want = trl_generalized_jsd_loss(s, t, labels, beta=0.4, num_items_in_batch=7)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(FakeGKDTrainer.generalized_jsd_loss(s, t, labels, 0.4), got * 7 /
                               (labels != -100).sum(), rtol=1e-10, atol=0)  # fmt: skip
    sig = inspect.signature(compat.generalized_jsd_loss)
    assert list(sig.parameters)[:7] == ["student_logits", "teacher_logits", "labels", "beta",
                                        "temperature", "reduction", "num_items_in_batch"]  # fmt: skip
    assert [sig.parameters[k].default for k in ("labels", "beta", "temperature", "reduction",
            "num_items_in_batch")] == [None, 0.5, 1.0, "batchmean", None]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Liger-Kernel
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("labels", ["none", "some", "all"])
def test_liger_jsd(beta, labels):
    """Same loss as Liger's kernel formula; the gradient through log_softmax (the documented
    use: log_q = logits.log_softmax(-1)) equals that of Liger's formula; with respect to log_q
    itself it is Liger's minus exp(log_q) times Liger's row sum (the component log_softmax's
    backward removes)."""
    z = _logits(19, 41).requires_grad_(True)
    log_p = _logits(19, 41, seed=6).log_softmax(-1)
    shift = None if labels == "none" else _labels((19,), 41, every=4)
    if labels == "all":
        shift[:] = -7
    jsd = compat.LigerJSD(beta=beta, ignore_index=-7 if labels == "all" else -100)
    log_q = z.log_softmax(-1)
    got = jsd(log_q, log_p, shift)
    want = liger_jsd(log_q, log_p, shift, beta, jsd.ignore_index)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-15)
    if labels == "all":
        assert got.item() == 0.0
    (gz,) = torch.autograd.grad(got, z, retain_graph=True)
    (wz,) = torch.autograd.grad(want, z, retain_graph=True)
    torch.testing.assert_close(gz, wz, rtol=1e-9, atol=1e-15)
    x = log_q.detach().requires_grad_(True)
    (gx,) = torch.autograd.grad(jsd(x, log_p, shift), x)
    (wx,) = torch.autograd.grad(liger_jsd(x, log_p, shift, beta, jsd.ignore_index), x)
    projected = wx - x.detach().exp() * wx.sum(-1, keepdim=True)
    torch.testing.assert_close(gx, projected, rtol=1e-9, atol=1e-15)


def test_liger_jsd_dtype_and_signature():
    log_q = _logits(8, 30, dtype=torch.float32).log_softmax(-1).bfloat16()
    log_p = _logits(8, 30, dtype=torch.float32, seed=7).log_softmax(-1).bfloat16()
    got = compat.LigerJSD()(log_q, log_p)
    assert got.dtype == torch.bfloat16  # Liger returns loss.to(_input.dtype)
    torch.testing.assert_close(got.double(), liger_jsd(log_q, log_p), rtol=2**-8, atol=0)
    init = inspect.signature(compat.LigerJSD.__init__).parameters
    assert (init["beta"].default, init["ignore_index"].default) == (0.5, -100)
    fwd = inspect.signature(compat.LigerJSD.forward).parameters
    assert list(fwd)[1:4] == ["log_q", "log_p", "shift_labels"]


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.5, 2.5), (1.0, 2.5), (0.1, 1.0)])
@pytest.mark.parametrize("labels", ["none", "some", "all"])
def test_liger_fused_linear_jsd(beta, temperature, labels):
    n, h, h2, v = 27, 12, 20, 83
    xs = _logits(n, h, scale=1.0).requires_grad_(True)
    ws = (_logits(v, h, seed=8, scale=1.0) / math.sqrt(h) * 2).requires_grad_(True)
    xt, wt = _logits(n, h2, seed=9, scale=1.0), _logits(v, h2, seed=10, scale=1.0) / 2
    shift = None if labels == "none" else _labels((n,), v, every=5)
    if labels == "all":
        shift[:] = -100
    fn = compat.LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature, chunk_size=8)
    got = fn(xs, ws, xt, wt, shift)
    want = liger_fused_linear_jsd(xs, ws, xt, wt, shift, beta, -100, temperature)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-15)
    g = torch.tensor(1.7, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (xs, ws), g)
    want_grads = torch.autograd.grad(want, (xs, ws), g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)


def test_liger_fused_linear_jsd_float32_signature_and_defaults():
    n, h, v = 33, 16, 120
    xs = _logits(n, h, dtype=torch.float32, scale=1.0).requires_grad_(True)
    ws = (_logits(v, h, dtype=torch.float32, seed=11, scale=0.5)).requires_grad_(True)
    xt, wt = _logits(n, h, dtype=torch.float32, seed=12), _logits(v, h, dtype=torch.float32,
                                                                  seed=13, scale=0.5)  # fmt: skip
    shift = _labels((n,), v, every=4)
    got = compat.LigerFusedLinearJSD()(xs, ws, xt, wt, shift)
    assert got.dtype == torch.float32
    want = liger_fused_linear_jsd(xs, ws, xt, wt, shift, 0.5, -100, 1.0)
    tol = 8 * (h + v + n) * U32
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=0)
    for a, b in zip(torch.autograd.grad(got, (xs, ws)), torch.autograd.grad(want, (xs, ws))):
        assert a.dtype == torch.float32
        b = b.double()
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * b.abs().max().item())
    init = inspect.signature(compat.LigerFusedLinearJSD.__init__).parameters
    assert [(k, init[k].default) for k in list(init)[1:5]] == [
        ("jsd_beta", 0.5), ("ignore_index", -100), ("temperature", 1.0), ("accum_dtype", None)
    ]  # fmt: skip
    fwd = inspect.signature(compat.LigerFusedLinearJSD.forward).parameters
    assert list(fwd)[1:] == ["student_input", "student_weight", "teacher_input",
                             "teacher_weight", "shift_labels"]  # fmt: skip
    with pytest.raises(ValueError, match="temperature cannot be 0"):
        compat.LigerFusedLinearJSD(temperature=0)


BAD = {
    "trl labels shape": (lambda s, t: compat.generalized_jsd_loss(s, t, torch.zeros(3, 4).long()),
                         ValueError, "labels"),
    "trl labels dtype": (lambda s, t: compat.generalized_jsd_loss(s, t, torch.zeros(2, 4)),
                         TypeError, "labels"),
    "trl shapes": (lambda s, t: compat.generalized_jsd_loss(s, t[:, :3]), ValueError,
                   "teacher_logits"),
    "trl reduction": (lambda s, t: compat.generalized_jsd_loss(s, t, reduction="avg"), ValueError,
                      "reduction"),
    "trl beta": (lambda s, t: compat.generalized_jsd_loss(s, t, beta=2.0), ValueError, "beta"),
    "liger shift_labels": (lambda s, t: compat.LigerJSD()(s, t, torch.zeros(5).long()),
                           ValueError, "shift_labels"),
    "liger beta": (lambda s, t: compat.LigerJSD(beta=-0.1), ValueError, "beta"),
    "fused shift_labels": (lambda s, t: compat.LigerFusedLinearJSD()(
        torch.randn(8, 4), torch.randn(9, 4), torch.randn(8, 4), torch.randn(9, 4),
        torch.zeros(7).long()), ValueError, "labels"),
    "fused vocab": (lambda s, t: compat.LigerFusedLinearJSD()(
        torch.randn(8, 4), torch.randn(9, 4), torch.randn(8, 4), torch.randn(10, 4)),
        ValueError, "teacher_weight"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_the_argument(case):
    call, exc, match = BAD[case]
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    with pytest.raises(exc, match=match):
        call(s.reshape(8, 9) if "liger" in case else s, t.reshape(8, 9) if "liger" in case else t)
