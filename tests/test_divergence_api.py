"""Validation, backend selection, torch.library registration and torch.compile."""

import os
import subprocess
import sys

import pytest
import torch
from _helpers import (
    assert_loss_close,
    divergence_bounds,
    naive_divergence_rows,
    reduced_bound,
)

import ssld_kernels as sk
from ssld_kernels import _backends

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


def _xy(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(kind="js"), ValueError, "kind"),
        (dict(beta=-0.1), ValueError, "beta"),
        (dict(beta=1.5), ValueError, "beta"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="nope"), ValueError, "backend"),
        (dict(weight=torch.ones(5)), ValueError, "weight"),
        (dict(weight=torch.ones(4, dtype=torch.long)), TypeError, "weight"),
        (dict(mask=torch.ones(4)), TypeError, "mask"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    s, t = _xy(4, 10)
    with pytest.raises(exc, match=match):
        sk.softmax_divergence(s, t, **kwargs)
    with pytest.raises(exc, match=match):
        sk.softmax_divergence_and_grad(s, t, **kwargs)


def test_bad_tensors():
    s, t = _xy(4, 10)
    with pytest.raises(ValueError, match=r"class dimension mismatch.*10.*11"):
        sk.softmax_divergence(s, torch.randn(4, 11))
    with pytest.raises(ValueError, match=r"shape mismatch.*\(4, 10\).*\(5, 10\)"):
        sk.softmax_divergence(s, torch.randn(5, 10))
    with pytest.raises(TypeError, match="student_logits.*int64"):
        sk.softmax_divergence(torch.ones(4, 10, dtype=torch.long), t)
    with pytest.raises(TypeError, match="teacher_logits.*Tensor"):
        sk.softmax_divergence(s, [1, 2])
    with pytest.raises(ValueError, match="scalar"):
        sk.softmax_divergence(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(TypeError, match="float64"):
        sk.softmax_divergence(s.double(), t)
    with pytest.raises(ValueError, match="0 classes"):
        sk.softmax_divergence(torch.randn(3, 0), torch.randn(3, 0))
    with pytest.raises(TypeError, match="float64"):
        sk.softmax_divergence(s.double(), t.double(), backend="triton")
    with pytest.raises(RuntimeError, match="cuda"):
        sk.softmax_divergence(s, t, backend="cuda")  # CPU tensors


def test_backend_env_var(monkeypatch):
    s, t = _xy(3, 10)
    monkeypatch.setenv(_backends.ENV_VAR, "torch")
    a = sk.softmax_divergence(s, t)
    monkeypatch.setenv(_backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="backend"):
        sk.softmax_divergence(s, t)
    monkeypatch.delenv(_backends.ENV_VAR)
    torch.testing.assert_close(a, sk.softmax_divergence(s, t))


def test_auto_picks_compiled_cpu_kernel():
    assert "torch" in sk.available_backends()
    if "cpu" in sk.available_backends("cpu"):
        assert _backends.resolve_backend(None, torch.device("cpu"), (torch.float32,)) == "cpu"
    assert _backends.resolve_backend("auto", torch.device("cpu"), (torch.float64,)) in (
        "cpu",
        "torch",
    )


def _op_backends():
    return [b for b in ("cpu", "triton") if b in sk.available_backends("cpu")]


@pytest.mark.parametrize("backend", _op_backends())
def test_opcheck(backend):
    """Schemas, fakes and dispatch of the private ops. They carry no autograd formula of their
    own: gradients come from the one autograd Function that calls them when traced (checked
    by the torch.compile tests below)."""
    s, t = _xy(5, 33)
    w = torch.rand(5) + 0.5
    m = torch.tensor([True, False, True, True, False])
    ops = torch.ops.ssld_kernels
    sp = (False, 0.0)  # dense teacher: no index, the sparse-only arguments unused
    args = (1, 0.5, 0.5, 0.5, 1.0, *sp, backend)  # Kernel.flat(): spec, uniform, sum_tol, backend
    torch.library.opcheck(ops.divergence_fwd, (s, t, None, w, m, None, False, *args))
    args0 = (0, 0.5, 0.5, 0.5, 0.5, *sp, backend)
    torch.library.opcheck(ops.divergence_fwd, (s, t, None, None, None, None, False, *args0))
    _, stats, gs, gt = ops.divergence_fwd(s, t, None, w, m, None, True, *args)
    assert gs.numel() == 0 and gt.numel() == 0  # no grad_rows: no gradients, as the fake says
    g = torch.rand(5)
    torch.library.opcheck(ops.divergence_bwd, (s, t, None, w, m, stats, g, True, True, *args))
    for need_t in (False, True):  # the fused path: grad_rows given
        torch.library.opcheck(ops.divergence_fwd, (s, t, None, w, m, g, need_t, *args))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_compile_fullgraph(backend):
    if backend not in sk.available_backends("cpu"):
        pytest.skip(f"{backend} backend missing")
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    teacher = torch.nn.Linear(16, 10)
    x = torch.randn(8, 16)

    def step(x):
        with torch.no_grad():
            t = teacher(x)
        return sk.softmax_divergence(model(x), t, kind="jsd", backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = step(x)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for a, p in zip(g, model.parameters()):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("reduction,masked", [("none", True), ("sum", False), ("mean", True)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_traced_runner_options(reduction, masked, dynamic, monkeypatch):
    """Under torch.compile the one autograd Function runs the custom ops (the traced runner):
    per-row and masked-mean incoming gradients, the teacher's gradient, symbolic row counts
    and the default temperature (a float dynamo once refused to check) give the eager
    results."""
    if "cpu" not in sk.available_backends("cpu"):
        pytest.skip("cpu backend missing")
    from ssld_kernels.divergence import _autograd

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(7, 19, generator=gen, requires_grad=True)
    t = torch.randn(7, 19, generator=gen, requires_grad=True)
    w = torch.rand(7, generator=gen) + 0.5
    m = torch.rand(7, generator=gen) > 0.3 if masked else None
    g = torch.rand(7, generator=gen) + 0.5 if reduction == "none" else torch.tensor(1.7)

    kw = dict(kind="sym_kl", reduction=reduction, weight=w, mask=m, teacher_grad=True)
    if reduction != "sum":
        kw["temperature"] = 2.0

    def loss(a, b):
        return sk.softmax_divergence(a, b, backend="cpu", **kw)

    def direct(*args):
        raise AssertionError("the launchers ran directly under torch.compile")

    with monkeypatch.context() as mp:
        mp.setattr(_autograd._Direct, "forward", staticmethod(direct))
        mp.setattr(_autograd._Direct, "backward", staticmethod(direct))
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager", dynamic=dynamic)
        got = compiled(s, t)
        got_s, got_t = torch.autograd.grad(got, (s, t), g)
    ref = loss(s, t)
    ref_s, ref_t = torch.autograd.grad(ref, (s, t), g)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_s, ref_s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_t, ref_t, rtol=1e-5, atol=1e-7)


def test_torch_compile_inductor_fused_grad(monkeypatch, tmp_path):
    if "cpu" not in sk.available_backends("cpu"):
        pytest.skip("cpu backend missing")
    # a private inductor cache: its on-disk cache is not keyed on ATen's CPU capability, and
    # code generated under AVX2 fails to compile under ATEN_CPU_CAPABILITY=default
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    s, t = _xy(6, 40)
    fn = torch.compile(
        lambda a, b: sk.softmax_divergence_and_grad(a, b * 2, kind="sym_kl"), fullgraph=True
    )
    loss, g = fn(s, t)
    ref_l, ref_g = sk.softmax_divergence_and_grad(s, t * 2, kind="sym_kl")
    torch.testing.assert_close(loss, ref_l)
    torch.testing.assert_close(g, ref_g)


if given is not None:

    @settings(max_examples=30, deadline=None)
    @given(
        lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
        c=st.integers(1, 300),
        scale=st.floats(0.01, 30.0),
        kind=st.sampled_from(["jsd", "sym_kl", "kl"]),
        beta=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
        temperature=st.floats(0.25, 8.0),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_hypothesis_random_shapes(lead, c, scale, kind, beta, temperature, seed):
        g = torch.Generator().manual_seed(seed)
        s = torch.randn(*lead, c, generator=g) * scale
        t = torch.randn(*lead, c, generator=g) * scale
        ref = naive_divergence_rows(s.reshape(-1, c), t.reshape(-1, c), kind, beta, temperature)
        for backend in sk.available_backends("cpu"):
            if backend == "triton":
                continue  # covered on fixed shapes; the interpreter is slow for 30 draws
            got = sk.softmax_divergence(
                s,
                t,
                kind=kind,
                beta=beta,
                temperature=temperature,
                reduction="none",
                backend=backend,
            )
            bound = divergence_bounds(s, t, kind, beta, temperature, backend)
            assert_loss_close(got.reshape(-1), ref, bound.loss, backend)


def test_python_m_ssld_kernels():
    out = subprocess.run(
        [sys.executable, "-m", "ssld_kernels"], capture_output=True, text=True, check=True
    )
    assert "torch" in out.stdout and "available" in out.stdout


def test_cli_help():
    out = subprocess.run(
        [sys.executable, "-m", "ssld", "--help"], capture_output=True, text=True, check=True
    )
    assert "ssld" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "ssld", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_import_without_extension(tmp_path):
    """The package imports and runs on torch (and triton) when _C is missing: the loss it
    prints is the float64 oracle's, to the float32 error bound."""
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 5, generator=gen) * 2, torch.randn(3, 5, generator=gen) * 2
    torch.save((s, t), tmp_path / "logits.pt")
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'ssld_kernels._C' or (name == 'ssld_kernels' and len(a) > 2 and a[2] and '_C' in a[2]):\n"
        "        raise ImportError('simulated missing extension')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "import torch, ssld_kernels as sk\n"
        "assert 'cpu' not in sk.available_backends(), sk.available_backends()\n"
        f"s, t = torch.load({str(tmp_path / 'logits.pt')!r})\n"
        "print(repr(float(sk.softmax_divergence(s, t))))\n"
        "from ssld_kernels._backends import describe\n"
        "assert 'simulated missing extension' in describe()\n"
    )
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True
    )
    got = torch.tensor(float(out.stdout.strip().splitlines()[-1]))
    rows = naive_divergence_rows(s, t, "jsd", 0.5, 1.0)
    bound = divergence_bounds(s, t, "jsd", 0.5, 1.0, "torch")  # auto without _C: torch
    assert_loss_close(got, rows.mean(), reduced_bound(bound.loss / 3, rows / 3, "mean"))
