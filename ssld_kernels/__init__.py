"""ssld_kernels: fused kernels for knowledge distillation.

Softmax + divergence losses (JSD, symmetric KL, KL) forward and backward in one pass from
logits, on CUDA, Triton, C++ CPU and plain PyTorch backends; exact batched descriptor
matching (k-NN, Lowe's ratio test over many image pairs) on C++ CPU and PyTorch backends. ``python -m ssld_kernels``
lists the backends available here and why any is missing.
"""

__version__ = "0.1.0"

from ssld_kernels._backends import available_backends
from ssld_kernels.divergence import (
    JSDLoss,
    KLDivLoss,
    SparseTeacher,
    SymmetricKLLoss,
    softmax_divergence,
    softmax_divergence_and_grad,
)
from ssld_kernels.fused_linear import (
    FusedLinearDivergence,
    FusedLinearJSD,
    fused_linear_divergence,
)
from ssld_kernels.match import match_knn, match_pairs

__all__ = [
    "__version__",
    "available_backends",
    "softmax_divergence",
    "softmax_divergence_and_grad",
    "SparseTeacher",
    "JSDLoss",
    "SymmetricKLLoss",
    "KLDivLoss",
    "fused_linear_divergence",
    "FusedLinearDivergence",
    "FusedLinearJSD",
    "match_knn",
    "match_pairs",
]
