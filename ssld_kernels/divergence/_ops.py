"""``torch.library`` custom ops over the launchers, with fake (meta) implementations.

What torch.compile, export, make_fx and FakeTensorMode see; eager calls on plain tensors run
the launchers directly (``_autograd.py``). Gradients come from the one autograd Function of
``_autograd.py``, which calls these ops when traced, so the ops register no autograd formula
of their own.

Every op takes the tensors of :class:`~._launch.Rows` first and the fields of
:class:`~._launch.Kernel` last (``Kernel.flat()`` order: mode, beta, coef_a, coef_b, inv_temp,
uniform, sum_tol, backend). A skipped gradient is returned as an empty tensor.
"""

import torch
from torch import Tensor

from ssld_kernels._abi import SPARSE_STATS_WIDTH, STATS_WIDTH, acc_dtype

from ._launch import Kernel, Rows, launch_backward, launch_forward

__all__ = ["divergence_fwd", "divergence_bwd"]


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


@torch.library.custom_op("ssld_kernels::divergence_fwd", mutates_args=())
def divergence_fwd(
    s: Tensor,
    t: Tensor,
    index: Tensor | None,
    weight: Tensor | None,
    mask: Tensor | None,
    grad_rows: Tensor | None,
    need_grad_t: bool,
    mode: int,
    beta: float,
    coef_a: float,
    coef_b: float,
    inv_temp: float,
    uniform: bool,
    sum_tol: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss (n,) and the statistics the backward reuses; with ``grad_rows`` (the fused
    path) also the gradients of sum_r grad_rows[r] * row_loss[r] from the same launch."""
    k = Kernel.from_flat(mode, beta, coef_a, coef_b, inv_temp, uniform, sum_tol, backend)
    x = Rows(s, t, index, weight, mask)
    row_loss, stats, gs, gt = launch_forward(x, k, grad_rows, need_grad_t)
    return row_loss, stats, gs if gs is not None else _empty(s), gt if gt is not None else _empty(t)


@torch.library.custom_op("ssld_kernels::divergence_bwd", mutates_args=())
def divergence_bwd(
    s: Tensor,
    t: Tensor,
    index: Tensor | None,
    weight: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    grad_rows: Tensor,
    need_grad_s: bool,
    need_grad_t: bool,
    mode: int,
    beta: float,
    coef_a: float,
    coef_b: float,
    inv_temp: float,
    uniform: bool,
    sum_tol: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Gradients of sum_r grad_rows[r] * row_loss[r] from ``stats``."""
    k = Kernel.from_flat(mode, beta, coef_a, coef_b, inv_temp, uniform, sum_tol, backend)
    x = Rows(s, t, index, weight, mask)
    gs, gt = launch_backward(x, k, stats, grad_rows, need_grad_s, need_grad_t)
    return gs if gs is not None else _empty(s), gt if gt is not None else _empty(t)


# ----------------------------------------------------------------------------------------------
# fakes: shapes and dtypes only
# ----------------------------------------------------------------------------------------------


def _fake_rows(s: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
    n = s.shape[0]
    acc = acc_dtype(s.dtype) if index is None else torch.float32
    width = STATS_WIDTH if index is None else SPARSE_STATS_WIDTH
    return s.new_empty((n,), dtype=acc), s.new_empty((n, width), dtype=acc)


def _fake_grad(x: Tensor, needed: bool) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else _empty(x)


@divergence_fwd.register_fake
def _(s, t, index, weight, mask, grad_rows, need_grad_t, *kernel):
    row_loss, stats = _fake_rows(s, index)
    fused = grad_rows is not None
    return (
        row_loss,
        stats,
        _fake_grad(s, fused),
        _fake_grad(t, fused and need_grad_t and index is None),
    )


@divergence_bwd.register_fake
def _(s, t, index, weight, mask, stats, grad_rows, need_grad_s, need_grad_t, *kernel):
    return _fake_grad(s, need_grad_s), _fake_grad(t, need_grad_t and index is None)
