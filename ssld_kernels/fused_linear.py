"""Fused linear + divergence (LLM distillation): both lm-heads and the loss, chunk by chunk.

Math, per row r of N = prod(leading dims) (DESIGN.md section 2, "Fused linear + divergence")::

    u_s = h_s W_s^T + b_s                       u_t = h_t W_t^T + b_t          (rows of (N, V))
    z_s = cap_s * tanh(scale_s * u_s / cap_s)   (z_s = scale_s * u_s when cap_s is None)
    z_t = the same with the teacher's scale_t, cap_t
    row_r = D(z_s[r], z_t[r]) + ce_weight * (logsumexp(z_s[r]) - z_s[r, y_r])
    loss  = sum_r valid_r * row_r * factor

D is :func:`ssld_kernels.softmax_divergence`'s row loss (kind, beta, temperature, times T^2),
valid_r = (labels[r] != ignore_index) & mask[r], and factor = 1 / (count of valid rows) for
"mean"/"batchmean" (a device tensor), 1 / num_items_in_batch when given, 1 for "sum"/"none".
The cross-entropy term uses z_s at temperature 1.

Gradients (student side only; G = d loss / d z_s, one (chunk, V) block at a time)::

    G      = the fused kernel's d D / d z_s  +  ce_weight * (softmax(z_s) - onehot(y))
    G'     = G * (1 - (z_s / cap_s)^2)                        (the softcap's slope; scale_s below)
    dL/dh_s = factor * scale_s * G' @ W_s
    dL/dW_s = factor * scale_s * sum over chunks of G'^T @ h_s   (accumulated in float32)
    dL/db_s = factor * scale_s * column sums of G'                (float32)

Per chunk of rows: two head GEMMs, one fused loss-and-gradient kernel of this library
(``softmax_divergence_and_grad``: cpu C++, cuda, triton or the torch reference), the optional
cross-entropy term, and two GEMMs into the hidden-state and weight gradients. No (N, V) tensor
exists: the live blocks are (chunk, V) logits of each side and the logit gradient. The
gradients are computed in the forward (the loss is the last op of the graph, as in
Liger-Kernel's fused-linear losses) and the backward scales them by the incoming gradient; with
``reduction="none"`` the incoming gradient is per row, so the backward runs the chunks again.

Layering as in ssld_kernels/divergence/: launcher ``_fused_forward`` (the chunk loop) -> private
``torch.library.custom_op`` with ``register_fake`` (what torch.compile and tracers see) ->
``_FusedLinearDivergenceFunction`` -> :func:`fused_linear_divergence` -> ``nn.Module``.
Nothing reads a value back to the host: a mean's denominator stays a device tensor.
"""

import functools
import math
from numbers import Integral, Real
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ssld_kernels import reference
from ssld_kernels._abi import acc_dtype
from ssld_kernels._backends import resolve_backend
from ssld_kernels._torch_compat import eager as _eager
from ssld_kernels.divergence import softmax_divergence, softmax_divergence_and_grad

__all__ = [
    "fused_linear_divergence",
    "FusedLinearDivergence",
    "FusedLinearJSD",
    "auto_chunk_size",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LABEL_DTYPES = (torch.int64, torch.int32)

# Automatic chunk size (rows per chunk). Each chunk costs 4 GEMMs of c x H x V and one rank-c
# update of the float32 (V, H) weight-gradient accumulator, a full read and write of it: the
# update's share of the time is about (FLOP/s) / (bytes/s) / c, ~150/c on an H100/H200 (bf16
# tensor cores vs HBM) and ~15/c on a 2-core AVX2 CPU. Hence at least _MIN_ROWS rows, or
# Liger-Kernel's ~N*H/V rows (a logit block the size of the hidden states) when larger, and at
# most what keeps one float32 (chunk, V) block within _CHUNK_BYTES (3 such blocks are live at
# once: both sides' logits and the logit gradient).
_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 32 << 20}
_MIN_ROWS = {"cuda": 1024, "cpu": 256}
_ALIGN = {"cuda": 64, "cpu": 8}


def auto_chunk_size(n_rows: int, hidden: int, vocab: int, device_type: str = "cpu") -> int:
    """Rows per chunk chosen by :func:`fused_linear_divergence` when ``chunk_size`` is None:
    the larger of N*H/V and 256 on CPU / 1024 on GPU (amortising the weight-gradient
    accumulator's pass per chunk), at most what keeps a float32 (chunk, V) block within
    32 MiB on CPU / 1 GiB on GPU, rounded down to a multiple of 8 / 64, and at most N."""
    kind = "cuda" if device_type == "cuda" else "cpu"
    align, v = _ALIGN[kind], max(int(vocab), 1)
    rows = max(-(-int(n_rows) * int(hidden) // v), _MIN_ROWS[kind])
    rows = min(rows, max(align, _CHUNK_BYTES[kind] // (4 * v)))
    rows = max(align, rows // align * align)
    return max(1, min(int(n_rows), rows))


class _Options(NamedTuple):
    """Static options of one call: what the launcher and the custom op are specialised on."""

    kind: str
    beta: float
    temperature: float
    ignore_index: int
    ce_weight: float
    loss_scale: float  # multiplies the loss (the compat entry points' 1 / T^2)
    s_scale: float
    t_scale: float
    s_cap: float  # 0.0: no softcap
    t_cap: float
    chunk: int
    s_dtype: torch.dtype  # each side's GEMM dtype (the autocast dtype under autocast)
    t_dtype: torch.dtype
    backend: str


_N_OPTIONS = len(_Options._fields)


def _grad_h_dtype(h_dtype: torch.dtype) -> torch.dtype:
    """The hidden-state gradient is kept in float32 for float16 hidden states until the
    backward has applied the incoming gradient (a GradScaler's scale): the gradient of a mean
    over many rows underflows float16 before it (bfloat16 has float32's range)."""
    return torch.float32 if h_dtype == torch.float16 else h_dtype


# ----------------------------------------------------------------------------------------------
# launcher: the chunk loop
# ----------------------------------------------------------------------------------------------


def _head(h: Tensor, w: Tensor, b: Tensor | None, scale: float, cap: float) -> Tensor:
    """cap * tanh(scale * (h W^T + b) / cap), in place on the GEMM's output."""
    z = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
    if scale != 1.0:
        z.mul_(scale)
    if cap:
        z.div_(cap).tanh_().mul_(cap)
    return z


def _cross_entropy(z, labels, valid, row_weight, ce_weight, grad) -> Tensor:
    """ce_weight * (logsumexp(z) - z[y]) per row (0 where not valid); adds its gradient
    ce_weight * (softmax(z) - onehot(y)) (times row_weight) into ``grad`` when given."""
    acc = acc_dtype(z.dtype)
    zf = z.to(acc)  # z itself when already in the accumulation dtype: not written to
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()[:, None]
    lse = torch.logsumexp(zf, dim=-1)
    coef = valid.to(acc) * ce_weight
    if row_weight is not None:
        coef = coef * row_weight.to(acc)
    rows = torch.where(valid, (lse - zf.gather(1, y).squeeze(1)) * coef, torch.zeros_like(lse))
    if grad is not None:
        p = torch.exp(zf - lse[:, None])
        p.scatter_add_(1, y, -torch.ones_like(lse)[:, None])
        p.mul_(coef[:, None]).masked_fill_(~valid[:, None], 0.0)  # 0 even for non-finite rows
        grad.add_(p)
    return rows


def _mm_f32_supported(device: torch.device) -> bool:
    """Half GEMMs may accumulate into the float32 weight gradient in place: CUDA, sm_80+ (as
    Liger-Kernel requires for the same call), a torch with addmm's out_dtype."""
    if device.type != "cuda" or not _mm_out_dtype_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


@functools.cache
def _mm_out_dtype_available() -> bool:
    """Whether ``torch.addmm(c, a, b, out_dtype=torch.float32, out=c)`` exists (half GEMMs
    accumulating into float32 on CUDA, torch >= 2.8); probed once on meta tensors."""
    try:
        a = torch.empty((2, 2), dtype=torch.bfloat16, device="meta")
        c = torch.empty((2, 2), dtype=torch.float32, device="meta")
        return torch.addmm(c, a, a, out_dtype=torch.float32, out=c).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _valid_rows(labels: Tensor | None, mask: Tensor | None, ignore_index: int) -> Tensor | None:
    """(N,) bool: rows that count (labels != ignore_index, and mask), or None for all."""
    valid = None if labels is None else labels != ignore_index
    if mask is not None:
        valid = mask if valid is None else valid & mask
    return valid


def _fused_forward(
    h_s: Tensor,
    w_s: Tensor,
    b_s: Tensor | None,
    h_t: Tensor,
    w_t: Tensor,
    b_t: Tensor | None,
    labels: Tensor | None,
    mask: Tensor | None,
    row_weight: Tensor | None,
    factor: Tensor | None,
    opt: _Options,
    need_h: bool,
    need_w: bool,
    need_b: bool,
):
    """The chunk loop on 2-D hidden states: (rows (N,), grad_h (N, H) or None, grad_w (V, H)
    float32 or None, grad_b (V,) float32 or None).

    rows[r] = valid_r * row_r * row_weight[r] * factor * loss_scale; the gradients are those of
    rows.sum() (``row_weight``: a ``reduction="none"`` backward's incoming gradient)."""
    n, hidden = h_s.shape
    v = w_s.shape[0]
    dt, dev = opt.s_dtype, h_s.device
    acc = acc_dtype(dt)
    need = need_h or need_w or need_b
    rows_out = torch.empty(n, dtype=acc, device=dev)
    gh = torch.empty((n, hidden), dtype=_grad_h_dtype(h_s.dtype), device=dev) if need_h else None
    gw = torch.zeros((v, hidden), dtype=acc, device=dev) if need_w else None
    gb = torch.zeros((v,), dtype=acc, device=dev) if need_b else None
    valid = _valid_rows(labels, mask, opt.ignore_index)
    div = dict(kind=opt.kind, beta=opt.beta, temperature=opt.temperature, reduction="none")
    ws, wt = w_s.to(dt), w_t.to(opt.t_dtype)
    bs = None if b_s is None else b_s.to(dt)
    bt = None if b_t is None else b_t.to(opt.t_dtype)
    half_f32 = dt != acc and _mm_f32_supported(dev)
    with torch.autocast(dev.type, enabled=False), torch.no_grad():
        for start in range(0, n, opt.chunk):
            stop = min(start + opt.chunk, n)
            hs = h_s[start:stop].to(dt)
            zs = _head(hs, ws, bs, opt.s_scale, opt.s_cap)
            zt = _head(h_t[start:stop].to(opt.t_dtype), wt, bt, opt.t_scale, opt.t_cap)
            vr = None if valid is None else valid[start:stop]
            rw = None if row_weight is None else row_weight[start:stop]
            kw = dict(div, weight=rw, mask=vr, backend=opt.backend)
            if need:
                rows, g = softmax_divergence_and_grad(zs, zt, **kw)
            else:
                rows, g = softmax_divergence(zs, zt, **kw), None
            del zt
            if opt.ce_weight:
                rows = rows + _cross_entropy(zs, labels[start:stop], vr, rw, opt.ce_weight, g)
            rows_out[start:stop] = rows
            if not need:
                continue
            if opt.s_cap:  # the softcap's slope 1 - tanh^2, formed in the logits' buffer
                g.mul_(zs.div_(opt.s_cap).square_().neg_().add_(1.0))
            del zs
            if need_h:
                if gh.dtype == dt:
                    torch.mm(g, ws, out=gh[start:stop])
                else:
                    gh[start:stop] = g @ ws
            if need_w:
                if dt == acc:
                    gw.addmm_(g.t(), hs)
                elif half_f32:  # cuBLAS: half inputs, float32 accumulate into gw in place
                    torch.addmm(gw, g.t(), hs, out_dtype=acc, out=gw)
                else:  # each chunk's product rounded once to the half dtype, summed in float32
                    gw.add_(g.t() @ hs)
            if need_b:
                gb.add_(g.sum(0, dtype=acc))
    total = opt.loss_scale if factor is None else factor.to(acc) * opt.loss_scale
    _scale_(rows_out, total)
    if need:
        gtotal = total * opt.s_scale  # the student's logit scale: once, on the small results
        for x in (gh, gw, gb):
            if x is not None:
                _scale_(x, gtotal)
    return rows_out, gh, gw, gb


def _scale_(x: Tensor, k) -> None:
    if isinstance(k, Tensor) or k != 1.0:
        x.mul_(k)


# ----------------------------------------------------------------------------------------------
# custom op (opaque to torch.compile) with a fake implementation
# ----------------------------------------------------------------------------------------------


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


@torch.library.custom_op("ssld_kernels::fused_linear_divergence", mutates_args=())
def _fused_op(
    h_s: Tensor,
    w_s: Tensor,
    b_s: Tensor | None,
    h_t: Tensor,
    w_t: Tensor,
    b_t: Tensor | None,
    labels: Tensor | None,
    mask: Tensor | None,
    row_weight: Tensor | None,
    factor: Tensor | None,
    kind: str,
    beta: float,
    temperature: float,
    ignore_index: int,
    ce_weight: float,
    loss_scale: float,
    s_scale: float,
    t_scale: float,
    s_cap: float,
    t_cap: float,
    chunk: int,
    s_dtype: torch.dtype,
    t_dtype: torch.dtype,
    backend: str,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows and the student gradients of :func:`_fused_forward`; a skipped gradient is empty."""
    opt = _Options(kind, beta, temperature, ignore_index, ce_weight, loss_scale, s_scale,
                   t_scale, s_cap, t_cap, chunk, s_dtype, t_dtype, backend)  # fmt: skip
    rows, gh, gw, gb = _fused_forward(
        h_s, w_s, b_s, h_t, w_t, b_t, labels, mask, row_weight, factor, opt, need_h, need_w, need_b
    )
    return (
        rows,
        gh if gh is not None else _empty(h_s),
        gw if gw is not None else _empty(h_s).to(rows.dtype),
        gb if gb is not None else _empty(h_s).to(rows.dtype),
    )


@_fused_op.register_fake
def _(h_s, w_s, b_s, h_t, w_t, b_t, labels, mask, row_weight, factor, *rest):
    opt = _Options(*rest[:_N_OPTIONS])  # the op's trailing arguments: the options, then
    need_h, need_w, need_b = rest[_N_OPTIONS:]  # which gradients
    n, hidden = h_s.shape
    v = w_s.shape[0]
    acc = acc_dtype(opt.s_dtype)
    rows = h_s.new_empty((n,), dtype=acc)
    gh = h_s.new_empty((n, hidden), dtype=_grad_h_dtype(h_s.dtype)) if need_h else _empty(h_s)
    gw = h_s.new_empty((v, hidden), dtype=acc) if need_w else h_s.new_empty(0, dtype=acc)
    gb = h_s.new_empty((v,), dtype=acc) if need_b else h_s.new_empty(0, dtype=acc)
    return rows, gh, gw, gb


def _launch(tensors, factor, opt: _Options, need_h, need_w, need_b):
    """The launcher directly for plain tensors in eager mode (no dispatch overhead, and the
    ATen ops it dispatches stay visible to dispatch modes); the custom op under torch.compile,
    make_fx or FakeTensorMode."""
    if _eager(*tensors, factor):
        return _fused_forward(*tensors, factor, opt, need_h, need_w, need_b)
    rows, gh, gw, gb = _fused_op(*tensors, factor, *opt, need_h, need_w, need_b)
    return rows, gh if need_h else None, gw if need_w else None, gb if need_b else None


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class _FusedLinearDivergenceFunction(torch.autograd.Function):
    """Loss of :func:`fused_linear_divergence`; gradients for h_s, W_s, b_s.

    Scalar reductions: the forward computes the gradients (for an incoming gradient of 1) and
    the backward multiplies them by the incoming gradient, in place where the tensors are plain
    and nothing traces them (a second backward through a retained graph then raises instead of
    returning twice-scaled gradients). ``reduction="none"``: the forward computes the rows
    only and the backward runs the chunks again with the per-row incoming gradient."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, mask, factor, opt, reduction, lead,
                grad_on):  # fmt: skip
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b_s is not None and ctx.needs_input_grad[2]
        want = grad_on and (need_h or need_w or need_b)
        tensors = (h_s, w_s, b_s, h_t, w_t, b_t, labels, mask, None)
        ctx.opt, ctx.need = opt, (need_h, need_w, need_b)
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        ctx.consumed = False
        ctx.rows_grad = reduction == "none"
        if ctx.rows_grad:
            rows, _, _, _ = _launch(tensors, factor, opt, False, False, False)
            if want:
                ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, labels, mask)
            return rows.reshape(lead)
        if not want:
            rows, _, _, _ = _launch(tensors, factor, opt, False, False, False)
            return rows.sum()
        rows, gh, gw, gb = _launch(tensors, factor, opt, need_h, need_w, need_b)
        ctx.save_for_backward(gh, gw, gb)
        return rows.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        need_h, need_w, need_b = ctx.need
        if ctx.rows_grad:
            h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = ctx.saved_tensors
            tensors = (h_s, w_s, b_s, h_t, w_t, b_t, labels, mask, grad.reshape(-1))
            _, gh, gw, gb = _launch(tensors, None, ctx.opt, need_h, need_w, need_b)
        else:
            if ctx.consumed:  # before unpacking: autograd's version check would raise less clearly
                raise RuntimeError(
                    "fused_linear_divergence: a second backward through the same graph "
                    "(retain_graph=True) is not supported; the gradients computed in the "
                    "forward were scaled in place by the first"
                )
            gh, gw, gb = ctx.saved_tensors
            inplace = _eager(grad, gh, gw, gb)
            ctx.consumed = inplace
            gh, gw, gb = (None if x is None else _times(x, grad, inplace) for x in (gh, gw, gb))
        dh, dw, db = ctx.dtypes
        return (
            gh.to(dh) if need_h else None,
            gw.to(dw) if need_w else None,
            gb.to(db) if need_b else None,
        ) + (None,) * 10


def _times(x: Tensor, grad: Tensor, inplace: bool) -> Tensor:
    return x.mul_(grad) if inplace else x * grad


# ----------------------------------------------------------------------------------------------
# validation and the public API
# ----------------------------------------------------------------------------------------------


def _describe(x) -> str:
    return f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__


def _check_float(name: str, x, dim: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a float32, float16, bfloat16 or float64 tensor, got {x.dtype}"
        )
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(x.shape)}")
    if dim is None and x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension (features last), got a scalar")


def _check_number(name: str, x, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, Real) or not -math.inf < float(x) < math.inf:
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    if positive and not float(x) > 0:
        raise ValueError(f"{name} must be > 0, got {x!r}")
    if nonneg and not float(x) >= 0:
        raise ValueError(f"{name} must be >= 0, got {x!r}")
    return float(x)


def _check_cap(name: str, cap) -> float:
    if cap is None:
        return 0.0
    return _check_number(name, cap, positive=True)


def _compute_dtypes(tensors: dict, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """Each side's GEMM dtype: the autocast dtype under autocast (float64 excepted), else the
    side's own (its hidden states, weight and bias must then agree, as for F.linear)."""
    is64 = [x.dtype == torch.float64 for x in tensors.values() if x is not None]
    if any(is64) and not all(is64):
        listing = ", ".join(f"{k} {v.dtype}" for k, v in tensors.items() if v is not None)
        raise TypeError(f"float64 needs float64 for every tensor on both sides, got {listing}")
    if all(is64):
        return torch.float64, torch.float64
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        return dtype, dtype
    for side in ("student", "teacher"):
        h, w = tensors[f"{side}_hidden"], tensors[f"{side}_weight"]
        b = tensors[f"{side}_bias"]
        if w.dtype != h.dtype:
            raise TypeError(
                f"{side}_weight is {w.dtype} but {side}_hidden is {h.dtype}; outside autocast "
                "they must have the same dtype (as for torch.nn.functional.linear)"
            )
        if b is not None and b.dtype != w.dtype:
            raise TypeError(f"{side}_bias is {b.dtype} but {side}_weight is {w.dtype}")
    return tensors["student_hidden"].dtype, tensors["teacher_hidden"].dtype


def _prepare(
    student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
    labels, ignore_index, mask, kind, beta, temperature, reduction, num_items_in_batch,
    ce_weight, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap,
    chunk_size, backend, loss_scale,
):  # fmt: skip
    """Check every argument; -> (2-D tensors, factor, _Options, leading shape)."""
    _check_float("student_hidden", student_hidden)
    _check_float("teacher_hidden", teacher_hidden)
    _check_float("student_weight", student_weight, dim=2)
    _check_float("teacher_weight", teacher_weight, dim=2)
    hs, ht, ws, wt = student_hidden, teacher_hidden, student_weight, teacher_weight
    if ws.shape[1] != hs.shape[-1]:
        raise ValueError(
            f"student_weight must be (V, H) with H = student_hidden.shape[-1] = {hs.shape[-1]}, "
            f"got {tuple(ws.shape)}"
        )
    if wt.shape[1] != ht.shape[-1]:
        raise ValueError(
            f"teacher_weight must be (V, H') with H' = teacher_hidden.shape[-1] = "
            f"{ht.shape[-1]}, got {tuple(wt.shape)}"
        )
    if wt.shape[0] != ws.shape[0]:
        raise ValueError(
            f"vocabulary mismatch: student_weight has V={ws.shape[0]} rows, teacher_weight has "
            f"V={wt.shape[0]}"
        )
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"row shape mismatch: student_hidden {tuple(hs.shape)} vs teacher_hidden "
            f"{tuple(ht.shape)} (leading dimensions must agree)"
        )
    lead = hs.shape[:-1]
    v = ws.shape[0]
    for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if b is not None:
            _check_float(name, b, dim=1)
            if b.shape[0] != v:
                raise ValueError(f"{name} must have shape ({v},), got {tuple(b.shape)}")
    tensors = {
        "student_hidden": hs, "student_weight": ws, "student_bias": student_bias,
        "teacher_hidden": ht, "teacher_weight": wt, "teacher_bias": teacher_bias,
    }  # fmt: skip
    device = hs.device
    for name, x in tensors.items():
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {device}")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype not in _LABEL_DTYPES:
            raise TypeError(f"labels must be an int64 or int32 tensor, got {_describe(labels)}")
        if labels.shape != lead:
            raise ValueError(
                f"labels must have the hidden states' leading shape {tuple(lead)}, got "
                f"{tuple(labels.shape)}"
            )
        if labels.device != device:
            raise ValueError(f"labels is on {labels.device} but student_hidden is on {device}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {_describe(mask)}")
        if mask.shape != lead:
            raise ValueError(
                f"mask must have the hidden states' leading shape {tuple(lead)}, got "
                f"{tuple(mask.shape)}"
            )
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but student_hidden is on {device}")
    if kind not in reference.KINDS:
        raise ValueError(f"kind must be one of {reference.KINDS}, got {kind!r}")
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
    if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    temperature = _check_number("temperature", temperature, positive=True)
    ce_weight = _check_number("ce_weight", ce_weight, nonneg=True)
    if ce_weight and labels is None:
        raise ValueError("ce_weight > 0 needs labels (the hard-label cross-entropy targets)")
    s_scale = _check_number("student_logit_scale", student_logit_scale)
    t_scale = _check_number("teacher_logit_scale", teacher_logit_scale)
    s_cap = _check_cap("student_softcap", student_softcap)
    t_cap = _check_cap("teacher_softcap", teacher_softcap)
    n = math.prod(lead)
    h = hs.shape[-1]
    if chunk_size is None:
        chunk = auto_chunk_size(n, h, v, device.type)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    else:
        chunk = int(chunk_size)
    s_dtype, t_dtype = _compute_dtypes(tensors, device)
    acc = acc_dtype(s_dtype)
    factor = None
    scale = float(loss_scale)
    if num_items_in_batch is not None:
        if reduction not in ("mean", "batchmean"):
            raise ValueError(
                f"num_items_in_batch divides a mean; it needs reduction 'mean' or 'batchmean', "
                f"got {reduction!r}"
            )
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    f"num_items_in_batch must be a number or a one-element tensor, got shape "
                    f"{tuple(num_items_in_batch.shape)}"
                )
            factor = num_items_in_batch.detach().reshape(()).to(device, acc, non_blocking=True)
            factor = factor.reciprocal()
        else:
            scale /= _check_number("num_items_in_batch", num_items_in_batch, positive=True)
    elif reduction in ("mean", "batchmean"):
        valid = _valid_rows(labels, mask, ignore_index)
        if valid is None:
            scale /= max(n, 1)
        else:  # on the device: no host sync
            factor = reference.row_count(n, valid.reshape(-1), acc, device).reciprocal()
    # the kernel reads the logits in the GEMMs' dtypes
    name = resolve_backend(backend, device, (s_dtype, t_dtype), n_cols=v, mode="fused")
    opt = _Options(
        kind, float(beta), temperature, int(ignore_index), ce_weight, scale, s_scale, t_scale,
        s_cap, t_cap, chunk, s_dtype, t_dtype, name,
    )  # fmt: skip
    flat = (
        hs.reshape(n, h),
        ws,
        student_bias,
        ht.reshape(n, ht.shape[-1]),
        wt,
        teacher_bias,
        None if labels is None else labels.reshape(n),
        None if mask is None else mask.reshape(n),
    )
    return flat, factor, opt, lead


def fused_linear_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: "int | float | Tensor | None" = None,
    ce_weight: float = 0.0,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """:func:`softmax_divergence` on ``h_s @ W_s.T + b_s`` and ``h_t @ W_t.T + b_t``, computed
    chunk by chunk so that no (N, V) tensor exists; gradients for the student side only.

    Args:
        student_hidden: (..., H) student hidden states (the lm-head's input); leading dims are
            rows. student_weight: (V, H) lm-head weight; student_bias: (V,) or None.
        teacher_hidden: (..., H') with the same leading dims; teacher_weight: (V, H'), same V;
            teacher_bias: (V,) or None. The teacher side gets no gradient (frozen).
        labels: integer (leading shape); rows equal to ``ignore_index`` are ignored (0 loss,
            0 gradient, not counted by a mean), and they are the cross-entropy targets.
        mask: bool (leading shape); rows where it is False are ignored too.
        kind, beta, temperature: as :func:`softmax_divergence` (every kind times T^2).
        reduction: "none" (leading shape), "sum", "mean"/"batchmean" (sum over the rows that
            count divided by their number, a device tensor: no host sync).
        num_items_in_batch: with a mean, divide the sum by this instead (number or one-element
            tensor, e.g. the token count of all micro-batches of a gradient-accumulation step,
            so that the micro-batch losses add up to the whole batch's mean).
        ce_weight: adds ``ce_weight * cross_entropy(z_s, labels)`` per row (temperature 1),
            reduced like the divergence. Default 0 (no hard-label term).
        student_logit_scale, teacher_logit_scale: each side's logits are multiplied by it
            first (Cohere's ``logit_scale``), then soft-capped when
        student_softcap, teacher_softcap: ``cap * tanh(z / cap)`` (Gemma-2's
            ``final_logit_softcapping``); None for none.
        chunk_size: rows per chunk; None: :func:`auto_chunk_size` (N, H, V, device).
        backend: of the divergence kernel: "auto" (default), "cuda", "triton", "cpu", "torch".

    Under autocast the GEMMs run in the autocast dtype (the logits are what the model's own
    forward would produce); the loss kernel accumulates in float32, the weight and bias
    gradients are accumulated in float32 over chunks and returned in the parameters' dtypes.
    A second backward through a retained graph (``retain_graph=True``) raises.

    Returns the loss in float32 (float64 for float64 inputs).

    Example::

        loss = fused_linear_divergence(
            student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight,
            labels=labels, beta=0.5, temperature=2.0)
        loss.backward()
    """
    return _fused_linear_divergence(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
        teacher_bias, labels, ignore_index, mask, kind, beta, temperature, reduction,
        num_items_in_batch, ce_weight, student_logit_scale, teacher_logit_scale,
        student_softcap, teacher_softcap, chunk_size, backend, 1.0,
    )  # fmt: skip


def _fused_linear_divergence(*args) -> Tensor:
    """:func:`fused_linear_divergence` with positional arguments and a final ``loss_scale``
    (a constant factor on the loss, folded into the launch: the compat entry points' 1/T^2)."""
    flat, factor, opt, lead = _prepare(*args)
    reduction = args[12]
    return _FusedLinearDivergenceFunction.apply(
        *flat, factor, opt, reduction, lead, torch.is_grad_enabled()
    )


class FusedLinearDivergence(nn.Module):
    """Student and teacher lm-heads fused with a softmax divergence: the loss of
    ``softmax_divergence(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t)`` without the (N, V) logits.

    Formula (per row; see :func:`fused_linear_divergence`): with z = cap * tanh(scale *
    logits / cap) on each side, ``loss_row = T^2 * D(softmax(z_s/T), softmax(z_t/T)) +
    ce_weight * CE(z_s, label)``, D by ``kind`` ("jsd" with ``beta``, "sym_kl", "kl").

    Shapes: hidden states (..., H) and (..., H'), weights (V, H) and (V, H'), labels (...);
    loss scalar (or leading shape with reduction="none").

    Example::

        loss_fn = FusedLinearDivergence(kind="kl", temperature=2.0)
        loss = loss_fn(h_student, student.lm_head.weight, h_teacher, teacher.lm_head.weight,
                       labels)
        loss.backward()
    """

    def __init__(
        self,
        kind: str = "jsd",
        beta: float = 0.5,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        ce_weight: float = 0.0,
        student_logit_scale: float = 1.0,
        teacher_logit_scale: float = 1.0,
        student_softcap: float | None = None,
        teacher_softcap: float | None = None,
        chunk_size: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.kind, self.beta, self.temperature, self.reduction = kind, beta, temperature, reduction
        self.ignore_index, self.ce_weight = ignore_index, ce_weight
        self.student_logit_scale, self.teacher_logit_scale = (
            student_logit_scale,
            teacher_logit_scale,
        )
        self.student_softcap, self.teacher_softcap = student_softcap, teacher_softcap
        self.chunk_size, self.backend = chunk_size, backend
        if kind not in reference.KINDS:  # validate early; the rest is checked per call
            raise ValueError(f"kind must be one of {reference.KINDS}, got {kind!r}")
        if reduction not in reference.REDUCTIONS:
            raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
        reference.make_spec(kind, beta, temperature)

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        labels: Tensor | None = None,
        *,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        mask: Tensor | None = None,
        num_items_in_batch=None,
    ) -> Tensor:
        return fused_linear_divergence(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            labels=labels,
            ignore_index=self.ignore_index,
            mask=mask,
            kind=self.kind,
            beta=self.beta,
            temperature=self.temperature,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
            ce_weight=self.ce_weight,
            student_logit_scale=self.student_logit_scale,
            teacher_logit_scale=self.teacher_logit_scale,
            student_softcap=self.student_softcap,
            teacher_softcap=self.teacher_softcap,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, beta={self.beta}, temperature={self.temperature}, "
            f"reduction={self.reduction!r}, ce_weight={self.ce_weight}"
        )


class FusedLinearJSD(FusedLinearDivergence):
    """:class:`FusedLinearDivergence` with ``kind="jsd"``: ``T^2 * (beta*KL(Pt||M) +
    (1-beta)*KL(Ps||M))``, ``M = beta*Pt + (1-beta)*Ps`` (beta=0: KL(Pt||Ps), beta=1:
    KL(Ps||Pt)), from the hidden states and lm-head weights of both models.

    Example::

        loss_fn = FusedLinearJSD(beta=0.5, temperature=1.0)
        loss = loss_fn(h_student, student.lm_head.weight, h_teacher, teacher.lm_head.weight,
                       labels)
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, **kwargs):
        super().__init__("jsd", beta, temperature, **kwargs)
