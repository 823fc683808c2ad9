"""The Python ABI constants (ssld_kernels/_abi.py) equal the compiled ones (csrc/common.h)."""

import pytest
import torch

from ssld_kernels import _abi
from ssld_kernels._backends import _load_ext


@pytest.fixture(scope="module")
def ext():
    mod, reason = _load_ext()
    if mod is None:
        pytest.skip(reason)
    if not hasattr(mod, "STATS_WIDTH"):
        pytest.fail(
            "ssld_kernels._C predates its ABI exports (STATS_WIDTH, DTYPE_CODES): rebuild it"
        )
    return mod


def test_stats_width_matches_extension(ext):
    assert _abi.STATS_WIDTH == ext.STATS_WIDTH


def test_dtype_codes_match_extension(ext):
    python_side = {
        str(dtype).removeprefix("torch."): code for dtype, code in _abi.DTYPE_CODES.items()
    }
    assert python_side == dict(ext.DTYPE_CODES)


def test_dtype_codes_cover_kernel_dtypes():
    expected = {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8}
    assert set(_abi.DTYPE_CODES) == expected
    assert len(set(_abi.DTYPE_CODES.values())) == len(expected)


def test_modules_import_the_constants():
    from ssld_kernels import match

    assert match.DTYPE_CODES is _abi.DTYPE_CODES
    pytest.importorskip("triton")
    from ssld_kernels.triton import divergence, sparse

    assert divergence.STATS_WIDTH == _abi.STATS_WIDTH
    assert sparse.SPARSE_STATS_WIDTH == _abi.SPARSE_STATS_WIDTH
