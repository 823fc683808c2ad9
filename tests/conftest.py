import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. This must be set
# before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

# bench/triton_aot.py: record the specialisation of every interpreted Triton launch, to compile
# them for a GPU target afterwards (no effect unless that script sets the variable).
if os.environ.get("SSLD_TRITON_RECORD"):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from triton_aot import install_recorder

    install_recorder(
        os.environ["SSLD_TRITON_RECORD"], int(os.environ.get("SSLD_TRITON_RECORD_ARCH", "90"))
    )
    import ssld_kernels.triton.match

    ssld_kernels.triton.match.INTERPRETER_TILES = False  # record the matcher's GPU tiles


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
