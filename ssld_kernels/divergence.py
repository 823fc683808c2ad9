"""Fused softmax + divergence losses (JSD, symmetric KL, KL) from logits.

Layering (as in flash-attention's interface): compiled kernels (``_C`` cpu/cuda, Triton) ->
private ``torch.library.custom_op`` with ``register_fake`` -> autograd -> public function ->
``nn.Module``. The math is in :mod:`ssld_kernels.reference` (the executable spec).

Kernel contract shared by every backend (``_launch_forward`` / ``_launch_backward``):
2-D logits (n, C) with last-dim stride 1 and any row stride; per-row float32 (float64 for
float64 inputs) ``row_loss`` and ``stats = (max_s, log_sum_s, max_t, log_sum_t, A, B)``; gradients in the logits'
dtypes. The backward reuses ``stats``, so it is one pass over the logits.

A :class:`SparseTeacher` (top-m probabilities + class ids) is a second teacher form: the Triton
kernel of ``triton/sparse.py`` behind the same ops (given the ``index`` argument; stats =
(max_s, log_sum_s, A, B)), the reference elsewhere; see the class docstring.
"""

import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor, nn

from ssld_kernels import reference
from ssld_kernels._backends import backend_status, ext, launch_config, resolve_backend
from ssld_kernels.reference import DivSpec, make_spec

__all__ = [
    "SparseTeacher",
    "softmax_divergence",
    "softmax_divergence_and_grad",
    "JSDLoss",
    "SymmetricKLLoss",
    "KLDivLoss",
]

# Floats saved per row by the forward: (max_s, log_sum_s, max_t, log_sum_t, A, B)
STATS_WIDTH = 6
SPARSE_STATS_WIDTH = 4  # a SparseTeacher's: (max_s, log_sum_s, A, B)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# launchers for the compiled extension (cpu, cuda); the Triton ones live in triton/divergence.py
# ----------------------------------------------------------------------------------------------


def _ext_params(s, t, weight, mask, spec: DivSpec, grad_rows, mode="fwdbwd"):
    p = ext().DivParams()
    p.s, p.s_dtype, p.s_stride = s.data_ptr(), _DTYPE_CODES[s.dtype], s.stride(0)
    p.t, p.t_dtype, p.t_stride = t.data_ptr(), _DTYPE_CODES[t.dtype], t.stride(0)
    p.n_rows, p.n_cols = s.shape
    p.mode, p.beta, p.coef_a, p.coef_b, p.inv_temp = spec
    temperature = 1.0 / spec.inv_temp
    p.loss_scale, p.grad_scale = temperature * temperature, temperature
    if weight is not None:
        p.weight = weight.data_ptr()
    if mask is not None:
        p.mask = mask.data_ptr()
    if grad_rows is not None:
        p.grad_rows, p.grad_rows_stride = grad_rows.data_ptr(), grad_rows.stride(0)
    if s.is_cuda:
        p.device = s.device.index
        p.stream = torch.cuda.current_stream(s.device).cuda_stream
        cfg = launch_config("cuda", s, t, mode)  # the tune table's for this bucket, if any
        if cfg:
            p.cuda_threads = cfg.get("threads", 0)
            p.cuda_blocks = cfg.get("blocks", 0)
            p.cuda_row_cache = cfg.get("row_cache", 0)
    else:
        p.num_threads = torch.get_num_threads()
    return p


def _ext_forward(s, t, weight, mask, spec, grad_rows, need_grad_s, need_grad_t):
    n, c = s.shape
    acc = _acc(s.dtype)
    row_loss = s.new_empty(n, dtype=acc)
    stats = s.new_empty((n, STATS_WIDTH), dtype=acc)
    grad_s = torch.empty((n, c), dtype=s.dtype, device=s.device) if need_grad_s else None
    grad_t = torch.empty((n, c), dtype=t.dtype, device=t.device) if need_grad_t else None
    mode = "fused" if need_grad_s or need_grad_t else "fwdbwd"
    p = _ext_params(s, t, weight, mask, spec, grad_rows, mode)
    p.row_loss, p.stats = row_loss.data_ptr(), stats.data_ptr()
    if grad_s is not None:
        p.grad_s, p.grad_s_stride = grad_s.data_ptr(), c
    if grad_t is not None:
        p.grad_t, p.grad_t_stride = grad_t.data_ptr(), c
    (ext().divergence_forward_cuda if s.is_cuda else ext().divergence_forward_cpu)(p)
    return row_loss, stats, grad_s, grad_t


def _ext_backward(s, t, weight, mask, stats, grad_rows, spec, need_grad_s, need_grad_t):
    n, c = s.shape
    grad_s = torch.empty((n, c), dtype=s.dtype, device=s.device) if need_grad_s else None
    grad_t = torch.empty((n, c), dtype=t.dtype, device=t.device) if need_grad_t else None
    p = _ext_params(s, t, weight, mask, spec, grad_rows)
    p.stats = stats.data_ptr()
    if grad_s is not None:
        p.grad_s, p.grad_s_stride = grad_s.data_ptr(), c
    if grad_t is not None:
        p.grad_t, p.grad_t_stride = grad_t.data_ptr(), c
    (ext().divergence_backward_cuda if s.is_cuda else ext().divergence_backward_cpu)(p)
    return grad_s, grad_t


def _launchers(backend: str):
    if backend == "triton":
        from ssld_kernels.triton import divergence as tr

        return tr.divergence_forward, tr.divergence_backward
    return _ext_forward, _ext_backward


def _mask_u8(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else mask.view(torch.uint8)


def _empty_grad(x: Tensor) -> Tensor:
    return x.new_empty(0)


# ----------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile, with fake (meta) implementations.
# One op family for both teacher forms: ``index is None``: ``t`` holds teacher logits (n, C);
# else ``t`` holds a SparseTeacher's top-m probabilities (n, m) and ``index`` their class ids
# (``uniform``, ``sum_tol``: its remainder rule and sum tolerance; no teacher gradient).
# ----------------------------------------------------------------------------------------------


def _sparse_launchers(backend: str):
    if backend != "triton":
        raise ValueError(f"the sparse-teacher ops run on the triton backend, got {backend!r}")
    from ssld_kernels.triton import sparse as tr

    return tr.sparse_divergence_forward, tr.sparse_divergence_backward


def _launch_forward(s, t, index, weight, mask, spec, uniform, sum_tol, backend, grad_rows,
                    need_grad_t):  # fmt: skip
    """(row_loss, stats, grad_s or None, grad_t or None); gradients when ``grad_rows``."""
    need_grad_s = grad_rows is not None
    if index is None:
        return _launchers(backend)[0](
            s, t, weight, _mask_u8(mask), spec, grad_rows, need_grad_s, need_grad_t
        )
    row_loss, stats, gs = _sparse_launchers(backend)[0](
        s, t, index, weight, _mask_u8(mask), spec, uniform, sum_tol, grad_rows, need_grad_s
    )
    return row_loss, stats, gs, None


def _launch_backward(s, t, index, weight, mask, stats, grad_rows, spec, uniform, sum_tol, backend,
                     need_grad_s, need_grad_t):  # fmt: skip
    """(grad_s or None, grad_t or None) of sum_r grad_rows[r] * row_loss[r], from ``stats``."""
    if index is None:
        return _launchers(backend)[1](
            s, t, weight, _mask_u8(mask), stats, grad_rows, spec, need_grad_s, need_grad_t
        )
    gs = None  # a sparse teacher has no gradient; the student's only when asked for
    if need_grad_s:
        gs = _sparse_launchers(backend)[1](
            s, t, index, weight, _mask_u8(mask), stats, grad_rows, spec, uniform, sum_tol
        )
    return gs, None


def _fake_rows(s: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
    """Fake (row_loss, stats) of the forward: sparse stats are (max_s, log_sum_s, A, B)."""
    n = s.shape[0]
    acc = _acc(s.dtype) if index is None else torch.float32
    width = STATS_WIDTH if index is None else SPARSE_STATS_WIDTH
    return s.new_empty((n,), dtype=acc), s.new_empty((n, width), dtype=acc)


def _fake_grad(x: Tensor, needed: bool) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else _empty_grad(x)


@torch.library.custom_op("ssld_kernels::divergence_fwd", mutates_args=())
def _divergence_fwd(
    s: Tensor,
    t: Tensor,
    index: Tensor | None,
    weight: Tensor | None,
    mask: Tensor | None,
    mode: int,
    beta: float,
    coef_a: float,
    coef_b: float,
    inv_temp: float,
    uniform: bool,
    sum_tol: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Per-row loss (n,) and the statistics the backward reuses, of 2-D logits."""
    spec = DivSpec(mode, beta, coef_a, coef_b, inv_temp)
    row_loss, stats, _, _ = _launch_forward(
        s, t, index, weight, mask, spec, uniform, sum_tol, backend, None, False
    )
    return row_loss, stats


@_divergence_fwd.register_fake
def _(s, t, index, *args):
    return _fake_rows(s, index)


@torch.library.custom_op("ssld_kernels::divergence_bwd", mutates_args=())
def _divergence_bwd(
    s: Tensor,
    t: Tensor,
    index: Tensor | None,
    weight: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    grad_rows: Tensor,
    mode: int,
    beta: float,
    coef_a: float,
    coef_b: float,
    inv_temp: float,
    uniform: bool,
    sum_tol: float,
    need_grad_s: bool,
    need_grad_t: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Gradients of sum_r grad_rows[r] * row_loss[r]; a skipped gradient is an empty tensor."""
    spec = DivSpec(mode, beta, coef_a, coef_b, inv_temp)
    gs, gt = _launch_backward(
        s, t, index, weight, mask, stats, grad_rows, spec, uniform, sum_tol, backend,
        need_grad_s, need_grad_t,
    )  # fmt: skip
    return (
        gs if gs is not None else _empty_grad(s),
        gt if gt is not None else _empty_grad(t),
    )


@_divergence_bwd.register_fake
def _(s, t, index, weight, mask, stats, grad_rows, *args):
    need_grad_s, need_grad_t = args[-3], args[-2]
    return _fake_grad(s, need_grad_s), _fake_grad(t, need_grad_t and index is None)


@torch.library.custom_op("ssld_kernels::divergence_fwd_grad", mutates_args=())
def _divergence_fwd_grad(
    s: Tensor,
    t: Tensor,
    index: Tensor | None,
    weight: Tensor | None,
    mask: Tensor | None,
    grad_rows: Tensor,
    mode: int,
    beta: float,
    coef_a: float,
    coef_b: float,
    inv_temp: float,
    uniform: bool,
    sum_tol: float,
    need_grad_t: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused: per-row loss and the gradients of sum_r grad_rows[r] * row_loss[r], one pass."""
    spec = DivSpec(mode, beta, coef_a, coef_b, inv_temp)
    row_loss, _, gs, gt = _launch_forward(
        s, t, index, weight, mask, spec, uniform, sum_tol, backend, grad_rows, need_grad_t
    )
    return row_loss, gs, gt if gt is not None else _empty_grad(t)


@_divergence_fwd_grad.register_fake
def _(s, t, index, weight, mask, grad_rows, *args):
    need_grad_t = args[-2]
    row_loss, _ = _fake_rows(s, index)
    return row_loss, _fake_grad(s, True), _fake_grad(t, need_grad_t and index is None)


_N_FWD_INPUTS = 13


def _fwd_setup_context(ctx, inputs, output):
    s, t, index, weight, mask = inputs[:5]
    ctx.save_for_backward(s, t, index, weight, mask, output[1])
    ctx.args = inputs[5:-1]  # mode, beta, coef_a, coef_b, inv_temp, uniform, sum_tol
    ctx.backend = inputs[-1]


def _fwd_backward(ctx, grad_row_loss, _grad_stats):
    s, t, index, weight, mask, stats = ctx.saved_tensors
    need_s = ctx.needs_input_grad[0]
    need_t = ctx.needs_input_grad[1] and index is None
    if grad_row_loss is None or not (need_s or need_t):
        return (None,) * _N_FWD_INPUTS
    grad_rows = grad_row_loss.to(stats.dtype)
    gs, gt = _divergence_bwd(
        s, t, index, weight, mask, stats, grad_rows, *ctx.args, need_s, need_t, ctx.backend
    )
    return (gs if need_s else None, gt if need_t else None) + (None,) * (_N_FWD_INPUTS - 2)


torch.library.register_autograd(
    "ssld_kernels::divergence_fwd", _fwd_backward, setup_context=_fwd_setup_context
)


# ----------------------------------------------------------------------------------------------
# Eager path. torch.compile sees the custom ops above; in eager mode the same launchers run
# through this autograd.Function instead, because the ops' Python dispatch (register_autograd,
# argument filling, redispatch) costs more host time than the kernels take at the SSLD shape
# (CPU, 4 x 16 jsd forward + backward: 189 us through the ops, see bench/README.md). The
# reduction is folded in, so each direction is one kernel launch besides the loss reduction:
# a mean's 1/n goes into the coefficients (loss and gradients are linear in them) and the
# incoming gradient is read on the device (a stride-0 view, or the in-place scale of a
# gradient the forward kept; see _DivergenceFunction).
# ----------------------------------------------------------------------------------------------


_PLAIN = (Tensor, nn.Parameter)


def _eager(*tensors) -> bool:
    """True when the kernels may run directly: plain tensors and nothing tracing them. Under
    torch.compile / export, make_fx (a proxy mode), FakeTensorMode or with tensor subclasses
    the custom ops run instead, which tracers see and which have fake implementations."""
    if torch.compiler.is_compiling():
        return False
    if any(type(x) not in _PLAIN for x in tensors if x is not None):
        return False
    return not _tracing_mode_active()


def _tracing_mode_active() -> bool:
    if not torch._C._len_torch_dispatch_stack():
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


def _scaled(spec: DivSpec, factor: float) -> DivSpec:
    """``spec`` with both coefficients times ``factor``."""
    if factor == 1.0:
        return spec
    return spec._replace(coef_a=spec.coef_a * factor, coef_b=spec.coef_b * factor)


def _mean_factor(n: int, mask: Tensor | None, reduction: str) -> float:
    """d(loss)/d(row_loss) as a host number where it is one: 1/n for an unmasked mean."""
    if reduction in ("mean", "batchmean") and mask is None and n > 0:
        return 1.0 / n
    return 1.0


class _DivergenceFunction(torch.autograd.Function):
    """Eager loss of :func:`softmax_divergence` with its reduction.

    Where the backend's fused kernel reads each row once (:func:`_grad_in_forward`), a forward
    that will need gradients runs it and keeps the gradient of the loss for an incoming
    gradient of 1; the backward then scales it in place, one pass over the gradient instead
    of a second pass over both logits that recomputes every softmax term (a second backward
    through a retained graph runs the same fused kernel again, so it gives the same bits).
    Elsewhere the backward is one kernel launch from the saved row statistics."""

    @staticmethod
    def forward(
        ctx, s, t, index, weight, mask, spec, uniform, sum_tol, backend, reduction, lead, grad_on
    ):
        n = s.shape[0]
        need_s = ctx.needs_input_grad[0]
        need_t = ctx.needs_input_grad[1] and index is None
        ctx.grads = ctx.fused = None
        presummed = False
        count = _masked_count(s, mask, reduction)
        # grad_on: grad mode was on at the call (inside forward it is always off)
        if grad_on and need_s and _grad_in_forward(backend, s, t, index, need_t):
            grad_rows, gspec, presummed = _eager_grad_rows(s, mask, reduction, spec, count)
            row_loss, stats, gs, gt = _launch_forward(
                s, t, index, weight, mask, gspec, uniform, sum_tol, backend, grad_rows, need_t
            )
            ctx.grads = (gs, gt)  # gt is None unless need_t
            ctx.fused = (gspec, grad_rows)  # to redo it for a second backward
        else:
            row_loss, stats, _, _ = _launch_forward(
                s, t, index, weight, mask, spec, uniform, sum_tol, backend, None, False
            )
        loss = _reduce(row_loss, reduction, mask, lead, count, presummed)
        ctx.save_for_backward(s, t, index, weight, mask, stats, count)
        ctx.spec = _scaled(spec, _mean_factor(n, mask, reduction))
        ctx.uniform, ctx.sum_tol, ctx.backend = uniform, sum_tol, backend
        ctx.rows_grad = reduction == "none"
        return loss

    @staticmethod
    def backward(ctx, grad):
        s, t, index, weight, mask, stats, count = ctx.saved_tensors
        need_s = ctx.needs_input_grad[0]
        need_t = ctx.needs_input_grad[1] and index is None
        rest = (None,) * 10
        if not (need_s or need_t):
            return (None, None) + rest
        n = s.shape[0]
        if ctx.fused is not None:  # gradients from the forward: scale them in place, once
            if ctx.grads is not None:
                gs, gt = ctx.grads  # need_s holds here (the forward required it)
                ctx.grads = None
            else:  # a second backward through a retained graph: the same kernel again
                gspec, grad_rows = ctx.fused
                _, _, gs, gt = _launch_forward(
                    s, t, index, weight, mask, gspec, ctx.uniform, ctx.sum_tol, ctx.backend,
                    grad_rows, need_t,
                )  # fmt: skip
            factor = grad.reshape(n, 1) if ctx.rows_grad else grad
            gs = gs.mul_(factor)
            gt = gt.mul_(factor) if gt is not None else None
        else:
            if ctx.rows_grad:
                grad_rows = grad.reshape(n)
            else:
                if count is not None:
                    grad = grad / count
                grad_rows = grad.reshape(1).expand(n)
            gs, gt = _launch_backward(
                s, t, index, weight, mask, stats, grad_rows.to(stats.dtype), ctx.spec,
                ctx.uniform, ctx.sum_tol, ctx.backend, need_s, need_t,
            )  # fmt: skip
            gs, gt = gs if need_s else None, gt if need_t else None
        if torch.is_grad_enabled():  # create_graph=True: differentiating these must raise
            gs, gt = _NotTwice.apply(s if need_s else t, gs, gt)
        return (gs, gt) + rest


def _grad_in_forward(
    backend: str, s: Tensor, t: Tensor, index: Tensor | None, need_t: bool
) -> bool:
    """Whether to compute the gradient in the forward: when the fused kernel of ``backend``
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
    if index is not None or s.dtype == torch.float16 or (need_t and t.dtype == torch.float16):
        return False
    if _saved_tensor_hooks_active():
        return False
    c = s.shape[1]
    if backend == "cpu":
        return True
    if backend == "triton":
        from ssld_kernels.triton.divergence import _launch_config

        block = _launch_config(s.shape[0], c, launch_config("triton", s, t, "fused"))[0]
        return c <= block
    if backend == "cuda":
        cfg = launch_config("cuda", s, t, "fused") or {}
        return c <= 1024 or cfg.get("row_cache") == 1
    return False


def _saved_tensor_hooks_active() -> bool:
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):  # another torch: assume they may be
        return True


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


# ----------------------------------------------------------------------------------------------
# validation and the public API
# ----------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_logits_arg(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dimension (classes last), got a scalar")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16, bfloat16 or float64 logits, got {x.dtype}"
        )


def _prepare(
    student_logits,
    teacher_logits,
    kind,
    beta,
    temperature,
    reduction,
    weight,
    mask,
    backend,
    mode="fwdbwd",
):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        _check_logits_arg(name, x)
    s, t = student_logits, teacher_logits
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"class dimension mismatch: student_logits has {s.shape[-1]} classes "
            f"(shape {tuple(s.shape)}), teacher_logits has {t.shape[-1]} (shape {tuple(t.shape)})"
        )
    if s.shape != t.shape:
        raise ValueError(
            f"shape mismatch: student_logits {tuple(s.shape)} vs teacher_logits {tuple(t.shape)}"
        )
    if s.device != t.device:
        raise ValueError(f"student_logits is on {s.device} but teacher_logits is on {t.device}")
    if (s.dtype == torch.float64) != (t.dtype == torch.float64):
        raise TypeError(
            f"float64 logits need float64 for both: student_logits is {s.dtype}, "
            f"teacher_logits is {t.dtype}"
        )
    weight, mask, spec, lead = _prepare_options(s, kind, beta, temperature, reduction, weight, mask)
    c = s.shape[-1]
    # C and the mode ("fwdbwd" autograd path / "fused") select a tune-table entry on GPUs
    name = resolve_backend(backend, s.device, (s.dtype, t.dtype), n_cols=c, mode=mode)
    s2, t2 = _rows(s, c), _rows(t, c)
    return s2, t2, weight, mask, spec, lead, name


def _prepare_options(s, kind, beta, temperature, reduction, weight, mask):
    """Check the options and per-row arrays against student logits ``s``:
    -> (weight (n,) acc dtype or None, mask (n,) bool or None, spec, leading shape)."""
    if kind not in reference.KINDS:
        raise ValueError(f"kind must be one of {reference.KINDS}, got {kind!r}")
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
    if not isinstance(beta, Real) or not (0.0 <= float(beta) <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if not isinstance(temperature, Real) or not (
        math.isfinite(float(temperature)) and float(temperature) > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    c = s.shape[-1]
    lead = s.shape[:-1]
    n = math.prod(lead)
    if c == 0 and n > 0:
        raise ValueError(f"student_logits has 0 classes (shape {tuple(s.shape)})")
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {_describe(weight)}")
        if weight.shape != lead:
            raise ValueError(
                f"weight must have the logits' leading shape {tuple(lead)}, got {tuple(weight.shape)}"
            )
        if weight.device != s.device:
            raise ValueError(f"weight is on {weight.device} but the logits are on {s.device}")
        weight = weight.detach().reshape(-1).to(_acc(s.dtype)).contiguous()
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {_describe(mask)}")
        if mask.shape != lead:
            raise ValueError(
                f"mask must have the logits' leading shape {tuple(lead)}, got {tuple(mask.shape)}"
            )
        if mask.device != s.device:
            raise ValueError(f"mask is on {mask.device} but the logits are on {s.device}")
        mask = mask.reshape(-1).contiguous()
    return weight, mask, make_spec(kind, beta, temperature), lead


def _describe(x) -> str:
    return f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__


def _rows(x: Tensor, c: int) -> Tensor:
    """(..., C) -> (n, C) view with unit class stride; copies only when no such view exists."""
    x2 = x.reshape(-1, c) if c > 0 else x.reshape(-1, 0)
    if c > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def softmax_divergence(
    student_logits: Tensor,
    teacher_logits: "Tensor | SparseTeacher",
    *,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    weight: Tensor | None = None,
    mask: Tensor | None = None,
    teacher_grad: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Divergence between softmax(student/T) and softmax(teacher/T), times T^2, from logits.

    Args:
        student_logits, teacher_logits: (..., C) float logits, class dimension last; dtypes may
            differ (float32/float16/bfloat16; float64 on the cpu and torch backends).
            ``teacher_logits`` may instead be a :class:`SparseTeacher` (top-m probabilities
            already at temperature T, which then scales the student only; see there).
        kind: "jsd" (beta*KL(Pt||M) + (1-beta)*KL(Ps||M), M = beta*Pt + (1-beta)*Ps; beta=0 is
            exactly KL(Pt||Ps), beta=1 exactly KL(Ps||Pt)), "sym_kl" (0.5*(KL(Pt||Ps) +
            KL(Ps||Pt))) or "kl" (KL(Pt||Ps), Hinton's KD term).
        reduction: "none" (leading shape), "sum", "mean"/"batchmean" (sum over unmasked rows
            divided by their count, on the device).
        weight: per-row factor (leading shape); treated as a constant. mask: bool (leading
            shape); rows where it is False give 0 loss and 0 gradient.
        teacher_grad: also back-propagate into teacher_logits.
        backend: "auto" (default, or SSLD_KERNELS_BACKEND), "cuda", "triton", "cpu", "torch".

    Returns the loss in float32 (float64 for float64 inputs).
    """
    if isinstance(teacher_logits, SparseTeacher):
        return _sparse_divergence(
            student_logits,
            teacher_logits,
            kind,
            beta,
            temperature,
            reduction,
            weight,
            mask,
            teacher_grad,
            backend,
            with_grad=False,
        )
    s, t, w, m, spec, lead, name = _prepare(
        student_logits, teacher_logits, kind, beta, temperature, reduction, weight, mask, backend
    )
    if not teacher_grad:
        t = t.detach()
    if name == "torch":
        return reference.reduce_rows(
            reference.divergence_rows(spec, s, t, w, m), reduction, m, lead
        )
    return _kernel_loss(s, t, None, w, m, spec, False, 0.0, name, reduction, lead)


def softmax_divergence_and_grad(
    student_logits: Tensor,
    teacher_logits: "Tensor | SparseTeacher",
    *,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    weight: Tensor | None = None,
    mask: Tensor | None = None,
    teacher_grad: bool = False,
    backend: str | None = None,
):
    """Loss and d(loss)/d(student_logits) from one fused pass (no autograd graph).

    Same arguments as :func:`softmax_divergence`. For ``reduction="none"`` the gradient is that
    of ``loss.sum()``. Returns ``(loss, grad_student)`` with ``grad_student`` shaped and typed
    like ``student_logits``; with ``teacher_grad=True`` returns ``(loss, grad_student,
    grad_teacher)``. For loops that call ``student_logits.backward(grad)`` themselves.
    """
    if isinstance(teacher_logits, SparseTeacher):
        return _sparse_divergence(
            student_logits,
            teacher_logits,
            kind,
            beta,
            temperature,
            reduction,
            weight,
            mask,
            teacher_grad,
            backend,
            with_grad=True,
        )
    s, t, w, m, spec, lead, name = _prepare(
        student_logits,
        teacher_logits,
        kind,
        beta,
        temperature,
        reduction,
        weight,
        mask,
        backend,
        mode="fused",
    )
    s, t = s.detach(), t.detach()
    if name == "torch":
        grad_rows = _grad_rows(s.shape[0], m, reduction, _acc(s.dtype), s.device)
        rows, gs, gt = reference.divergence_rows_and_grad(spec, s, t, grad_rows, w, m, teacher_grad)
        loss = reference.reduce_rows(rows, reduction, m, lead)
    else:
        loss, gs, gt = _kernel_loss_and_grad(
            s, t, None, w, m, spec, False, 0.0, name, reduction, lead, teacher_grad
        )
    gs = gs.reshape(student_logits.shape)
    if teacher_grad:
        return loss, gs, gt.reshape(teacher_logits.shape)
    return loss, gs


def _kernel_loss(s, t, index, w, m, spec, uniform, sum_tol, name, reduction, lead) -> Tensor:
    """The reduced loss through the kernels: the eager Function, or the custom op (what
    torch.compile traces) plus the reduction."""
    if _eager(s, t, index, w, m):
        return _DivergenceFunction.apply(
            s, t, index, w, m, spec, uniform, sum_tol, name, reduction, lead,
            torch.is_grad_enabled(),
        )  # fmt: skip
    rows, _ = _divergence_fwd(s, t, index, w, m, *spec, uniform, sum_tol, name)
    return reference.reduce_rows(rows, reduction, m, lead)


def _kernel_loss_and_grad(s, t, index, w, m, spec, uniform, sum_tol, name, reduction, lead,
                          need_grad_t):  # fmt: skip
    """(loss, grad_s, grad_t or None) from one fused launch (custom op under torch.compile)."""
    if not _eager(s, t, index, w, m):
        grad_rows = _grad_rows(s.shape[0], m, reduction, _acc(s.dtype), s.device)
        rows, gs, gt = _divergence_fwd_grad(
            s, t, index, w, m, grad_rows, *spec, uniform, sum_tol, need_grad_t, name
        )
        return reference.reduce_rows(rows, reduction, m, lead), gs, gt
    count = _masked_count(s, m, reduction)
    grad_rows, gspec, presummed = _eager_grad_rows(s, m, reduction, spec, count)
    rows, _, gs, gt = _launch_forward(
        s, t, index, w, m, gspec, uniform, sum_tol, name, grad_rows, need_grad_t
    )
    return _reduce(rows, reduction, m, lead, count, presummed), gs, gt


def _masked_count(s: Tensor, mask: Tensor | None, reduction: str) -> Tensor | None:
    """The row count a masked mean divides by (on the device), else None."""
    if reduction in ("mean", "batchmean") and mask is not None and s.shape[0] > 0:
        return reference.row_count(s.shape[0], mask, _acc(s.dtype), s.device)
    return None


def _reduce(rows, reduction, mask, lead, count: Tensor | None, presummed: bool) -> Tensor:
    """The loss from row losses, reusing a masked mean's ``count``; ``presummed``: the rows
    already carry the mean's 1/n, so their sum is the loss."""
    if presummed:
        return rows.sum()
    if count is not None:
        return rows.sum() / count
    return reference.reduce_rows(rows, reduction, mask, lead)


def _eager_grad_rows(
    s: Tensor, mask: Tensor | None, reduction: str, spec: DivSpec, count: Tensor | None
):
    """(grad_rows, spec, presummed) for an eager fused call without fill kernels: a masked
    mean reads 1 / ``count`` (from :func:`_masked_count`); a sum or an unmasked mean reads a
    cached 1 through a stride-0 view, the mean's 1/n scaling the coefficients (so also the
    row losses: ``presummed`` says their sum is the loss)."""
    n, acc = s.shape[0], _acc(s.dtype)
    if count is not None:
        return count.reciprocal().reshape(1).expand(n), spec, False
    factor = _mean_factor(n, mask, reduction)
    return _unit(acc, s.device).expand(n), _scaled(spec, factor), factor != 1.0


def _grad_rows(n: int, mask: Tensor | None, reduction: str, acc, device) -> Tensor:
    """d(loss)/d(row_loss[r]) for a reduction, as an (n,) view (stride 0), on the device."""
    if reduction in ("mean", "batchmean"):
        count = reference.row_count(n, mask, acc, device)
        if isinstance(count, Tensor):
            return count.reciprocal().reshape(1).expand(n)
        return torch.full((1,), 1.0 / count, dtype=acc, device=device).expand(n)
    return torch.ones((1,), dtype=acc, device=device).expand(n)


class _DivergenceLoss(nn.Module):
    kind = "jsd"

    def __init__(self, reduction="batchmean", temperature=1.0, beta=0.5, backend=None):
        super().__init__()
        self.reduction, self.temperature, self.beta, self.backend = (
            reduction,
            temperature,
            beta,
            backend,
        )
        make_spec(self.kind, beta, temperature)  # validate early
        if reduction not in reference.REDUCTIONS:
            raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")

    def forward(self, student_logits, teacher_logits, weight=None, mask=None):
        return softmax_divergence(
            student_logits,
            teacher_logits,
            kind=self.kind,
            beta=self.beta,
            temperature=self.temperature,
            reduction=self.reduction,
            weight=weight,
            mask=mask,
            backend=self.backend,
        )

    def extra_repr(self):
        return f"reduction={self.reduction!r}, temperature={self.temperature}"


class JSDLoss(_DivergenceLoss):
    """Generalised Jensen-Shannon divergence between student and teacher softmaxes.

    ``loss = T^2 * (beta*KL(Pt||M) + (1-beta)*KL(Ps||M))``, ``M = beta*Pt + (1-beta)*Ps``,
    ``Ps = softmax(student/T)``, ``Pt = softmax(teacher/T)``; beta=0.5 is the paper's JSD,
    beta=0 is exactly KL(Pt||Ps) and beta=1 exactly KL(Ps||Pt).

    Shapes: logits (..., C); loss scalar (or leading shape with reduction="none"). The teacher
    may be a :class:`SparseTeacher` (top-m probabilities) instead of logits.

    Example::

        loss_fn = JSDLoss()
        loss = loss_fn(student(x), teacher(x).detach())
        loss.backward()
    """

    kind = "jsd"

    def __init__(self, beta=0.5, reduction="batchmean", temperature=1.0, backend=None):
        if not isinstance(beta, Real) or not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
        super().__init__(reduction, temperature, beta, backend)

    def extra_repr(self):
        return f"beta={self.beta}, " + super().extra_repr()


class SymmetricKLLoss(_DivergenceLoss):
    """``T^2 * 0.5*(KL(Pt||Ps) + KL(Ps||Pt))``: PaddleClas's SSLD training loss.

    Shapes: logits (..., C); loss scalar (or leading shape with reduction="none").

    Example::

        loss = SymmetricKLLoss()(student_logits, teacher_logits)
    """

    kind = "sym_kl"

    def __init__(self, reduction="batchmean", temperature=1.0, backend=None):
        super().__init__(reduction, temperature, 0.5, backend)


class KLDivLoss(_DivergenceLoss):
    """``T^2 * KL(Pt||Ps)`` from logits: Hinton's knowledge-distillation term.

    Shapes: logits (..., C); loss scalar (or leading shape with reduction="none").

    Example::

        loss = KLDivLoss(temperature=4.0)(student_logits, teacher_logits)
    """

    kind = "kl"

    def __init__(self, reduction="batchmean", temperature=1.0, backend=None):
        super().__init__(reduction, temperature, 0.0, backend)


# ----------------------------------------------------------------------------------------------
# Sparse (top-m) teacher: custom ops for the Triton kernel (ssld_kernels/triton/sparse.py),
# the public SparseTeacher type and its path through the public functions.
# ----------------------------------------------------------------------------------------------

_INDEX_DTYPES = (torch.int64, torch.int32)


@dataclass(frozen=True, eq=False)
class SparseTeacher:
    """A teacher stored sparse: per row its top-m probabilities and their class ids.

    Pass it as ``teacher_logits`` to :func:`softmax_divergence`,
    :func:`softmax_divergence_and_grad` or the loss modules; every kind, beta, reduction,
    weight and mask works as with dense logits.

    Args:
        probs: (..., m) float32/float16/bfloat16 probabilities of the teacher's top-m classes
            (float64 with float64 student logits, torch/cpu backends), already softmaxed **at
            the loss temperature**, i.e. top-m of ``softmax(teacher_logits / T)``. The loss
            applies ``temperature`` to the student only and still multiplies by T^2, so it
            equals the dense loss with teacher logits ``T * log(Q)`` (Q below).
        index: (..., m) int64/int32 class ids, distinct within a row, in [0, C).
            Leading dims must equal the student's; 1 <= m <= C.
        remainder: the mass 1 - sum(probs) the teacher did not store. "uniform" (default):
            spread evenly over the other C - m classes. "ignore": probs are renormalised to
            sum 1 and the other classes get 0; KL(Ps||Pt) is then +inf on every row (Ps > 0
            everywhere), so with m < C kind="sym_kl" and kind="jsd" with beta=1 raise a
            ValueError; "kl" and "jsd" with beta < 1 are finite.
        validate: check the values on every call (ids in range and distinct, probs >= 0 and
            not NaN, row sums <= 1 + tol, a nonzero sum where the remainder is not spread) and
            raise a ValueError naming the first bad row; masked rows are not checked. This
            reads one flag back from the device (a host sync): pass False in hot loops and
            CUDA-graph steps once the data is trusted. Inside torch.compile the host check is
            skipped (it would break the graph). Without it invalid rows give NaN loss and
            gradient on every backend (a device-side guard, no sync; out-of-range ids are
            never dereferenced).

    Exact definition, per row, with S = sum(probs) and tol = max(1e-3, 2 eps(probs.dtype))
    (``reference.sparse_sum_tol``)::

        "uniform", m < C:     Q[index] = probs / max(S, 1),  Q[other] = max(1 - S, 0) / (C - m)
        "ignore", or m == C:  Q[index] = probs / S,          Q[other] = 0

    Q sums to 1; a sum above 1 within tol (rounding) is normalised away. A "uniform" row whose
    probs sum to exactly 1 gives the other classes 0 mass, so KL(Ps||Pt) (sym_kl, jsd with
    beta=1) is +inf there, as for a dense teacher with zero probabilities.

    Backends: "triton" (and "auto" on GPU) runs the fused Triton kernel, which never forms the
    dense teacher: one launch per row block reads the student row and the m entries and
    writes the loss and gradient. "cuda" runs that Triton kernel too (the CUDA extension has
    no sparse kernel; without triton it falls back to the reference). "cpu" has no C++ sparse
    kernel: it runs the plain-PyTorch reference on the CPU (which forms the dense (n, C)
    teacher), as does "torch". ``teacher_grad=True`` raises a ValueError: probs are data,
    not a function of teacher logits.

    Example::

        teacher = SparseTeacher.from_logits(teacher_logits, m=10, temperature=4.0)
        # store teacher.probs.half(), teacher.index.int(); later:
        loss = softmax_divergence(student_logits, SparseTeacher(probs, index), temperature=4.0)
    """

    probs: Tensor
    index: Tensor
    remainder: str = "uniform"
    validate: bool = True

    def __post_init__(self):
        p, i = self.probs, self.index
        if not isinstance(p, Tensor) or p.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"SparseTeacher.probs must be a float32, float16, bfloat16 or float64 tensor, "
                f"got {_describe(p)}"
            )
        if not isinstance(i, Tensor) or i.dtype not in _INDEX_DTYPES:
            raise TypeError(
                f"SparseTeacher.index must be an int64 or int32 tensor, got {_describe(i)}"
            )
        if p.dim() == 0 or p.shape != i.shape:
            raise ValueError(
                f"SparseTeacher.probs and .index must have the same shape (..., m), got "
                f"{tuple(p.shape)} and {tuple(i.shape)}"
            )
        if p.shape[-1] == 0:
            raise ValueError(f"SparseTeacher needs m >= 1 entries per row, got {tuple(p.shape)}")
        if p.device != i.device:
            raise ValueError(f"SparseTeacher.probs is on {p.device} but .index is on {i.device}")
        if self.remainder not in reference.REMAINDERS:
            raise ValueError(
                f"remainder must be one of {reference.REMAINDERS}, got {self.remainder!r}"
            )
        if not isinstance(self.validate, bool):
            raise TypeError(f"validate must be a bool, got {type(self.validate).__name__}")

    @property
    def m(self) -> int:
        """Entries stored per row."""
        return self.probs.shape[-1]

    @classmethod
    def from_logits(
        cls,
        teacher_logits: Tensor,
        m: int,
        *,
        temperature: float = 1.0,
        remainder: str = "uniform",
        validate: bool = True,
    ) -> "SparseTeacher":
        """Top-m of ``softmax(teacher_logits / temperature)`` (float32 probs, float64 for
        float64 logits; int64 ids), detached. Use the same temperature in the loss."""
        _check_logits_arg("teacher_logits", teacher_logits)
        if not 1 <= m <= teacher_logits.shape[-1]:
            raise ValueError(f"m must be in [1, {teacher_logits.shape[-1]}], got {m}")
        with torch.no_grad():
            x = teacher_logits.detach().to(_acc(teacher_logits.dtype)) / float(temperature)
            probs, index = torch.softmax(x, dim=-1).topk(m, dim=-1)
        return cls(probs, index, remainder, validate)

    def to_dense(self, n_classes: int) -> Tensor:
        """The dense (..., C) teacher distribution Q (float32, float64 for float64 probs)."""
        return reference.sparse_teacher_probs(self.probs, self.index, n_classes, self.remainder)


def _sparse_impl(name: str, device: torch.device) -> str:
    """Sparse implementation of a resolved backend: "triton" (fused kernel) or "torch"."""
    if name == "triton" or (name == "cuda" and backend_status(device.type)["triton"][0]):
        return "triton"
    return "torch"  # "cpu" (no C++ sparse kernel), "torch", "cuda" without triton


def _prepare_sparse(
    student_logits, teacher, kind, beta, temperature, reduction, weight, mask, teacher_grad, backend
):
    _check_logits_arg("student_logits", student_logits)
    s, probs, index = student_logits, teacher.probs, teacher.index
    c, m = s.shape[-1], probs.shape[-1]
    if teacher_grad:
        raise ValueError(
            "teacher_grad=True is not supported with a SparseTeacher (its probabilities are "
            "data, not a function of teacher logits); pass dense teacher_logits instead"
        )
    if probs.shape[:-1] != s.shape[:-1]:
        raise ValueError(
            f"shape mismatch: student_logits {tuple(s.shape)} has leading shape "
            f"{tuple(s.shape[:-1])}, SparseTeacher.probs {tuple(probs.shape)} has "
            f"{tuple(probs.shape[:-1])}"
        )
    if m > c:
        raise ValueError(
            f"SparseTeacher has m={m} entries per row but student_logits has only {c} classes"
        )
    if probs.device != s.device:
        raise ValueError(f"student_logits is on {s.device} but SparseTeacher is on {probs.device}")
    if (s.dtype == torch.float64) != (probs.dtype == torch.float64):
        raise TypeError(
            f"float64 needs float64 for both: student_logits is {s.dtype}, "
            f"SparseTeacher.probs is {probs.dtype}"
        )
    weight, mask, spec, lead = _prepare_options(s, kind, beta, temperature, reduction, weight, mask)
    if teacher.remainder == "ignore" and m < c and spec.mode == 0 and spec.coef_a != 0:
        what = "kind='jsd' with beta=1" if kind == "jsd" else f"kind={kind!r}"
        raise ValueError(
            f"{what} contains KL(Ps||Pt), which is +inf when remainder='ignore' leaves the "
            f"{c - m} classes outside the top-{m} with zero teacher mass; use "
            "remainder='uniform', kind='kl' or kind='jsd' with beta < 1"
        )
    name = resolve_backend(backend, s.device, (s.dtype, probs.dtype))
    tol = reference.sparse_sum_tol(probs.dtype)
    s2, p2, i2 = _rows(s, c), _rows(probs.detach(), m), _rows(index, m)
    if teacher.validate and not torch.compiler.is_compiling():
        _validate_sparse(p2, i2, c, mask, tol, teacher.remainder, lead)
    return s2, p2, i2, weight, mask, spec, lead, _sparse_impl(name, s.device), tol


def _validate_sparse(probs, index, c, mask, tol, remainder, lead):
    """Raise a ValueError naming the first invalid unmasked row (one host sync)."""
    bad = reference.sparse_invalid_rows(probs, index, c, tol)
    m = probs.shape[-1]
    total = probs.to(_acc(probs.dtype)).sum(-1)
    if remainder == "ignore" or m == c:
        bad = bad | (total == 0)
    if mask is not None:
        bad = bad & mask
    if not bool(bad.any()):
        return
    r = int(bad.nonzero()[0, 0])
    where = tuple(int(x) for x in torch.unravel_index(torch.tensor(r), tuple(lead)))
    ids, p = index[r].tolist(), probs[r]
    if any(not 0 <= i < c for i in ids):
        msg = f"class ids outside [0, {c}): {[i for i in ids if not 0 <= i < c]}"
    elif len(set(ids)) < len(ids):
        msg = f"repeated class ids {sorted({i for i in ids if ids.count(i) > 1})}"
    elif not bool((p >= 0).all()):
        msg = "negative or NaN probabilities"
    elif float(total[r]) > 1 + tol:
        msg = f"probabilities summing to {float(total[r]):.6g} > 1 + {tol:g}"
    else:
        msg = f"probabilities summing to 0 (remainder={remainder!r} cannot renormalise them)"
    raise ValueError(
        f"SparseTeacher row {where}: {msg}. (validate=False skips this host-side check; "
        "invalid rows then give NaN loss and gradient.)"
    )


def _sparse_divergence(
    student_logits,
    teacher,
    kind,
    beta,
    temperature,
    reduction,
    weight,
    mask,
    teacher_grad,
    backend,
    with_grad,
):
    s, probs, index, w, m, spec, lead, impl, tol = _prepare_sparse(
        student_logits,
        teacher,
        kind,
        beta,
        temperature,
        reduction,
        weight,
        mask,
        teacher_grad,
        backend,
    )
    uniform = teacher.remainder == "uniform"
    if not with_grad:
        if impl != "torch":
            return _kernel_loss(s, probs, index, w, m, spec, uniform, tol, impl, reduction, lead)
        rows = reference.sparse_divergence_rows(spec, s, probs, index, teacher.remainder, w, m, tol)
        return reference.reduce_rows(rows, reduction, m, lead)
    s = s.detach()
    if impl != "torch":
        loss, gs, _ = _kernel_loss_and_grad(
            s, probs, index, w, m, spec, uniform, tol, impl, reduction, lead, False
        )
    else:
        grad_rows = _grad_rows(s.shape[0], m, reduction, _acc(s.dtype), s.device)
        rows, gs = reference.sparse_divergence_rows_and_grad(
            spec, s, probs, index, grad_rows, teacher.remainder, w, m, tol
        )
        loss = reference.reduce_rows(rows, reduction, m, lead)
    return loss, gs.reshape(student_logits.shape)
