"""The one autograd path of the divergence loss, for eager and compiled calls alike.

:class:`DivergenceFunction` computes the reduced loss and its backward. What runs inside is
chosen once per call by :func:`runner`: plain tensors in eager mode run the launchers
directly (:class:`_Direct`); under torch.compile, export, make_fx, FakeTensorMode or with
tensor subclasses the same calls go through the custom ops (:class:`_Traced`), which tracers
see. The ops' Python dispatch costs more host time than the kernels take at the SSLD shape
(see ``bench/bench_host.py``), hence the direct path.

The reduction is folded in, so each direction is one kernel launch besides the loss
reduction: a mean's 1/n goes into the kernel's coefficients (loss and gradients are linear in
them) and the incoming gradient is read on the device (a stride-0 view, or the in-place
scale of a gradient the forward kept; :func:`grad_in_forward` decides when the forward keeps
it).
"""

import torch
from torch import Tensor

from ssld_kernels import reference
from ssld_kernels._abi import acc_dtype
from ssld_kernels._torch_compat import eager, saved_tensor_hooks_active
from ssld_kernels._tune_table import launch_config

from . import _ops
from ._launch import Kernel, Rows, launch_backward, launch_forward

__all__ = ["DivergenceFunction", "kernel_loss", "kernel_loss_and_grad", "grad_in_forward"]


class _Direct:
    """Launchers called directly: eager mode, plain tensors."""

    forward = staticmethod(launch_forward)
    backward = staticmethod(launch_backward)


class _Traced:
    """The same calls through the custom ops (visible to tracers, with fakes)."""

    @staticmethod
    def forward(x: Rows, k: Kernel, grad_rows=None, need_grad_t=False):
        row_loss, stats, gs, gt = _ops.divergence_fwd(*x, grad_rows, need_grad_t, *k.flat())
        fused = grad_rows is not None
        return row_loss, stats, gs if fused else None, gt if fused and need_grad_t else None

    @staticmethod
    def backward(x: Rows, k: Kernel, stats, grad_rows, need_s, need_t):
        gs, gt = _ops.divergence_bwd(*x, stats, grad_rows, need_s, need_t, *k.flat())
        return gs if need_s else None, gt if need_t else None


def runner(x: Rows):
    return _Direct if eager(*x) else _Traced


_NO_GRAD_TAIL = (None,) * 7  # index, weight, mask, k, reduction, lead, grad_on


class DivergenceFunction(torch.autograd.Function):
    """Reduced loss of :func:`~ssld_kernels.softmax_divergence` from 2-D rows.

    Where :func:`grad_in_forward` allows, a forward that will need gradients runs the fused
    kernel and keeps the gradient of the loss for an incoming gradient of 1; the backward
    then scales it in place, one pass over the gradient instead of a second pass over both
    logits that recomputes every softmax term (a second backward through a retained graph
    runs the same fused kernel again, so it gives the same bits). Elsewhere the backward is
    one kernel launch from the saved row statistics."""

    @staticmethod
    def forward(ctx, s, t, index, weight, mask, k: Kernel, reduction: str, lead, grad_on: bool):
        # grad_on: grad mode was on at the call (inside forward it is always off)
        x = Rows(s, t, index, weight, mask)
        run = runner(x)
        need_s = ctx.needs_input_grad[0]
        need_t = ctx.needs_input_grad[1] and index is None
        ctx.grads = ctx.fused = None
        presummed = False
        count = masked_count(s, mask, reduction)
        if grad_on and need_s and run is _Direct and grad_in_forward(x, k, need_t):
            grad_rows, gk, presummed = eager_grad_rows(s, mask, reduction, k, count)
            row_loss, stats, gs, gt = run.forward(x, gk, grad_rows, need_t)
            ctx.grads = (gs, gt)  # gt is None unless need_t
            ctx.fused = (gk, grad_rows)  # to redo it for a second backward
        else:
            row_loss, stats, _, _ = run.forward(x, k)
        ctx.save_for_backward(s, t, index, weight, mask, stats, count)
        ctx.eager = run is _Direct
        ctx.reduction, ctx.k = reduction, k
        return _reduce(row_loss, reduction, mask, lead, count, presummed)

    @staticmethod
    def backward(ctx, grad):
        s, t, index, weight, mask, stats, count = ctx.saved_tensors
        need_s = ctx.needs_input_grad[0]
        need_t = ctx.needs_input_grad[1] and index is None
        if not (need_s or need_t):
            return (None, None) + _NO_GRAD_TAIL
        x = Rows(s, t, index, weight, mask)
        n = s.shape[0]
        if ctx.fused is not None:  # gradients from the forward: scale them in place, once
            if ctx.grads is not None:
                gs, gt = ctx.grads  # need_s holds here (the forward required it)
                ctx.grads = None
            else:  # a second backward through a retained graph: the same kernel again
                gk, grad_rows = ctx.fused
                _, _, gs, gt = launch_forward(x, gk, grad_rows, need_t)
            factor = grad.reshape(n, 1) if ctx.reduction == "none" else grad
            gs = gs.mul_(factor)
            gt = gt.mul_(factor) if gt is not None else None
        else:
            k = ctx.k
            if ctx.reduction == "none":
                grad_rows = grad.reshape(n)
            else:
                if count is not None:
                    grad = grad / count
                elif ctx.reduction != "sum" and n > 0:  # an unmasked mean's 1/n: eager, in
                    if ctx.eager:  # the coefficients (no kernel for it); traced, a tensor op
                        k = k.scaled(1.0 / n)
                    else:
                        grad = grad / n
                grad_rows = grad.reshape(1).expand(n)
            run = _Direct if ctx.eager else _Traced
            gs, gt = run.backward(x, k, stats, grad_rows.to(stats.dtype), need_s, need_t)
        if ctx.eager and torch.is_grad_enabled():  # create_graph=True: must raise when used
            gs, gt = _NotTwice.apply(s if need_s else t, gs, gt)
        return (gs, gt) + _NO_GRAD_TAIL


def grad_in_forward(x: Rows, k: Kernel, need_t: bool) -> bool:
    """Whether an eager forward computes the gradient: when the fused kernel of the backend
    reads each row of (s, t) once, that costs one extra pass over the gradient (its scale in
    the backward) and saves the backward's second read of both logits and recomputation of
    every softmax term. cpu: rows are processed cache-resident; triton: the row fits one
    chunk; cuda: a warp holds the row in registers (C <= 1024) or the tune table enabled the
    shared-memory row cache for this shape.

    Not for float16 gradients: the gradient for an incoming gradient of 1 (with a mean's 1/n)
    underflows float16's range, and a loss scale applied afterwards cannot bring it back
    (bfloat16 has float32's range; there the kept gradient is rounded twice, 1 ulp at most,
    unless the incoming gradient is 1). Not under saved-tensor hooks (non-reentrant
    checkpointing, save_on_cpu): the kept gradient would escape them. Not for the sparse
    teacher's kernel (two passes)."""
    s, t = x.s, x.t
    if x.index is not None or s.dtype == torch.float16 or (need_t and t.dtype == torch.float16):
        return False
    if saved_tensor_hooks_active():
        return False
    c = s.shape[1]
    if k.backend == "cpu":
        return True
    if k.backend == "triton":
        from ssld_kernels.triton.divergence import row_fits_one_chunk

        return row_fits_one_chunk(s, t)
    if k.backend == "cuda":
        cfg = launch_config("cuda", s, t, "fused") or {}
        return c <= 1024 or cfg.get("row_cache") == 1
    return False


class _NotTwice(torch.autograd.Function):
    """Ties the gradients to the logits (``anchor``) so that differentiating them raises
    instead of silently contributing nothing."""

    @staticmethod
    def forward(ctx, anchor, gs, gt):
        return tuple(None if g is None else g.view_as(g) for g in (gs, gt))

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "softmax_divergence's gradient is not differentiable: double backward "
            "(create_graph=True through the loss) is not supported"
        )


# ----------------------------------------------------------------------------------------------
# entry points of the public functions, and the reduction without fill kernels
# ----------------------------------------------------------------------------------------------


def kernel_loss(x: Rows, k: Kernel, reduction: str, lead) -> Tensor:
    """The reduced loss through the kernels, differentiable."""
    return DivergenceFunction.apply(*x, k, reduction, lead, torch.is_grad_enabled())


def kernel_loss_and_grad(x: Rows, k: Kernel, reduction: str, lead, need_grad_t: bool):
    """(loss, grad_s, grad_t or None) from one fused launch, no autograd graph."""
    s, mask = x.s, x.mask
    run = runner(x)
    if run is _Traced:  # the mean's 1/n as a tensor: no host number for a symbolic n
        grad_rows = grad_rows_of(s.shape[0], mask, reduction, acc_dtype(s.dtype), s.device)
        rows, _, gs, gt = run.forward(x, k, grad_rows, need_grad_t)
        return reference.reduce_rows(rows, reduction, mask, lead), gs, gt
    count = masked_count(s, mask, reduction)
    grad_rows, gk, presummed = eager_grad_rows(s, mask, reduction, k, count)
    rows, _, gs, gt = run.forward(x, gk, grad_rows, need_grad_t)
    return _reduce(rows, reduction, mask, lead, count, presummed), gs, gt


def _mean_factor(n: int, mask: Tensor | None, reduction: str) -> float:
    """d(loss)/d(row_loss) as a host number where it is one: 1/n for an unmasked mean."""
    if reduction in ("mean", "batchmean") and mask is None and n > 0:
        return 1.0 / n
    return 1.0


def masked_count(s: Tensor, mask: Tensor | None, reduction: str) -> Tensor | None:
    """The row count a masked mean divides by (on the device), else None."""
    if reduction in ("mean", "batchmean") and mask is not None and s.shape[0] > 0:
        return reference.row_count(s.shape[0], mask, acc_dtype(s.dtype), s.device)
    return None


def _reduce(rows, reduction, mask, lead, count: Tensor | None, presummed: bool) -> Tensor:
    """The loss from row losses, reusing a masked mean's ``count``; ``presummed``: the rows
    already carry the mean's 1/n, so their sum is the loss."""
    if presummed:
        return rows.sum()
    if count is not None:
        return rows.sum() / count
    return reference.reduce_rows(rows, reduction, mask, lead)


def eager_grad_rows(s: Tensor, mask: Tensor | None, reduction: str, k: Kernel, count):
    """(grad_rows, kernel, presummed) for an eager fused call without fill kernels: a masked
    mean reads 1 / ``count`` (from :func:`masked_count`); a sum or an unmasked mean reads a
    cached 1 through a stride-0 view, the mean's 1/n scaling the coefficients (so also the
    row losses: ``presummed`` says their sum is the loss)."""
    n = s.shape[0]
    if count is not None:
        return count.reciprocal().reshape(1).expand(n), k, False
    factor = _mean_factor(n, mask, reduction)
    return _unit(acc_dtype(s.dtype), s.device).expand(n), k.scaled(factor), factor != 1.0


def grad_rows_of(n: int, mask: Tensor | None, reduction: str, acc, device) -> Tensor:
    """d(loss)/d(row_loss[r]) for a reduction, as an (n,) view (stride 0), on the device."""
    if reduction in ("mean", "batchmean"):
        count = reference.row_count(n, mask, acc, device)
        if isinstance(count, Tensor):
            return count.reciprocal().reshape(1).expand(n)
        return torch.full((1,), 1.0 / count, dtype=acc, device=device).expand(n)
    return torch.ones((1,), dtype=acc, device=device).expand(n)


_UNITS: dict = {}


def _unit(dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached one-element tensor holding 1 (no fill kernel per call; never written)."""
    key = (dtype, device)
    u = _UNITS.get(key)
    if u is None:
        u = torch.ones(1, dtype=dtype, device=device)
        if type(u) is not Tensor:  # made under some mode: use it, never cache it
            return u
        if device.type == "cuda":
            if torch.cuda.is_current_stream_capturing():
                return u  # one made inside a capture belongs to the graph's pool
            # once per device and dtype: later calls on other streams read it unordered
            torch.cuda.current_stream(device).synchronize()
        _UNITS[key] = u
    return u
