"""The PyTorch internals that ssld_kernels/_torch_compat.py reads: they exist and still mean
what the hot path assumes. A failure here means a PyTorch release changed them: the module's
fallbacks then take the safe (slower) path, and this test says which API moved."""

import functools
import importlib

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ssld_kernels import _torch_compat as tc


def _resolve(path: str):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        return functools.reduce(getattr, parts[i:], obj)
    raise ImportError(path)


@pytest.mark.parametrize("path", tc.PRIVATE_APIS)
def test_private_api_exists(path):
    assert callable(_resolve(path)), f"{path} moved or changed in torch {torch.__version__}"


def test_saved_tensor_hooks_detected():
    assert tc.saved_tensor_hooks_active() is False
    with torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
        assert tc.saved_tensor_hooks_active() is True
    with torch.autograd.graph.save_on_cpu():
        assert tc.saved_tensor_hooks_active() is True
    assert tc.saved_tensor_hooks_active() is False


def test_tracing_modes_detected():
    x = torch.randn(3)
    assert tc._dispatch_stack_len() == 0
    assert tc.tracing_mode_active() is False and tc.eager(x, None) is True
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert tc._dispatch_stack_len() > 0
        assert tc.tracing_mode_active() is True
    seen = []

    def f(y):
        seen.append(tc.eager(y))
        return y + 1

    make_fx(f)(x)
    assert seen == [False]  # make_fx: a proxy mode is active
    from torch.utils._python_dispatch import TorchDispatchMode

    class Logging(TorchDispatchMode):  # a mode that does not trace: still eager
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Logging():
        assert tc._dispatch_stack_len() > 0
        assert tc.tracing_mode_active() is False


def test_eager_false_under_compile_and_subclasses():
    torch._dynamo.reset()
    fn = torch.compile(lambda y: y * 0 + float(tc.eager(y)), backend="eager", fullgraph=True)
    assert float(fn(torch.ones(2))[0]) == 0.0
    assert float(torch.ones(2)[0] * 0 + float(tc.eager(torch.ones(2)))) == 1.0

    class Sub(torch.Tensor):
        pass

    assert tc.eager(torch.ones(2).as_subclass(Sub)) is False
    assert tc.eager(torch.nn.Parameter(torch.ones(2))) is True


def test_fallbacks_take_the_safe_answer(monkeypatch):
    """Without the private APIs: assume a mode may be active (then ask the public-ish checks)
    and that saved-tensor hooks may be installed (then never keep a gradient past them)."""
    monkeypatch.delattr(torch._C, "_len_torch_dispatch_stack")
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    assert tc._dispatch_stack_len() == 1
    assert tc.tracing_mode_active() is False  # the proxy / fake checks still answer
    assert tc.saved_tensor_hooks_active() is True
    s = torch.randn(3, 7, requires_grad=True)
    import ssld_kernels as sk

    loss = sk.softmax_divergence(s, torch.randn(3, 7))  # auto: the compiled cpu kernel
    loss.backward()  # still runs, through the safe path
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_known_int():
    assert tc.known_int(7) == 7 and tc.known_int(None) is None and tc.known_int(7.0) is None
    seen = []

    def f(x):
        seen.append(tc.known_int(x.shape[-1]))
        return x * 2

    torch._dynamo.reset()
    torch.compile(f, dynamic=True, backend="eager", fullgraph=True)(torch.ones(3, 5))
    assert seen == [None]  # a symbolic class count is not known
    seen.clear()
    torch._dynamo.reset()
    torch.compile(f, dynamic=False, backend="eager", fullgraph=True)(torch.ones(3, 5))
    assert seen == [5]
