"""Drop-in entry points with the semantics of TRL's and Liger-Kernel's distillation losses,
computed by this library's kernels.

Mirrored sources (read, not copied; the semantics are restated in each docstring):

* TRL, huggingface/trl at f2cd57710ae345ea6428ae95363267fcf38a3dc8 (2026-07-24),
  ``trl/experimental/gkd/gkd_trainer.py``: ``GKDTrainer.generalized_jsd_loss`` (a
  staticmethod; older releases had it in ``trl/trainer/gkd_trainer.py`` without ``labels`` and
  ``num_items_in_batch``).
* Liger-Kernel, linkedin/Liger-Kernel at ead96b618e5c67bddc6a6e9bcb99bfe6b5ab661c
  (2026-08-21): ``src/liger_kernel/transformers/jsd.py`` (``LigerJSD``),
  ``src/liger_kernel/ops/jsd.py`` (``LigerJSDFunction``),
  ``src/liger_kernel/transformers/fused_linear_jsd.py`` (``LigerFusedLinearJSD``) and
  ``src/liger_kernel/ops/fused_linear_jsd.py`` (``LigerFusedLinearJSDFunction``).

All three use this library's convention for beta, which is also theirs: with P_s the student's
and P_t the teacher's distribution, ``M = beta*P_t + (1-beta)*P_s`` and ``JSD = beta*KL(P_t||M)
+ (1-beta)*KL(P_s||M)``; beta=0 is exactly KL(P_t||P_s) (forward KL), beta=1 exactly
KL(P_s||P_t) (reverse KL). Neither library multiplies by T^2: these entry points divide this
library's T^2-scaled loss by T^2 (a constant folded into the launch or one scalar multiply).

Swaps::

    GKDTrainer.generalized_jsd_loss = ssld_kernels.compat.generalized_jsd_loss
    from ssld_kernels.compat import LigerJSD                # for liger_kernel.transformers.LigerJSD
    from ssld_kernels.compat import LigerFusedLinearJSD     # for ...transformers.LigerFusedLinearJSD
"""

import math
from numbers import Real

import torch
from torch import Tensor, nn

from ssld_kernels._abi import acc_dtype
from ssld_kernels.divergence import softmax_divergence
from ssld_kernels.fused_linear import _fused_linear_divergence

__all__ = ["generalized_jsd_loss", "LigerJSD", "LigerFusedLinearJSD"]

TRL_IGNORE_INDEX = -100  # TRL's generalized_jsd_loss masks labels == -100 (not configurable)
_INT_DTYPES = (torch.int64, torch.int32)


def _check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension (vocabulary last), got a scalar")


def _check_labels(name: str, labels, lead, device) -> None:
    if not isinstance(labels, Tensor) or labels.dtype not in _INT_DTYPES:
        what = f"a {labels.dtype} tensor" if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {what}")
    if labels.shape != lead:
        raise ValueError(
            f"{name} must have the logits' leading shape {tuple(lead)}, got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the logits are on {device}")


def _trl_elementwise(s: Tensor, t: Tensor, beta: float, temperature: float) -> Tensor:
    """TRL's per-element terms (what its reduction="none" returns), in float32/float64: the
    kl_div elements q (log q - log p), p (log p - log q), or beta q (log q - log m) + (1-beta)
    p (log p - log m) with log m the log of the mixture, from log-probabilities at T."""
    acc = acc_dtype(s.dtype)
    ls = torch.log_softmax(s.to(acc) / temperature, dim=-1)
    lt = torch.log_softmax(t.to(acc) / temperature, dim=-1)
    if beta == 0:
        return torch.nn.functional.kl_div(ls, lt, reduction="none", log_target=True)
    if beta == 1:
        return torch.nn.functional.kl_div(lt, ls, reduction="none", log_target=True)
    lm = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), dim=0)
    kl_t = torch.nn.functional.kl_div(lm, lt, reduction="none", log_target=True)
    kl_s = torch.nn.functional.kl_div(lm, ls, reduction="none", log_target=True)
    return beta * kl_t + (1 - beta) * kl_s


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    *,
    backend: str | None = None,
) -> Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss``, same arguments and numbers (no T^2 factor).

    A ``staticmethod`` object, as in TRL, so ``GKDTrainer.generalized_jsd_loss =
    generalized_jsd_loss`` replaces it and ``self.generalized_jsd_loss(...)`` still works; it
    is also callable directly.

    Semantics mirrored (``jsd`` is the per-element divergence of softmax(s/T), softmax(t/T)):
    rows whose ``labels`` equal -100 are dropped; then ``num_items_in_batch`` (when given,
    whatever the reduction): ``sum / num_items_in_batch``; "batchmean": ``sum / max(count of
    kept rows, 1)`` with labels, ``sum / max(student_logits.shape[0], 1)`` without (TRL divides
    by the first dimension, the batch size for (B, T, V) logits); "sum": the sum; "mean": the
    mean over elements, ``sum / (kept rows * V)`` (NaN when no row is kept, as in TRL);
    "none": the per-element tensor, shape (..., V), or (kept rows, V) with labels.
    A teacher that requires grad gets its gradient, as through TRL's formula.

    Differences: scalar reductions run the fused kernel (float32 accumulation, also for
    bfloat16 logits, where TRL computes in bfloat16); the result is cast to the logits'
    promoted dtype as TRL's is. "none" is computed by plain PyTorch ops (the kernel produces
    row sums, not elements); with labels it selects the kept rows by boolean indexing, a host
    sync, as TRL does. ``backend`` is an addition (keyword only).
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    s, t = student_logits, teacher_logits
    if s.shape != t.shape:
        raise ValueError(
            f"shape mismatch: student_logits {tuple(s.shape)} vs teacher_logits {tuple(t.shape)}"
        )
    if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if reduction not in ("batchmean", "sum", "mean", "none"):
        raise ValueError(
            f"reduction must be one of ('batchmean', 'sum', 'mean', 'none'), got {reduction!r}"
        )
    beta, temperature = float(beta), float(temperature)
    mask = None
    if labels is not None:
        _check_labels("labels", labels, s.shape[:-1], s.device)
        mask = labels != TRL_IGNORE_INDEX
    out_dtype = torch.promote_types(s.dtype, t.dtype)
    if reduction == "none" and num_items_in_batch is None:
        jsd = _trl_elementwise(s, t, beta, temperature)
        return (jsd if mask is None else jsd[mask]).to(out_dtype)
    total = softmax_divergence(
        s, t, kind="jsd", beta=beta, temperature=temperature, reduction="sum", mask=mask,
        teacher_grad=t.requires_grad, backend=backend,
    ) * (1.0 / temperature**2)  # fmt: skip
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device, non_blocking=True)
        loss = total / num_items_in_batch
    elif reduction == "batchmean":
        denom = mask.sum().clamp_min(1) if mask is not None else max(s.shape[0], 1)
        loss = total / denom
    elif reduction == "sum":
        loss = total
    else:  # "mean": over elements
        v = s.shape[-1]
        loss = total / (mask.sum() * v if mask is not None else s.numel())
    return loss.to(out_dtype)


generalized_jsd_loss = staticmethod(generalized_jsd_loss)  # noqa: F811 - assignable to a class


class LigerJSD(nn.Module):
    """Liger-Kernel's ``LigerJSD``: generalized JSD between two *log-probability* tensors.

    ``forward(log_q, log_p, shift_labels=None)``: ``log_q`` is the **student** (the
    prediction, Liger's ``_input``), ``log_p`` the **teacher** (Liger's ``target``), both
    (BT, V) log-probabilities (any leading dims here). ``beta`` weights the teacher:
    ``beta*KL(P||M) + (1-beta)*KL(Q||M)``, ``M = beta*P + (1-beta)*Q`` (P teacher, Q
    student); beta=0: KL(P||Q), beta=1: KL(Q||P). No temperature. Rows whose ``shift_labels``
    equal ``ignore_index`` give 0; the sum is divided by the number of the other rows (all
    rows without labels); all rows ignored gives 0. The loss is returned in ``log_q``'s
    dtype, as Liger's is; ``log_p`` gets no gradient.

    Difference: Liger differentiates with respect to ``log_q`` as free coordinates; this
    treats them as logits (they are normalised already, so softmax(log_q) = exp(log_q)) and
    returns that gradient, which differs from Liger's by a multiple of exp(log_q) per row.
    The two agree after ``log_softmax``'s backward (``log_q = logits.log_softmax(-1)``, the
    documented use), i.e. on every parameter upstream. ``backend`` is an addition.

    Example::

        jsd = LigerJSD(beta=0.1)
        loss = jsd(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), labels)
    """

    def __init__(self, beta: float = 0.5, ignore_index: int = -100, *, backend=None):
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
        self.beta, self.ignore_index, self.backend = float(beta), int(ignore_index), backend

    def forward(
        self, log_q: Tensor, log_p: Tensor, shift_labels: Tensor | None = None
    ) -> Tensor:  # fmt: skip
        _check_logits("log_q", log_q)
        mask = None
        if shift_labels is not None:
            _check_labels("shift_labels", shift_labels, log_q.shape[:-1], log_q.device)
            mask = shift_labels != self.ignore_index
        loss = softmax_divergence(
            log_q, log_p, kind="jsd", beta=self.beta, reduction="mean", mask=mask,
            backend=self.backend,
        )  # fmt: skip
        return loss.to(log_q.dtype)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, ignore_index={self.ignore_index}"


class LigerFusedLinearJSD(nn.Module):
    """Liger-Kernel's ``LigerFusedLinearJSD``: lm-heads fused with the generalized JSD.

    Constructor ``(jsd_beta=0.5, ignore_index=-100, temperature=1.0, accum_dtype=None)`` and
    ``forward(student_input, student_weight, teacher_input, teacher_weight, shift_labels)`` as
    Liger's: inputs (BT, H) and (BT, H'), weights (V, H) and (V, H'), shift_labels (BT,) or
    None. Loss = sum over rows not equal to ``ignore_index`` of ``JSD_beta(softmax(x_t W_t^T /
    T), softmax(x_s W_s^T / T))`` divided by their count (all BT rows without labels; 0 when
    every row is ignored), **no T^2 factor**; beta weights the teacher (see
    :class:`LigerJSD`). Returns float32; gradients for student_input and student_weight.

    Deliberate differences: ``shift_labels`` defaults to None (Liger requires the argument,
    None allowed); the weight gradient is always accumulated in float32 over chunks (float64
    for float64 inputs), i.e. as Liger with ``accum_dtype=torch.float32``, and returned in the
    weight's dtype: ``accum_dtype`` is accepted for compatibility and ignored; ``temperature``
    must be > 0 (Liger only asserts != 0); the mean's count stays on the device (Liger reads
    it with ``.item()``). Keyword-only additions: ``chunk_size``, ``backend``. For biases,
    logit scale, softcap, other kinds or a CE term use :func:`fused_linear_divergence`.
    """

    def __init__(
        self,
        jsd_beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        accum_dtype: torch.dtype | None = None,
        *,
        chunk_size: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if temperature == 0:
            raise ValueError("temperature cannot be 0.")
        if isinstance(temperature, bool) or not isinstance(temperature, Real) or temperature < 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if accum_dtype is not None and not (
            isinstance(accum_dtype, torch.dtype) and accum_dtype.is_floating_point
        ):
            raise TypeError(f"accum_dtype must be None or a float dtype, got {accum_dtype!r}")
        self.jsd_beta, self.ignore_index, self.temperature = jsd_beta, ignore_index, temperature
        self.accum_dtype, self.chunk_size, self.backend = accum_dtype, chunk_size, backend

    def forward(
        self,
        student_input: Tensor,
        student_weight: Tensor,
        teacher_input: Tensor,
        teacher_weight: Tensor,
        shift_labels: Tensor | None = None,
    ) -> Tensor:
        t = float(self.temperature)
        return _fused_linear_divergence(
            student_input, student_weight, teacher_input, teacher_weight, None, None,
            shift_labels, self.ignore_index, None, "jsd", self.jsd_beta, t, "mean", None, 0.0,
            1.0, 1.0, None, None, self.chunk_size, self.backend, 1.0 / (t * t),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"jsd_beta={self.jsd_beta}, ignore_index={self.ignore_index}, "
            f"temperature={self.temperature}"
        )
