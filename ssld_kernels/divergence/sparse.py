"""A teacher stored sparse (top-m probabilities and their class ids), its checks and its path
through the public functions: the Triton kernel of ``triton/sparse.py`` where there is one,
the plain-PyTorch reference elsewhere."""

from dataclasses import dataclass

import torch
from torch import Tensor

from ssld_kernels import reference
from ssld_kernels._abi import acc_dtype
from ssld_kernels._backends import backend_status, resolve_backend

from ._autograd import grad_rows_of, kernel_loss, kernel_loss_and_grad
from ._checks import (
    FLOAT_DTYPES,
    check_logits_arg,
    check_options,
    check_teacher_beside,
    describe,
    rows,
)
from ._launch import Kernel, Rows

__all__ = ["SparseTeacher"]

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
        if not isinstance(p, Tensor) or p.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"SparseTeacher.probs must be a float32, float16, bfloat16 or float64 tensor, "
                f"got {describe(p)}"
            )
        if not isinstance(i, Tensor) or i.dtype not in _INDEX_DTYPES:
            raise TypeError(
                f"SparseTeacher.index must be an int64 or int32 tensor, got {describe(i)}"
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
        check_logits_arg("teacher_logits", teacher_logits)
        if not 1 <= m <= teacher_logits.shape[-1]:
            raise ValueError(f"m must be in [1, {teacher_logits.shape[-1]}], got {m}")
        with torch.no_grad():
            x = teacher_logits.detach().to(acc_dtype(teacher_logits.dtype)) / float(temperature)
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


def _prepare_sparse(student_logits, teacher, *, kind, beta, temperature, reduction, weight, mask,
                    teacher_grad, backend) -> tuple[Rows, Kernel, torch.Size]:  # fmt: skip
    check_logits_arg("student_logits", student_logits)
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
    check_teacher_beside(s, probs, "SparseTeacher.probs")
    weight, mask, spec, lead = check_options(s, kind, beta, temperature, reduction, weight, mask)
    if teacher.remainder == "ignore" and m < c and spec.mode == 0 and spec.coef_a != 0:
        what = "kind='jsd' with beta=1" if kind == "jsd" else f"kind={kind!r}"
        raise ValueError(
            f"{what} contains KL(Ps||Pt), which is +inf when remainder='ignore' leaves the "
            f"{c - m} classes outside the top-{m} with zero teacher mass; use "
            "remainder='uniform', kind='kl' or kind='jsd' with beta < 1"
        )
    name = resolve_backend(backend, s.device, (s.dtype, probs.dtype))
    tol = reference.sparse_sum_tol(probs.dtype)
    s2, p2, i2 = rows(s, c), rows(probs.detach(), m), rows(index, m)
    if teacher.validate and not torch.compiler.is_compiling():
        _validate_sparse(p2, i2, c, mask, tol, teacher.remainder, lead)
    impl = _sparse_impl(name, s.device)
    k = Kernel(spec, impl, teacher.remainder == "uniform", tol)
    return Rows(s2, p2, i2, weight, mask), k, lead


def _validate_sparse(probs, index, c, mask, tol, remainder, lead):
    """Raise a ValueError naming the first invalid unmasked row (one host sync)."""
    bad = reference.sparse_invalid_rows(probs, index, c, tol)
    m = probs.shape[-1]
    total = probs.to(acc_dtype(probs.dtype)).sum(-1)
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


def sparse_divergence(student_logits, teacher: SparseTeacher, opts: dict, with_grad: bool):
    """The public functions' path for a SparseTeacher (``opts``: their keyword arguments)."""
    x, k, lead = _prepare_sparse(student_logits, teacher, **opts)
    reduction = opts["reduction"]
    if not with_grad:
        if k.backend != "torch":
            return kernel_loss(x, k, reduction, lead)
        rows_loss = reference.sparse_divergence_rows(
            k.spec, x.s, x.t, x.index, teacher.remainder, x.weight, x.mask, k.sum_tol
        )
        return reference.reduce_rows(rows_loss, reduction, x.mask, lead)
    x = x._replace(s=x.s.detach())
    if k.backend != "torch":
        loss, gs, _ = kernel_loss_and_grad(x, k, reduction, lead, False)
    else:
        s = x.s
        grad_rows = grad_rows_of(s.shape[0], x.mask, reduction, acc_dtype(s.dtype), s.device)
        rows_loss, gs = reference.sparse_divergence_rows_and_grad(
            k.spec, s, x.t, x.index, grad_rows, teacher.remainder, x.weight, x.mask, k.sum_tol
        )
        loss = reference.reduce_rows(rows_loss, reduction, x.mask, lead)
    return loss, gs.reshape(student_logits.shape)
