"""The hot path by construction: what the divergence loss dispatches besides its kernel.

A CUDA-graph capture (tests/test_divergence_cuda_graphs.py) needs a GPU; these tests check the
same properties on the CPU by recording every ATen op that the public functions dispatch
(the kernels themselves are not ATen ops): the forward is the kernel plus one reduction, the
backward is the kernel alone (one launch per direction, the mean's 1/n folded into the
coefficients), nothing reads a value back to the host, and nothing is allocated beyond the
outputs. They also check that the eager path (an autograd.Function calling the launchers) and
the custom ops that torch.compile traces give the same losses and gradients.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ssld_kernels as sk
from ssld_kernels._backends import backend_status

# ops that neither compute nor allocate (no kernel launch on a GPU)
VIEWS = {"view", "expand", "detach", "reshape", "_unsafe_view", "alias", "as_strided", "t"}
ALLOCS = {"empty", "new_empty", "empty_like", "empty_strided"}
# ops that read device memory back to the host
SYNCS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "item", "allclose", "unique"}


_IN_KERNEL = [0]  # > 0 while the Triton interpreter runs a kernel (it copies tensors)


@pytest.fixture(autouse=True)
def _hide_interpreter_ops(monkeypatch):
    """Ops the Triton interpreter dispatches to emulate a launch are not the launcher's."""
    try:
        from triton.runtime.interpreter import GridExecutor
    except ImportError:
        return
    run = GridExecutor.__call__

    def call(self, *args, **kwargs):
        _IN_KERNEL[0] += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            _IN_KERNEL[0] -= 1

    monkeypatch.setattr(GridExecutor, "__call__", call)


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _IN_KERNEL[0]:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def compute(self):
        return [o for o in self.ops if o not in VIEWS and o not in ALLOCS]

    @property
    def allocs(self):
        return [o for o in self.ops if o in ALLOCS]


def _backends():
    out = []
    for b in ("cpu", "triton"):
        ok, why = backend_status("cpu")[b]
        out.append(pytest.param(b, marks=pytest.mark.skipif(not ok, reason=str(why))))
    return out


def _record(fn):
    with Recorder() as r:
        out = fn()
    return r, out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kind", ["jsd", "sym_kl", "kl"])
@pytest.mark.parametrize("chunked", [False, True], ids=["row-once", "chunked"])
def test_one_launch_per_direction(backend, kind, chunked):
    """Where the fused kernel reads each row once (cpu; triton when the row fits a chunk) the
    forward of a loss that will be differentiated is that kernel plus one reduction and the
    backward one in-place scale of the gradient it kept; otherwise (triton with chunked rows)
    the forward is the loss kernel plus the reduction and the backward one kernel from the
    row statistics. Without gradients the forward is the loss kernel plus the reduction."""
    if chunked and backend != "triton":
        pytest.skip("only the triton launch can be forced to chunk a row")
    from ssld_kernels._tune_table import forced_launch_config

    s = torch.randn(6, 37, requires_grad=True)
    t = torch.randn(6, 37)
    grad = torch.ones(())
    with forced_launch_config("triton", {"block": 16} if chunked else {}):
        sk.softmax_divergence(s, t, kind=kind, backend=backend).backward()  # warm caches
        sk.softmax_divergence_and_grad(s.detach(), t, kind=kind, backend=backend)  # (its unit)
        fwd, loss = _record(lambda: sk.softmax_divergence(s, t, kind=kind, backend=backend))
        bwd, (gs,) = _record(lambda: torch.autograd.grad(loss, s, grad))
        with torch.no_grad():
            inf, _ = _record(lambda: sk.softmax_divergence(s, t, kind=kind, backend=backend))
        fused, (loss2, gs2) = _record(
            lambda: sk.softmax_divergence_and_grad(s.detach(), t, kind=kind, backend=backend)
        )
    if chunked:
        assert fwd.compute == ["mean"], fwd.ops  # the loss kernel, then one reduction
        assert len(fwd.allocs) == 2, fwd.ops  # row_loss and the (n, 6) row statistics
        assert bwd.compute == [], bwd.ops  # the backward kernel alone
        assert bwd.allocs == ["empty"], bwd.ops  # the gradient
    else:
        assert fwd.compute == ["sum"], fwd.ops  # the fused kernel (rows carry 1/n), a sum
        assert len(fwd.allocs) == 3, fwd.ops  # row_loss, row statistics, gradient
        assert bwd.compute == ["mul_"], bwd.ops  # the kept gradient times the incoming one
        assert bwd.allocs == [], bwd.ops
    assert inf.compute == ["mean"] and len(inf.allocs) == 2, inf.ops
    assert fused.compute == ["sum"], fused.ops  # the rows already carry the mean's 1/n
    assert len(fused.allocs) == 3, fused.ops  # row_loss, row statistics, gradient
    torch.testing.assert_close(loss2, loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gs2, gs, rtol=1e-6, atol=1e-8)


def test_retained_graph_second_backward():
    """A second backward through a retained graph (the kept gradient was scaled in place by
    the first) runs the fused kernel again and gives the same bits."""
    s = torch.randn(5, 40, requires_grad=True)
    t = torch.randn(5, 40)
    loss = sk.softmax_divergence(s, t, backend="cpu", reduction="sum")
    (g1,) = torch.autograd.grad(loss, s, torch.tensor(2.0), retain_graph=True)
    g1 = g1.clone()
    (g2,) = torch.autograd.grad(loss, s, torch.tensor(2.0))
    torch.testing.assert_close(g2, g1, rtol=0, atol=0)
    (ref,) = torch.autograd.grad(sk.softmax_divergence(s, t, backend="torch", reduction="sum"), s)
    torch.testing.assert_close(g1, 2 * ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_no_host_sync(backend, reduction, with_mask):
    torch.manual_seed(0)
    s = torch.randn(2, 3, 29, requires_grad=True)
    t = torch.randn(2, 3, 29, requires_grad=True)
    w = torch.rand(2, 3)
    m = torch.tensor([[True, False, True], [True, True, False]]) if with_mask else None
    for call in (
        lambda: sk.softmax_divergence(
            s, t, reduction=reduction, weight=w, mask=m, teacher_grad=True, backend=backend
        ),
        lambda: sk.softmax_divergence_and_grad(
            s, t, reduction=reduction, weight=w, mask=m, teacher_grad=True, backend=backend
        )[0],
    ):
        rec, loss = _record(call)
        assert not SYNCS.intersection(rec.ops), rec.ops
        if loss.requires_grad:
            g = torch.rand_like(loss)
            rec, _ = _record(lambda loss=loss, g=g: torch.autograd.grad(loss, (s, t), g))
            assert not SYNCS.intersection(rec.ops), rec.ops


@pytest.mark.parametrize("backend", _backends())
def test_sparse_teacher_no_host_sync(backend):
    if backend != "triton":
        pytest.skip("the sparse-teacher kernel is Triton's (cpu runs the torch reference)")
    s = torch.randn(5, 50, requires_grad=True)
    teacher = sk.SparseTeacher.from_logits(torch.randn(5, 50), m=7, validate=False)
    rec, loss = _record(lambda: sk.softmax_divergence(s, teacher, backend=backend))
    assert rec.compute == ["mean"], rec.ops
    grad = torch.ones(())
    rec, _ = _record(lambda: torch.autograd.grad(loss, s, grad))
    assert rec.compute == [] and rec.allocs == ["empty"], rec.ops


def _op_path(s, t, kw, monkeypatch):
    """The loss through the custom ops (what torch.compile traces): the same autograd
    Function with the traced runner, for forward and backward."""
    from ssld_kernels.divergence import _autograd

    with monkeypatch.context() as mp:
        mp.setattr(_autograd, "runner", lambda x: _autograd._Traced)
        return sk.softmax_divergence(s, t, teacher_grad=True, **kw)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("kind", ["jsd", "kl"])
def test_eager_path_matches_custom_ops(backend, reduction, with_mask, kind, monkeypatch):
    """Folding the mean into the coefficients and reading the incoming gradient through a
    stride-0 view give the ops' results (random incoming gradients for reduction='none')."""
    torch.manual_seed(1)
    n, c = 9, 41
    s = (torch.randn(n, c) * 3).requires_grad_(True)
    t = (torch.randn(n, c) * 3).requires_grad_(True)
    w = torch.rand(n) + 0.5
    m = torch.rand(n) > 0.4 if with_mask else None
    kw = dict(kind=kind, temperature=2.0, reduction=reduction, weight=w, mask=m, backend=backend)
    eager = sk.softmax_divergence(s, t, teacher_grad=True, **kw)
    ref = _op_path(s, t, kw, monkeypatch)
    assert type(ref.grad_fn).__name__ == "DivergenceFunctionBackward"
    torch.testing.assert_close(eager, ref, rtol=1e-6, atol=1e-7)
    g = torch.rand_like(eager) + 0.5
    ge = torch.autograd.grad(eager, (s, t), g)
    gr = torch.autograd.grad(ref, (s, t), g, retain_graph=True)
    for a, b in zip(ge, gr):  # (the eager path may scale a kept gradient: other rounding)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    # the fused call's gradient is that of loss.sum()
    loss, gs, gt = sk.softmax_divergence_and_grad(s, t, teacher_grad=True, **kw)
    gr = torch.autograd.grad(ref, (s, t), torch.ones_like(ref))
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gs, gr[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gt, gr[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("teacher_grad", [False, True])
def test_double_backward_is_refused(teacher_grad):
    """create_graph=True gives gradients that raise when differentiated (never a silently
    missing second-order term), and first-order results are unchanged."""
    s = torch.randn(3, 10, requires_grad=True)
    t = torch.randn(3, 10, requires_grad=True)
    loss = sk.softmax_divergence(s, t, teacher_grad=teacher_grad, backend="cpu")
    grads = torch.autograd.grad(loss, (s, t) if teacher_grad else s, create_graph=True)
    s2, t2 = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
    loss2 = sk.softmax_divergence(s2, t2, teacher_grad=teacher_grad, backend="cpu")
    plain = torch.autograd.grad(loss2, (s2, t2) if teacher_grad else s2)
    for g, p in zip(grads, plain):
        assert g.requires_grad
        torch.testing.assert_close(g.detach(), p, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad((g * g).sum() + (s * s).sum(), s)


def test_tracers_see_the_custom_ops():
    """make_fx (real and fake tracing) and FakeTensorMode go through the custom ops, never
    through the eager Function (which reads data pointers), and leave no fake tensor in the
    eager path's caches."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    s, t = torch.randn(4, 30), torch.randn(4, 30)

    def fused(s, t):
        return sk.softmax_divergence_and_grad(s, t, backend="cpu")

    def loss(s, t):
        return sk.softmax_divergence(s, t, backend="cpu", reduction="sum")

    for mode in ("real", "fake"):
        for fn in (fused, loss):
            gm = make_fx(fn, tracing_mode=mode)(s, t)
            targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            assert any("ssld_kernels" in x for x in targets), (mode, fn.__name__, targets)
    with FakeTensorMode() as fake:
        fs, ft = fake.from_tensor(s), fake.from_tensor(t)
        out = fused(fs, ft)
        assert out[1].shape == s.shape
    want = sk.softmax_divergence_and_grad(s, t, backend="torch")
    got = fused(s, t)  # the real call after the fake one still works
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-8)
    gm = make_fx(fused, tracing_mode="real")(s, t)
    torch.testing.assert_close(gm(s, t)[1], want[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", _backends())
def test_fp16_gradient_survives_loss_scaling(backend):
    """float16 logits under a GradScaler-style loss scale: the gradient is not computed in the
    forward for an incoming gradient of 1 (it would underflow float16 before the scale);
    it matches the float64 reference as the one-rounding path does."""
    gen = torch.Generator().manual_seed(0)
    n = 512
    s = (torch.randn(n, 1000, generator=gen) * 3).half().requires_grad_(True)
    t = (torch.randn(n, 1000, generator=gen) * 3).half()
    (g,) = torch.autograd.grad(sk.softmax_divergence(s, t, backend=backend) * 65536.0, s)
    s64 = s.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad(
        sk.softmax_divergence(s64, t.double(), backend="torch") * 65536.0, s64
    )
    rel_l1 = (g.double() - ref).abs().sum() / ref.abs().sum()
    assert rel_l1 < 1e-3, rel_l1  # the gradient-in-forward path gave 2e-2 to 0.3 here
    assert (g == 0).float().mean() < 0.01


def test_gradient_not_kept_under_saved_tensor_hooks_or_teacher_only():
    """Under saved-tensor hooks (non-reentrant checkpointing, save_on_cpu) and when only the
    teacher needs a gradient, the forward is the loss kernel alone (no kept gradient)."""
    s = torch.randn(6, 37, requires_grad=True)
    t = torch.randn(6, 37)
    with torch.autograd.graph.save_on_cpu():
        rec, loss = _record(lambda: sk.softmax_divergence(s, t, backend="cpu"))
    assert rec.compute == ["mean"] and len(rec.allocs) == 2, rec.ops
    (g,) = torch.autograd.grad(loss, s)
    (ref,) = torch.autograd.grad(sk.softmax_divergence(s, t, backend="torch"), s)
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-8)
    t2 = t.clone().requires_grad_(True)
    rec, loss = _record(
        lambda: sk.softmax_divergence(s.detach(), t2, teacher_grad=True, backend="cpu")
    )
    assert rec.compute == ["mean"] and len(rec.allocs) == 2, rec.ops
    (gt,) = torch.autograd.grad(loss, t2)
    (ref,) = torch.autograd.grad(
        sk.softmax_divergence(s.detach(), t2, teacher_grad=True, backend="torch"), t2
    )
    torch.testing.assert_close(gt, ref, rtol=1e-5, atol=1e-8)
