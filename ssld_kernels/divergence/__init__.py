"""Fused softmax + divergence losses (JSD, symmetric KL, KL) from logits.

The public functions and loss modules. Layering (as in flash-attention's interface), one
file per concern:

* ``_launch.py``: the kernels of every backend behind one signature (typed ``Rows`` of
  tensors and ``Kernel`` parameters);
* ``_ops.py``: the ``torch.library`` custom ops and their fakes (what tracers see);
* ``_autograd.py``: the one autograd Function, eager and compiled;
* ``_checks.py``: argument checks with errors that name the argument;
* ``sparse.py``: :class:`SparseTeacher` (top-m teacher probabilities) and its path.

The math is :mod:`ssld_kernels.reference` (the executable spec).
"""

from torch import Tensor, nn

from ssld_kernels import reference
from ssld_kernels._abi import acc_dtype
from ssld_kernels._backends import resolve_backend
from ssld_kernels.reference import make_spec

from ._autograd import grad_rows_of, kernel_loss, kernel_loss_and_grad
from ._checks import check_beta, check_options, check_pair, rows
from ._launch import Kernel, Rows
from .sparse import SparseTeacher, sparse_divergence

__all__ = [
    "SparseTeacher",
    "softmax_divergence",
    "softmax_divergence_and_grad",
    "JSDLoss",
    "SymmetricKLLoss",
    "KLDivLoss",
]


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
        opts = dict(
            kind=kind, beta=beta, temperature=temperature, reduction=reduction, weight=weight,
            mask=mask, teacher_grad=teacher_grad, backend=backend,
        )  # fmt: skip
        return sparse_divergence(student_logits, teacher_logits, opts, with_grad=False)
    x, k, lead = _prepare(
        student_logits, teacher_logits, kind, beta, temperature, reduction, weight, mask,
        teacher_grad, backend, "fwdbwd",
    )  # fmt: skip
    if k.backend == "torch":
        row_loss = reference.divergence_rows(k.spec, x.s, x.t, x.weight, x.mask)
        return reference.reduce_rows(row_loss, reduction, x.mask, lead)
    return kernel_loss(x, k, reduction, lead)


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
        opts = dict(
            kind=kind, beta=beta, temperature=temperature, reduction=reduction, weight=weight,
            mask=mask, teacher_grad=teacher_grad, backend=backend,
        )  # fmt: skip
        return sparse_divergence(student_logits, teacher_logits, opts, with_grad=True)
    x, k, lead = _prepare(
        student_logits, teacher_logits, kind, beta, temperature, reduction, weight, mask,
        False, backend, "fused",
    )  # fmt: skip
    if k.backend == "torch":
        s = x.s
        grad_rows = grad_rows_of(s.shape[0], x.mask, reduction, acc_dtype(s.dtype), s.device)
        row_loss, gs, gt = reference.divergence_rows_and_grad(
            k.spec, s, x.t, grad_rows, x.weight, x.mask, teacher_grad
        )
        loss = reference.reduce_rows(row_loss, reduction, x.mask, lead)
    else:
        loss, gs, gt = kernel_loss_and_grad(x, k, reduction, lead, teacher_grad)
    gs = gs.reshape(student_logits.shape)
    if teacher_grad:
        return loss, gs, gt.reshape(teacher_logits.shape)
    return loss, gs


def _prepare(s, t, kind, beta, temperature, reduction, weight, mask, teacher_grad, backend, mode):
    """Checked 2-D rows, kernel parameters and the leading shape of a dense-teacher call.
    C and the mode ("fwdbwd": autograd, "fused": no graph, both detached) select a tune-table
    entry on GPUs. The teacher stays attached only with ``teacher_grad``."""
    check_pair(s, t)
    weight, mask, spec, lead = check_options(s, kind, beta, temperature, reduction, weight, mask)
    c = s.shape[-1]
    name = resolve_backend(backend, s.device, (s.dtype, t.dtype), n_cols=c, mode=mode)
    s2 = rows(s if mode == "fwdbwd" else s.detach(), c)
    t2 = rows(t if teacher_grad else t.detach(), c)
    return Rows(s2, t2, None, weight, mask), Kernel(spec, name), lead


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
        check_beta(beta)
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
