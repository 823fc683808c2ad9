"""Every launch config the tune table may pick, on the GPU, against the float64 reference.

``ssld_kernels.tune`` times the configs of ``LAUNCH_CONFIGS`` (CUDA: the shared-memory row
cache, block size and grid cap; Triton: chunk size, warps, looping programs) and also checks
each against the default launch before timing it; these tests pin them to the float64
reference for the forward, the fused forward + gradient and the backward (GPU only).
"""

import pytest
import torch

import ssld_kernels as sk
from ssld_kernels import _tune_table, reference
from ssld_kernels._backends import backend_status
from ssld_kernels.reference import make_spec
from ssld_kernels.tune import LAUNCH_CONFIGS

pytestmark = pytest.mark.cuda

CASES = [(c, b) for b in ("cuda", "triton") for c in (None, *LAUNCH_CONFIGS[b])]


def _require(backend):
    ok, why = backend_status("cuda")[backend]
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")


@pytest.mark.parametrize("config,backend", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# 5000: cached; 20000: cached (fp32 160 KB); 70000: beyond the cache (fp32 560 KB, bf16 280 KB)
@pytest.mark.parametrize("c", [1500, 5000, 20000, 70000])
def test_launch_config_matches_reference(config, backend, dtype, c):
    _require(backend)
    torch.manual_seed(0)
    n = 37
    s = (torch.randn(n, c, device="cuda") * 3).to(dtype)
    t = (torch.randn(n, c, device="cuda") * 3).to(dtype)
    w = torch.rand(n, device="cuda") + 0.5
    m = torch.rand(n, device="cuda") > 0.2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = _tune_table.resolve_per_sm(config, sms) or {}
    spec = make_spec("jsd", 0.5, 1.5)
    kw = dict(kind="jsd", temperature=1.5, weight=w, mask=m, reduction="sum", backend=backend)
    with _tune_table.forced_launch_config(backend, cfg):
        loss, gs, gt = sk.softmax_divergence_and_grad(s, t, teacher_grad=True, **kw)
        sg = s.clone().requires_grad_(True)
        loss2 = sk.softmax_divergence(sg, t, **kw)
        loss2.backward()
    rows, rgs, rgt = reference.divergence_rows_and_grad(
        spec, s.double(), t.double(), torch.ones(n, dtype=torch.float64, device="cuda"),
        w.double(), m, True,
    )  # fmt: skip
    torch.testing.assert_close(loss.double(), rows.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss2.double(), rows.sum(), rtol=1e-5, atol=1e-6)
    rtol = 1e-5 if dtype == torch.float32 else 1.6e-2
    for got, ref in ((gs, rgs), (gt, rgt), (sg.grad, rgs)):
        assert got.dtype == dtype
        scale = ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * scale)
    assert torch.all(gs[~m] == 0) and torch.all(sg.grad[~m] == 0)


def test_row_cache_is_bitwise_the_uncached_kernel():
    """The cache only changes where passes 2 and 3 read: same values, same order of sums
    within a thread, same block reductions, so the same bits."""
    _require("cuda")
    for dtype, c in ((torch.float32, 20000), (torch.bfloat16, 50000)):
        s = (torch.randn(64, c, device="cuda") * 3).to(dtype)
        t = (torch.randn(64, c, device="cuda") * 3).to(dtype)
        with _tune_table.forced_launch_config("cuda", {}):
            want = sk.softmax_divergence_and_grad(s, t, reduction="none", backend="cuda")
        with _tune_table.forced_launch_config("cuda", {"row_cache": 1}):
            got = sk.softmax_divergence_and_grad(s, t, reduction="none", backend="cuda")
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
