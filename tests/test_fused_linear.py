"""fused_linear_divergence against a float64 eager composition with materialised logits.

The oracle: logits = h @ W.T + b, scale, softcap, then the row losses of
tests/_helpers.naive_divergence_rows (log_softmax + kl_div + logsumexp of the mixture, written
independently of ssld_kernels) plus F.cross_entropy, masked and reduced, differentiated by
autograd in float64.

Tolerances (error analysis; u = 2^-24 for float32):
  float32: each logit is a length-H dot product accumulated in float32 (|error| <= gamma_H
  times the sum of |h_i W_i|, gamma_n = n u / (1 - n u)); the kernel's row sums (softmax
  normaliser, the sums A and B) run over V float32 terms (gamma_V relative); the hidden-state
  gradient G @ W is a length-V sum (gamma_V) and the weight gradient a sum over the N rows
  (gamma_N). The inputs are scaled so logits are O(1): the sums of absolute terms are within a
  small factor of the results, so each stage adds at most ~n u relative error and the total is
  below TOL32 = 8 (H + V + N) u (8 covers the few elementwise roundings: scale, tanh, exp, log,
  T^2, and that factor). Entries that cancel to ~0 get the same bound times the tensor's
  largest magnitude (atol).
  bfloat16 autocast (unit roundoff 2^-9): the reference is evaluated on the bfloat16-rounded
  hidden states and weights (what autocast feeds the GEMMs), so what remains is the rounding
  of each logit to bfloat16 (|dz| <= 2^-9 |z|), of the logit gradient (2^-9 relative) and of
  the bf16 GEMM outputs (2^-9 relative). The loss moves by at most sum |dL/dz| |dz| over both
  sides (computed from the float64 gradients); the gradients by 2^-9 (3 + 2 max|z| / T)
  relative (the logit gradient is Lipschitz in z with constant <= 2/T relative to its size).
  float64 (cpu and torch backends): 1e-9 relative, the same analysis with u = 2^-53 and margin.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import naive_divergence_rows
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ssld_kernels as sk
from ssld_kernels._backends import backend_status
from ssld_kernels.fused_linear import auto_chunk_size

# (lead shape, H, H', V, chunk): N not a multiple of the chunk, a single chunk, exact multiple
SHAPES = [((37,), 24, 40, 131, 10), ((3, 5), 16, 16, 67, None), ((32,), 8, 12, 300, 16)]
DTYPES = [(torch.float64, 1e-9, 1e-9)]  # float32 / bfloat16 bounds are computed (docstring)
KINDS = [("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0), ("jsd", 0.3), ("sym_kl", 0.5), ("kl", 0.5)]
U32, U_BF16 = 2.0**-24, 2.0**-9
SYNCS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "item", "allclose", "unique"}


def _backends(names=("cpu", "torch")):
    out = []
    for b in names:
        ok, why = backend_status("cpu")[b]
        out.append(pytest.param(b, marks=pytest.mark.skipif(not ok, reason=str(why))))
    return out


def _inputs(lead, h, h2, v, dtype=torch.float64, bias=True, seed=0, ignore_every=3):
    """Hidden states, heads and labels with logits of O(1) (|z| below ~5)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = {
        "student_hidden": rnd(*lead, h),
        "student_weight": rnd(v, h, scale=1.5 / math.sqrt(h)),
        "student_bias": rnd(v, scale=0.5) if bias else None,
        "teacher_hidden": rnd(*lead, h2),
        "teacher_weight": rnd(v, h2, scale=2.0 / math.sqrt(h2)),
        "teacher_bias": rnd(v, scale=0.5) if bias else None,
    }
    labels = torch.randint(0, v, lead, generator=gen)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return x, labels


def _grad_leaves(x):
    return {k: x[k].detach().clone().requires_grad_(True) for k in STUDENT if x[k] is not None}


STUDENT = ("student_hidden", "student_weight", "student_bias")


def eager_loss(x, labels=None, mask=None, *, kind="jsd", beta=0.5, temperature=1.0,
               reduction="batchmean", num_items_in_batch=None, ce_weight=0.0,
               student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None,
               teacher_softcap=None, ignore_index=-100, return_logits=False):  # fmt: skip
    """The float64 composition with materialised (N, V) logits."""
    d = {k: (None if t is None else t.double()) for k, t in x.items()}

    def head(side, scale, cap):
        z = d[f"{side}_hidden"] @ d[f"{side}_weight"].T
        if d[f"{side}_bias"] is not None:
            z = z + d[f"{side}_bias"]
        z = z * scale
        return cap * torch.tanh(z / cap) if cap else z

    zs = head("student", student_logit_scale, student_softcap)
    zt = head("teacher", teacher_logit_scale, teacher_softcap)
    lead = zs.shape[:-1]
    rows = naive_divergence_rows(zs, zt, kind, beta, temperature)
    valid = torch.ones(lead, dtype=torch.bool)
    if labels is not None:
        valid = valid & (labels != ignore_index)
    if mask is not None:
        valid = valid & mask
    if ce_weight:
        ce = F.cross_entropy(
            zs.reshape(-1, zs.shape[-1]), labels.reshape(-1).clamp(min=0), reduction="none"
        )
        rows = rows + ce_weight * ce.reshape(lead)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    elif num_items_in_batch is not None:
        out = rows.sum() / float(num_items_in_batch)
    else:
        out = rows.sum() / valid.sum().clamp(min=1)
    return (out, zs, zt) if return_logits else out


def _run(x, labels, grad_out=None, **kw):
    """(loss, {name: grad}) of fused_linear_divergence."""
    leaves = _grad_leaves(x)
    args = {**x, **leaves}
    loss = sk.fused_linear_divergence(
        args.pop("student_hidden"), args.pop("student_weight"), args.pop("teacher_hidden"),
        args.pop("teacher_weight"), labels=labels, **args, **kw,
    )  # fmt: skip
    g = torch.ones_like(loss) if grad_out is None else grad_out
    grads = torch.autograd.grad(loss, list(leaves.values()), g)
    return loss.detach(), dict(zip(leaves, grads))


def _ref(x, labels, grad_out=None, **kw):
    kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "backend")}
    leaves = {k: v.double() for k, v in _grad_leaves(x).items()}
    leaves = {k: v.detach().requires_grad_(True) for k, v in leaves.items()}
    loss = eager_loss({**x, **leaves}, labels, **kw)
    g = torch.ones_like(loss) if grad_out is None else grad_out.double()
    grads = torch.autograd.grad(loss, list(leaves.values()), g)
    return loss.detach(), dict(zip(leaves, grads))


def _close(got, want, rtol, atol_rel=None):
    """assert_close with atol = atol_rel (default rtol) times the reference's largest entry."""
    scale = want.abs().max().item() if want.numel() else 0.0
    atol = (rtol if atol_rel is None else atol_rel) * max(scale, 1e-30)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


def _check(x, labels, backend, dtype_tol, grad_out=None, **kw):
    loss, grads = _run(x, labels, grad_out, backend=backend, **kw)
    ref, ref_grads = _ref(x, labels, grad_out, **kw)
    _close(loss, ref, dtype_tol)
    for k, g in grads.items():
        assert g.dtype == x[k].dtype and g.shape == x[k].shape, k
        _close(g, ref_grads[k], dtype_tol)
    return loss, grads


def _tol32(x):
    h, v = x["student_weight"].shape[1], x["student_weight"].shape[0]
    n = x["student_hidden"].numel() // x["student_hidden"].shape[-1]
    return 8 * (h + v + n) * U32


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_matches_eager_float64(backend, shape, kind, beta, dtype, atol, rtol):
    lead, h, h2, v, chunk = shape
    x, labels = _inputs(lead, h, h2, v, dtype)
    _check(x, labels, backend, rtol, kind=kind, beta=beta, temperature=1.7, chunk_size=chunk)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("backend", _backends(("cpu", "torch", "triton")))
@pytest.mark.parametrize("kind,beta", [("jsd", 0.5), ("kl", 0.5)])
def test_float32_within_error_bound(backend, kind, beta):
    lead, h, h2, v, chunk = SHAPES[0] if backend != "triton" else ((13,), 8, 12, 40, 5)
    x, labels = _inputs(lead, h, h2, v, torch.float32)
    _check(x, labels, backend, _tol32(x), kind=kind, beta=beta, temperature=2.0, chunk_size=chunk,
           ce_weight=0.25, student_softcap=4.0)  # fmt: skip


OPTION_CASES = {
    "no-bias": dict(bias=False),
    "temperature": dict(temperature=3.0),
    "scale": dict(student_logit_scale=0.7, teacher_logit_scale=1.6),
    "softcap": dict(student_softcap=3.0, teacher_softcap=2.5),
    "scale+softcap": dict(student_logit_scale=1.8, student_softcap=2.0, teacher_softcap=5.0),
    "ce": dict(ce_weight=0.5),
    "ce-only-beta1": dict(ce_weight=1.0, beta=1.0),
    "everything": dict(temperature=0.8, ce_weight=0.3, student_logit_scale=1.2,
                       student_softcap=3.5, teacher_logit_scale=0.9, teacher_softcap=6.0),
}  # fmt: skip


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", OPTION_CASES)
def test_options(backend, case):
    kw = dict(OPTION_CASES[case])
    x, labels = _inputs((29,), 12, 20, 97, bias=kw.pop("bias", True))
    _check(x, labels, backend, 1e-9, chunk_size=8, **kw)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("ignored", ["none", "some", "all", "mask", "mask+labels"])
def test_ignored_rows(backend, ignored):
    x, labels = _inputs((23,), 10, 14, 53, ignore_every=0)
    mask = None
    if ignored == "some":
        labels[[0, 5, 6, 22]] = -100
    elif ignored == "all":
        labels[:] = -100
    elif ignored.startswith("mask"):
        mask = torch.arange(23) % 4 != 1
        if ignored == "mask+labels":
            labels[[0, 1, 2]] = -100
        else:
            labels = None
    loss, grads = _check(x, labels, backend, 1e-9, mask=mask, ce_weight=0.5 if labels is not None
                         else 0.0, chunk_size=7)  # fmt: skip
    if ignored == "all":
        assert loss.item() == 0.0
        assert all(g.abs().max().item() == 0.0 for g in grads.values())
    if ignored == "some":  # ignored rows get exactly 0 hidden-state gradient
        assert grads["student_hidden"][[0, 5, 6, 22]].abs().max().item() == 0.0


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_reductions_and_grad_output(backend, reduction):
    """A random per-row incoming gradient for "none" (the backward runs the chunks again) and
    an incoming gradient != 1 for the scalar reductions."""
    x, labels = _inputs((4, 7), 9, 11, 61)
    g = (
        torch.rand(4, 7, dtype=torch.float64) + 0.5
        if reduction == "none"
        else torch.tensor(2.5, dtype=torch.float64)
    )
    loss, _ = _check(x, labels, backend, 1e-9, grad_out=g, reduction=reduction, chunk_size=6,
                     ce_weight=0.2)  # fmt: skip
    assert loss.shape == ((4, 7) if reduction == "none" else ())


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("as_tensor", [False, True])
def test_gradient_accumulation_num_items(backend, as_tensor):
    """Two micro-batches, each divided by the whole batch's count, sum to the batch's mean;
    their gradients sum to the batch's gradients."""
    x, labels = _inputs((40,), 12, 16, 71, ignore_every=3)
    total = int((labels != -100).sum())
    num = torch.tensor(total) if as_tensor else total
    kw = dict(kind="jsd", beta=0.3, temperature=1.5, ce_weight=0.1, backend=backend)
    whole, whole_grads = _run(x, labels, chunk_size=16, **kw)
    parts = []
    for sl in (slice(0, 17), slice(17, 40)):
        xs = {k: (t[sl] if k.endswith("hidden") else t) for k, t in x.items()}
        parts.append(_run(xs, labels[sl], num_items_in_batch=num, chunk_size=16, **kw))
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole, rtol=1e-12, atol=1e-14)
    for k in ("student_weight", "student_bias"):
        got = parts[0][1][k] + parts[1][1][k]
        torch.testing.assert_close(got, whole_grads[k], rtol=1e-10, atol=1e-14)
    hid = torch.cat([parts[0][1]["student_hidden"], parts[1][1]["student_hidden"]])
    torch.testing.assert_close(hid, whole_grads["student_hidden"], rtol=1e-10, atol=1e-14)
    ref = eager_loss(x, labels, kind="jsd", beta=0.3, temperature=1.5, ce_weight=0.1)
    torch.testing.assert_close(whole, ref, rtol=1e-9, atol=0)


def _check_bf16_bound(loss, grads, x, labels, kw):
    """The autocast bound of the module docstring: the float64 reference on the bf16-rounded
    inputs (what autocast feeds the GEMMs); loss within 2 sum |dL/dz| 2^-9 |z| over both sides,
    gradients within 2^-9 (3 + 2 max|z| / T) relative."""
    for k, g in grads.items():  # gradients in the parameters' dtypes
        assert g.dtype == x[k].dtype, k
    xr = {k: (None if t is None else t.detach().cpu().bfloat16().double()) for k, t in x.items()}
    leaves = {k: xr[k].requires_grad_(True) for k in STUDENT if xr[k] is not None}
    xr["teacher_weight"].requires_grad_(True)  # for dL/dz_t (the teacher's logits round too)
    kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "backend")}
    ref, zs, zt = eager_loss(xr, labels.cpu(), return_logits=True, **kw)
    zs.retain_grad()
    zt.retain_grad()
    ref.backward()
    bound = U_BF16 * ((zs.grad.abs() * zs.abs()).sum() + (zt.grad.abs() * zt.abs()).sum())
    assert abs(loss.item() - ref.item()) <= 2 * bound.item(), (loss.item(), ref.item(), bound)
    zmax = max(zs.abs().max().item(), zt.abs().max().item())
    rtol = U_BF16 * (3 + 2 * zmax / kw.get("temperature", 1.0))
    for k, g in grads.items():
        _close(g.cpu(), leaves[k].grad, rtol)


@pytest.mark.parametrize("backend", _backends())
def test_bf16_autocast_within_rounding_bound(backend):
    x, labels = _inputs((45,), 32, 48, 150, torch.float32)
    kw = dict(kind="jsd", beta=0.5, temperature=1.5, chunk_size=16, ce_weight=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _run(x, labels, backend=backend, **kw)
    _check_bf16_bound(loss, grads, x, labels, kw)


@pytest.mark.parametrize("backend", _backends())
def test_mixed_dtypes_bf16_teacher(backend):
    """A bfloat16 teacher with a float32 student (no autocast): each side's GEMM in its own
    dtype, the kernel reads both."""
    x, labels = _inputs((21,), 12, 16, 64, torch.float32)
    for k in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        x[k] = x[k].bfloat16()
    loss, grads = _run(x, labels, backend=backend, chunk_size=8)
    xt = dict(x)
    for k in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        xt[k] = x[k].double()
    # the teacher's logits are rounded to bf16 by its GEMM: bound as in the autocast test
    ref, grads_ref = _ref(xt, labels)
    assert abs(loss.item() - ref.item()) < 8 * U_BF16 * ref.item() + _tol32(x)
    for k, g in grads.items():
        _close(g, grads_ref[k], 16 * U_BF16)


@pytest.mark.parametrize("backend", _backends())
def test_no_grad_and_partial_grads(backend):
    """Under no_grad only the loss is computed; a frozen head weight (requires_grad False) gets
    no gradient while the hidden states still do."""
    x, labels = _inputs((19,), 8, 8, 33)
    ref = eager_loss(x, labels)
    with torch.no_grad():
        loss = sk.fused_linear_divergence(
            x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
            labels=labels, student_bias=x["student_bias"], teacher_bias=x["teacher_bias"],
            backend=backend,
        )  # fmt: skip
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    h = x["student_hidden"].clone().requires_grad_(True)
    loss = sk.fused_linear_divergence(
        h, x["student_weight"], x["teacher_hidden"], x["teacher_weight"], labels=labels,
        student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], backend=backend,
    )  # fmt: skip
    (gh,) = torch.autograd.grad(loss, h)
    _, ref_grads = _ref(x, labels)
    torch.testing.assert_close(gh, ref_grads["student_hidden"], rtol=1e-9, atol=1e-14)


def test_module_matches_function():
    x, labels = _inputs((2, 9), 10, 12, 45)
    kw = dict(temperature=2.0, ce_weight=0.5, student_softcap=4.0, chunk_size=5, backend="cpu")
    fn = sk.FusedLinearJSD(beta=0.2, **kw)
    assert "beta=0.2" in repr(fn)
    args = (x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"])
    bias = dict(student_bias=x["student_bias"], teacher_bias=x["teacher_bias"])
    got = fn(*args, labels, **bias)
    want = sk.fused_linear_divergence(*args, labels=labels, beta=0.2, **bias, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    gen = sk.FusedLinearDivergence(kind="kl", temperature=2.0, backend="cpu")(*args, labels, **bias)
    torch.testing.assert_close(gen, eager_loss(x, labels, kind="kl", temperature=2.0))


# ----------------------------------------------------------------------------------------------
# hot-path properties: no host sync, no (N, V) tensor, torch.compile, custom op
# ----------------------------------------------------------------------------------------------


class _Recorder(TorchDispatchMode):
    """Records every ATen op and the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.ops, self.largest = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", ["labels-mean", "num-items-tensor", "none", "sum-mask"])
def test_no_host_sync_and_no_logits_tensor(backend, case):
    """Forward and backward dispatch nothing that reads a value back to the host, and no op
    returns a tensor larger than one (chunk, V) block (N = 60 rows in chunks of 8)."""
    n, h, h2, v, chunk = 60, 6, 7, 89, 8
    x, labels = _inputs((n,), h, h2, v, torch.float32)
    kw = dict(chunk_size=chunk, backend=backend, ce_weight=0.3)
    g = torch.tensor(1.5)
    if case == "num-items-tensor":
        kw["num_items_in_batch"] = torch.tensor(100)
    elif case == "none":
        kw["reduction"] = "none"
        g = torch.rand(n)
    elif case == "sum-mask":
        kw.update(reduction="sum", mask=torch.arange(n) % 3 > 0)
    leaves = _grad_leaves(x)
    rest = {k: t for k, t in x.items() if k not in leaves}
    with _Recorder() as fwd:
        loss = sk.fused_linear_divergence(
            leaves["student_hidden"], leaves["student_weight"], rest["teacher_hidden"],
            rest["teacher_weight"], student_bias=leaves["student_bias"],
            teacher_bias=rest["teacher_bias"], labels=labels, **kw,
        )  # fmt: skip
    with _Recorder() as bwd:
        torch.autograd.grad(loss, list(leaves.values()), g)
    for rec in (fwd, bwd):
        assert not SYNCS.intersection(rec.ops), rec.ops
        assert rec.largest <= max(chunk * v, v * h, n * h), rec.largest
    assert "mm" in fwd.ops or "addmm" in fwd.ops  # the recorder saw the launcher's ops


@pytest.mark.parametrize("fullgraph", [False, True])
def test_torch_compile(fullgraph):
    """Under torch.compile the custom op is traced (fullgraph=True: no graph break) and the
    loss and gradients equal the eager call's."""
    torch._dynamo.reset()
    x, labels = _inputs((17,), 8, 10, 37, torch.float32)
    teacher = (x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"])
    kw = dict(labels=labels, temperature=2.0, ce_weight=0.5, student_softcap=3.0, chunk_size=6,
              backend="cpu")  # fmt: skip

    def step(h, w, b):
        return sk.fused_linear_divergence(h, w, teacher[0], teacher[1], student_bias=b,
                                          teacher_bias=teacher[2], **kw)  # fmt: skip

    leaves = list(_grad_leaves(x).values())
    compiled = torch.compile(step, fullgraph=fullgraph, backend="aot_eager")
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager = step(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_opcheck():
    x, labels = _inputs((11,), 6, 5, 23, torch.float32)
    mask = torch.arange(11) % 4 > 0
    op = torch.ops.ssld_kernels.fused_linear_divergence
    opts = ("jsd", 0.5, 2.0, -100, 0.5, 1.0, 1.3, 1.0, 3.0, 0.0, 4, torch.float32,
            torch.float32, "cpu")  # fmt: skip
    t = (x["student_hidden"], x["student_weight"], x["student_bias"], x["teacher_hidden"],
         x["teacher_weight"], x["teacher_bias"])  # fmt: skip
    factor = torch.tensor(0.25)
    torch.library.opcheck(op, (*t, labels, mask, None, factor, *opts, True, True, True))
    torch.library.opcheck(op, (*t, labels, None, torch.rand(11), None, *opts, True, False, False))


def test_retain_graph_second_backward_raises_and_no_double_backward():
    x, labels = _inputs((9,), 6, 6, 21)
    leaves = _grad_leaves(x)
    loss = sk.fused_linear_divergence(
        leaves["student_hidden"], leaves["student_weight"], x["teacher_hidden"],
        x["teacher_weight"], labels=labels, backend="cpu",
    )  # fmt: skip
    torch.autograd.grad(loss, leaves["student_hidden"], retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(loss, leaves["student_hidden"])
    loss = sk.fused_linear_divergence(
        leaves["student_hidden"], leaves["student_weight"], x["teacher_hidden"],
        x["teacher_weight"], labels=labels, backend="cpu",
    )  # fmt: skip
    (g,) = torch.autograd.grad(loss, leaves["student_hidden"], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), leaves["student_weight"])


def test_auto_chunk_size():
    # max(N*H/V, 256 CPU / 1024 GPU) rows, bounded by 32 MiB / 1 GiB float32 (chunk, V) blocks
    assert auto_chunk_size(2048, 1024, 32000, "cpu") == 256
    assert auto_chunk_size(65536, 4096, 32000, "cpu") == 256  # 32 MiB / (4 * 32000) -> 262
    assert auto_chunk_size(2048, 1024, 256000, "cpu") == 32  # the byte bound
    assert auto_chunk_size(8192, 4096, 128256, "cuda") == 1024
    assert auto_chunk_size(2**20, 4096, 32000, "cuda") == 8384  # 1 GiB / (4 * 32000) = 8388
    assert auto_chunk_size(10, 4096, 1000, "cuda") == 10  # at most N
    for n, h, v, dev in [(5000, 768, 50257, "cpu"), (10**6, 8192, 256000, "cuda")]:
        c = auto_chunk_size(n, h, v, dev)
        assert 1 <= c <= n and c * v * 4 <= (1 << 30 if dev == "cuda" else 32 << 20)


BAD = {
    "student_weight H": (dict(student_weight=torch.randn(13, 5)), ValueError, "student_weight"),
    "teacher_weight H'": (dict(teacher_weight=torch.randn(13, 5)), ValueError, "teacher_weight"),
    "vocab mismatch": (dict(teacher_weight=torch.randn(14, 6)), ValueError, "teacher_weight has V"),
    "rows mismatch": (dict(teacher_hidden=torch.randn(8, 6)), ValueError, "teacher_hidden"),
    "labels shape": (dict(labels=torch.zeros(8, dtype=torch.long)), ValueError, "labels"),
    "labels dtype": (dict(labels=torch.zeros(7)), TypeError, "labels"),
    "mask dtype": (dict(mask=torch.ones(7, dtype=torch.long)), TypeError, "mask"),
    "mask shape": (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
    "hidden dtype": (dict(student_hidden=torch.zeros(7, 4, dtype=torch.long)), TypeError,
                     "student_hidden"),
    "weight dtype": (dict(student_weight=torch.randn(13, 4, dtype=torch.bfloat16)), TypeError,
                     "student_weight"),
    "float64 mix": (dict(student_weight=torch.randn(13, 4, dtype=torch.float64)), TypeError,
                    "float64"),
    "weight 1-D": (dict(student_weight=torch.randn(13)), ValueError, "student_weight"),
    "bias shape": (dict(student_bias=torch.randn(12)), ValueError, "student_bias"),
    "kind": (dict(kind="js"), ValueError, "kind"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction"),
    "beta": (dict(beta=1.5), ValueError, "beta"),
    "temperature": (dict(temperature=0.0), ValueError, "temperature"),
    "ce without labels": (dict(ce_weight=0.5, labels=None), ValueError, "ce_weight"),
    "negative ce": (dict(ce_weight=-1.0), ValueError, "ce_weight"),
    "softcap": (dict(student_softcap=-2.0), ValueError, "student_softcap"),
    "chunk": (dict(chunk_size=0), ValueError, "chunk_size"),
    "num_items with sum": (dict(num_items_in_batch=4, reduction="sum"), ValueError,
                           "num_items_in_batch"),
    "num_items shape": (dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch"),
    "not a tensor": (dict(teacher_hidden=[1.0]), TypeError, "teacher_hidden"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_the_argument(case):
    override, exc, match = BAD[case]
    kw = dict(
        student_hidden=torch.randn(7, 4), student_weight=torch.randn(13, 4),
        teacher_hidden=torch.randn(7, 6), teacher_weight=torch.randn(13, 6),
        labels=torch.zeros(7, dtype=torch.long),
    )  # fmt: skip
    kw.update(override)
    pos = [kw.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden",
                               "teacher_weight")]  # fmt: skip
    with pytest.raises(exc, match=match):
        sk.fused_linear_divergence(*pos, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("kind,beta", [("jsd", 0.5), ("kl", 0.5)])
def test_cuda_bf16_autocast(backend, kind, beta):
    """GPU: cuBLAS GEMMs under bf16 autocast (the weight gradient accumulated in float32 by
    the GEMM where torch offers out_dtype) with the cuda/triton kernels; bound as on the CPU."""
    x, labels = _inputs((300,), 64, 96, 1000, torch.float32)
    xc = {k: (None if t is None else t.cuda()) for k, t in x.items()}
    kw = dict(kind=kind, beta=beta, temperature=1.3, chunk_size=128, ce_weight=0.2,
              student_softcap=8.0)  # fmt: skip
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = _run(xc, labels.cuda(), backend=backend, **kw)
    _check_bf16_bound(loss.cpu(), grads, xc, labels, kw)
