"""Shared test helpers: backend/device grid and float64 oracles independent of the kernels."""

import pytest
import torch
import torch.nn.functional as F

from ssld_kernels._backends import backend_status

HAS_CUDA = torch.cuda.is_available()


def backend_params():
    """(backend, device) pairs to test; GPU ones carry the `cuda` marker."""
    out = []
    cpu_status = backend_status("cpu")
    for name in ("torch", "cpu", "triton"):
        marks = [] if cpu_status[name][0] else [pytest.mark.skip(reason=cpu_status[name][1])]
        out.append(pytest.param(name, "cpu", id=f"{name}-cpu", marks=marks))
    for name in ("cuda", "triton", "torch"):
        out.append(pytest.param(name, "cuda", id=f"{name}-cuda", marks=[pytest.mark.cuda]))
    return out


def naive_divergence_rows(s, t, kind, beta, temperature):
    """TRL-style composition in float64 (log_softmax + kl_div + logsumexp of the mixture).

    Written independently of ssld_kernels.reference: used as the oracle for values and, through
    autograd, for gradients.
    """
    s = s.double() / temperature
    t = t.double() / temperature
    ls = F.log_softmax(s, -1)
    lt = F.log_softmax(t, -1)

    def kl(target_log, input_log):  # KL(target || input), x log x -> 0
        return F.kl_div(input_log, target_log, reduction="none", log_target=True).sum(-1)

    if kind == "kl" or (kind == "jsd" and beta == 0):
        out = kl(lt, ls)
    elif kind == "jsd" and beta == 1:
        out = kl(ls, lt)
    elif kind == "sym_kl":
        out = 0.5 * (kl(lt, ls) + kl(ls, lt))
    else:
        b = torch.tensor(beta, dtype=torch.float64)
        lm = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), 0)
        out = beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)
    return out * temperature**2


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
