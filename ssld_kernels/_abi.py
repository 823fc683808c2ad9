"""Constants shared by the Python launchers and the compiled kernels: their one Python definition.

The C++ side is ``csrc/common.h`` (``ssld::DType``, ``ssld::kStatsWidth``), exported by
``csrc/bindings.cpp`` as ``_C.DTYPE_CODES`` and ``_C.STATS_WIDTH``; ``tests/test_abi.py``
checks that the two agree. Import from here; do not restate the numbers.
"""

import torch

__all__ = ["DTYPE_CODES", "SPARSE_STATS_WIDTH", "STATS_WIDTH", "acc_dtype"]

# dtype -> the integer code DivParams.s_dtype / t_dtype and KnnParams.dtype take.
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.uint8: 4,
}

# Floats saved per row by a dense forward for its backward:
# (max_s, log_sum_s, max_t, log_sum_t, A, B).
STATS_WIDTH = 6

# Floats saved per row by a sparse-teacher forward (Triton and torch only, no C++ kernel):
# (max_s, log_sum_s, A, B).
SPARSE_STATS_WIDTH = 4


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of per-row results (row loss, stats, weights) for logits of
    ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
