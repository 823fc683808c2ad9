"""Argument checks at the public boundary: readable errors that name the argument, and the
2-D row views the launchers take."""

import math
from numbers import Real

import torch
from torch import Tensor

from ssld_kernels import reference
from ssld_kernels._abi import acc_dtype
from ssld_kernels.reference import DivSpec, make_spec

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def describe(x) -> str:
    return f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__


def check_logits_arg(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dimension (classes last), got a scalar")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16, bfloat16 or float64 logits, got {x.dtype}"
        )


def check_pair(s, t) -> None:
    """Student and teacher logits that can be compared class by class."""
    for name, x in (("student_logits", s), ("teacher_logits", t)):
        check_logits_arg(name, x)
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"class dimension mismatch: student_logits has {s.shape[-1]} classes "
            f"(shape {tuple(s.shape)}), teacher_logits has {t.shape[-1]} (shape {tuple(t.shape)})"
        )
    if s.shape != t.shape:
        raise ValueError(
            f"shape mismatch: student_logits {tuple(s.shape)} vs teacher_logits {tuple(t.shape)}"
        )
    check_teacher_beside(s, t, "teacher_logits")


def check_teacher_beside(s: Tensor, t: Tensor, name: str) -> None:
    """The teacher tensor ``t`` (logits, or a SparseTeacher's probs) on the student's device,
    and float64 only together with float64 student logits."""
    if s.device != t.device:
        raise ValueError(f"student_logits is on {s.device} but {name} is on {t.device}")
    if (s.dtype == torch.float64) != (t.dtype == torch.float64):
        raise TypeError(
            f"float64 needs float64 for both: student_logits is {s.dtype}, {name} is {t.dtype}"
        )


def check_options(s: Tensor, kind, beta, temperature, reduction, weight, mask):
    """Check the options and per-row arrays against student logits ``s``:
    -> (weight (n,) acc dtype or None, mask (n,) bool or None, spec, leading shape)."""
    if kind not in reference.KINDS:
        raise ValueError(f"kind must be one of {reference.KINDS}, got {kind!r}")
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
    check_beta(beta)
    # comparisons, not math.isfinite: dynamo (dynamic=True) cannot trace isfinite of a float
    if not isinstance(temperature, Real) or not 0 < float(temperature) < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    c = s.shape[-1]
    lead = s.shape[:-1]
    n = math.prod(lead)
    if c == 0 and n > 0:
        raise ValueError(f"student_logits has 0 classes (shape {tuple(s.shape)})")
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {describe(weight)}")
        _check_rows_arg("weight", weight, lead, s.device)
        weight = weight.detach().reshape(-1).to(acc_dtype(s.dtype)).contiguous()
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {describe(mask)}")
        _check_rows_arg("mask", mask, lead, s.device)
        mask = mask.reshape(-1).contiguous()
    spec: DivSpec = make_spec(kind, beta, temperature)
    return weight, mask, spec, lead


def check_beta(beta) -> None:
    if not isinstance(beta, Real) or not (0.0 <= float(beta) <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")


def _check_rows_arg(name: str, x: Tensor, lead, device) -> None:
    if x.shape != lead:
        raise ValueError(
            f"{name} must have the logits' leading shape {tuple(lead)}, got {tuple(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the logits are on {device}")


def rows(x: Tensor, c: int) -> Tensor:
    """(..., C) -> (n, C) view with unit class stride; copies only when no such view exists."""
    x2 = x.reshape(-1, c) if c > 0 else x.reshape(-1, 0)
    if c > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2
