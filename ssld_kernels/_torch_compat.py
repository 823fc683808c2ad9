"""The one module that reads PyTorch internals, each use with a fallback.

The kernels' hot path decides per call whether to run the compiled launchers directly (plain
tensors, nothing tracing them: the fastest host path) or through the ``torch.library`` custom
ops (what torch.compile, export, make_fx and FakeTensorMode can see). PyTorch has no public
query for "is a dispatch mode active" or "are saved-tensor hooks installed", so this module
wraps the private ones. A PyTorch release that moves or changes them makes the fallbacks
take the safe answer (trace through the ops; do not keep gradients past the hooks), never a
wrong one, and ``tests/test_torch_compat.py`` fails so that the change is noticed.
"""

import torch
from torch import Tensor, nn

__all__ = [
    "eager",
    "tracing_mode_active",
    "saved_tensor_hooks_active",
    "known_int",
    "PRIVATE_APIS",
]

# What this module reads, for the test that fails when PyTorch changes it.
PRIVATE_APIS = (
    "torch._C._len_torch_dispatch_stack",
    "torch._C._autograd._top_saved_tensors_default_hooks",
    "torch.fx.experimental.proxy_tensor.get_proxy_mode",
    "torch.utils._python_dispatch._get_current_dispatch_mode_stack",
    "torch.fx.experimental.symbolic_shapes.has_static_value",
)

_PLAIN = (Tensor, nn.Parameter)


def eager(*tensors) -> bool:
    """True when the kernels may run directly: plain tensors and nothing tracing them. Under
    torch.compile / export, make_fx (a proxy mode), FakeTensorMode or with tensor subclasses
    the custom ops run instead, which tracers see and which have fake implementations."""
    if torch.compiler.is_compiling():
        return False
    if any(type(x) not in _PLAIN for x in tensors if x is not None):
        return False
    return not tracing_mode_active()


def _dispatch_stack_len() -> int:
    try:
        return torch._C._len_torch_dispatch_stack()
    except AttributeError:  # moved in another release: assume a mode may be active
        return 1


def tracing_mode_active() -> bool:
    """Whether a proxy (make_fx) or fake-tensor dispatch mode is active."""
    if not _dispatch_stack_len():
        return False  # the common case: no dispatch mode at all
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import get_proxy_mode
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    except ImportError:  # another torch layout: any dispatch mode counts as tracing
        return True
    if get_proxy_mode() is not None:
        return True
    return any(isinstance(m, FakeTensorMode) for m in _get_current_dispatch_mode_stack())


def saved_tensor_hooks_active() -> bool:
    """Whether default saved-tensor hooks are installed (non-reentrant checkpointing,
    ``save_on_cpu``): a tensor kept on ``ctx`` outside ``save_for_backward`` would escape them."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):  # another torch: assume they may be
        return True


def known_int(x) -> int | None:
    """``x`` as a plain int when its value is known; None for None, a non-int, or a symbolic
    int (a SymInt of dynamic shapes under torch.compile).

    dynamo traces ``type(x)`` and ``isinstance(x, int)`` of a SymInt as int, so neither tells
    them apart; ``has_static_value`` does, in eager code and in dynamo (which evaluates it on
    the symbol without a guard). Without it (another torch), nothing counts as known while
    compiling, which is the safe answer (callers then use their static defaults)."""
    if type(x) is not int and not isinstance(x, torch.SymInt):
        return None
    try:
        from torch.fx.experimental.symbolic_shapes import has_static_value
    except ImportError:
        return None if torch.compiler.is_compiling() or type(x) is not int else x
    return int(x) if has_static_value(x) else None
