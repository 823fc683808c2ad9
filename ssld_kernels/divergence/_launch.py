"""Launchers: the kernels of every backend behind one signature.

The tensors of a call travel as :class:`Rows`, the static parameters the kernels are
specialised on as :class:`Kernel`. Contract shared by every backend: 2-D logits (n, C) with
last-dim stride 1 and any row stride; per row a float32 (float64 for float64 inputs)
``row_loss`` and ``stats`` (``_abi.STATS_WIDTH`` floats, ``SPARSE_STATS_WIDTH`` for a sparse
teacher) that the backward reuses, so it is one pass over the logits; gradients in the
logits' dtypes. The math is :mod:`ssld_kernels.reference` (the executable spec).

* cpu, cuda: the compiled extension (``csrc/divergence_cpu.cpp``, ``csrc/divergence.cu``),
  one ``DivParams`` struct per call;
* triton: ``ssld_kernels/triton/divergence.py`` (dense teacher) and
  ``ssld_kernels/triton/sparse.py`` (a :class:`~ssld_kernels.divergence.SparseTeacher`).
"""

from typing import NamedTuple

import torch
from torch import Tensor

from ssld_kernels._abi import DTYPE_CODES, STATS_WIDTH, acc_dtype
from ssld_kernels._backends import ext
from ssld_kernels._tune_table import launch_config
from ssld_kernels.reference import DivSpec

__all__ = ["Kernel", "Rows", "acc_dtype", "launch_forward", "launch_backward"]


class Rows(NamedTuple):
    """The tensors of one call, 2-D: ``t`` holds teacher logits (n, C) when ``index`` is
    None, else a SparseTeacher's top-m probabilities (n, m) and ``index`` their class ids."""

    s: Tensor
    t: Tensor
    index: Tensor | None = None
    weight: Tensor | None = None  # (n,) in the accumulation dtype
    mask: Tensor | None = None  # (n,) bool


class Kernel(NamedTuple):
    """What the kernels are specialised on besides the tensors."""

    spec: DivSpec
    backend: str  # "cpu", "cuda" or "triton"
    uniform: bool = False  # sparse teacher: spread the stored remainder (else renormalise)
    sum_tol: float = 0.0  # sparse teacher: tolerance of its row sums

    def flat(self) -> tuple:
        """The custom ops' trailing arguments (see ``_ops.py``), in schema order."""
        return (*self.spec, self.uniform, self.sum_tol, self.backend)

    @classmethod
    def from_flat(cls, mode, beta, coef_a, coef_b, inv_temp, uniform, sum_tol, backend):
        return cls(DivSpec(mode, beta, coef_a, coef_b, inv_temp), backend, uniform, sum_tol)

    def scaled(self, factor: float) -> "Kernel":
        """Both loss coefficients times ``factor`` (loss and gradients are linear in them)."""
        if factor == 1.0:
            return self
        mode, beta, coef_a, coef_b, inv_temp = self.spec
        spec = DivSpec(mode, beta, coef_a * factor, coef_b * factor, inv_temp)
        return Kernel(spec, self.backend, self.uniform, self.sum_tol)


# ----------------------------------------------------------------------------------------------
# the compiled extension (cpu, cuda)
# ----------------------------------------------------------------------------------------------


def _ext_params(x: Rows, spec: DivSpec, grad_rows, mode: str):
    s, t = x.s, x.t
    p = ext().DivParams()
    p.s, p.s_dtype, p.s_stride = s.data_ptr(), DTYPE_CODES[s.dtype], s.stride(0)
    p.t, p.t_dtype, p.t_stride = t.data_ptr(), DTYPE_CODES[t.dtype], t.stride(0)
    p.n_rows, p.n_cols = s.shape
    p.mode, p.beta, p.coef_a, p.coef_b, p.inv_temp = spec
    temperature = 1.0 / spec.inv_temp
    p.loss_scale, p.grad_scale = temperature * temperature, temperature
    if x.weight is not None:
        p.weight = x.weight.data_ptr()
    if x.mask is not None:  # bool: one byte per row, read as uint8
        p.mask = x.mask.data_ptr()
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


def _grads(p, x: Rows, need_s: bool, need_t: bool):
    """Allocate the requested gradients and point ``p`` at them."""
    s, t = x.s, x.t
    n, c = s.shape
    gs = torch.empty((n, c), dtype=s.dtype, device=s.device) if need_s else None
    gt = torch.empty((n, c), dtype=t.dtype, device=t.device) if need_t else None
    if gs is not None:
        p.grad_s, p.grad_s_stride = gs.data_ptr(), c
    if gt is not None:
        p.grad_t, p.grad_t_stride = gt.data_ptr(), c
    return gs, gt


def _ext_forward(x: Rows, spec, grad_rows, need_s, need_t):
    s = x.s
    n = s.shape[0]
    acc = acc_dtype(s.dtype)
    row_loss = s.new_empty(n, dtype=acc)
    stats = s.new_empty((n, STATS_WIDTH), dtype=acc)
    p = _ext_params(x, spec, grad_rows, "fused" if need_s or need_t else "fwdbwd")
    p.row_loss, p.stats = row_loss.data_ptr(), stats.data_ptr()
    gs, gt = _grads(p, x, need_s, need_t)
    (ext().divergence_forward_cuda if s.is_cuda else ext().divergence_forward_cpu)(p)
    return row_loss, stats, gs, gt


def _ext_backward(x: Rows, spec, stats, grad_rows, need_s, need_t):
    p = _ext_params(x, spec, grad_rows, "fwdbwd")
    p.stats = stats.data_ptr()
    gs, gt = _grads(p, x, need_s, need_t)
    (ext().divergence_backward_cuda if x.s.is_cuda else ext().divergence_backward_cpu)(p)
    return gs, gt


# ----------------------------------------------------------------------------------------------
# one entry per direction for every backend and both teacher forms
# ----------------------------------------------------------------------------------------------


def _mask_u8(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else mask.view(torch.uint8)


def launch_forward(x: Rows, k: Kernel, grad_rows: Tensor | None = None, need_grad_t=False):
    """-> (row_loss, stats, grad_s or None, grad_t or None). With ``grad_rows`` the same
    launch also writes the gradients of sum_r grad_rows[r] * row_loss[r] (the fused path):
    the student's, and the teacher's with ``need_grad_t``."""
    need_s = grad_rows is not None
    need_grad_t = need_grad_t and need_s
    if x.index is not None:
        if k.backend != "triton":
            raise ValueError(f"the sparse-teacher kernel is triton's, got backend {k.backend!r}")
        from ssld_kernels.triton.sparse import sparse_divergence_forward

        row_loss, stats, gs = sparse_divergence_forward(
            x.s, x.t, x.index, x.weight, _mask_u8(x.mask), k.spec, k.uniform, k.sum_tol,
            grad_rows, need_s,
        )  # fmt: skip
        return row_loss, stats, gs, None
    if k.backend == "triton":
        from ssld_kernels.triton.divergence import divergence_forward

        return divergence_forward(
            x.s, x.t, x.weight, _mask_u8(x.mask), k.spec, grad_rows, need_s, need_grad_t
        )
    return _ext_forward(x, k.spec, grad_rows, need_s, need_grad_t)


def launch_backward(x: Rows, k: Kernel, stats: Tensor, grad_rows: Tensor, need_s, need_t):
    """-> (grad_s or None, grad_t or None) of sum_r grad_rows[r] * row_loss[r], from the
    forward's ``stats`` (a sparse teacher has no gradient)."""
    if x.index is not None:
        if not need_s:
            return None, None
        from ssld_kernels.triton.sparse import sparse_divergence_backward

        gs = sparse_divergence_backward(
            x.s, x.t, x.index, x.weight, _mask_u8(x.mask), stats, grad_rows, k.spec,
            k.uniform, k.sum_tol,
        )  # fmt: skip
        return gs, None
    if k.backend == "triton":
        from ssld_kernels.triton.divergence import divergence_backward

        return divergence_backward(
            x.s, x.t, x.weight, _mask_u8(x.mask), stats, grad_rows, k.spec, need_s, need_t
        )
    return _ext_backward(x, k.spec, stats, grad_rows, need_s, need_t)
