"""Every launch configuration of the Triton divergence kernels gives the same results.

The kernels have three shapes of work: the whole row in registers (C <= BLOCK), chunked rows
(pass 2 walking the chunks last to first), and programs looping over several rows (grid
smaller than the row count). The tune table may pick any of them on a GPU, so each is checked
here (in the interpreter) against the float64 reference, for the forward, the fused forward +
gradient and the backward, with weights, masks and both gradients.
"""

import pytest
import torch

from ssld_kernels import reference
from ssld_kernels._backends import backend_status
from ssld_kernels.reference import make_spec

ok, why = backend_status("cpu")["triton"]
pytestmark = pytest.mark.skipif(not ok, reason=str(why))

CONFIGS = [
    None,  # defaults: one program per row, the row in one chunk
    {"block": 16},  # 7 chunks of 16 for C = 100 (last one partial)
    {"block": 32, "programs": 3},  # chunked and 3 programs over 7 rows
    {"num_warps": 2, "programs": 1},  # one program does every row
    {"block": 128, "num_warps": 1, "programs": 2},  # single chunk, looping programs
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,beta", [("jsd", 0.5), ("jsd", 0.2), ("sym_kl", 0.5)])
def test_configs_match_reference(config, dtype, kind, beta):
    from ssld_kernels.triton import divergence as tr

    torch.manual_seed(0)
    n, c = 7, 100
    s = (torch.randn(n, c) * 3).to(dtype)
    t = (torch.randn(n, c) * 3).to(dtype)
    w = torch.rand(n) + 0.5
    m = torch.tensor([True, True, False, True, True, False, True])
    spec = make_spec(kind, beta, 1.5)
    grad_rows = torch.rand(n) + 0.5
    loss, stats, gs, gt = tr._divergence_forward(
        s, t, w, m, spec, grad_rows, True, True, config=config
    )
    s64, t64 = s.double(), t.double()
    ref_loss, ref_gs, ref_gt = reference.divergence_rows_and_grad(
        spec, s64, t64, grad_rows.double(), w.double(), m, True
    )
    rtol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    for got, ref in ((gs, ref_gs), (gt, ref_gt)):
        assert got.dtype == dtype
        scale = ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * scale)
    assert torch.all(gs[~m] == 0) and torch.all(gt[~m] == 0)
    # the loss-only forward and the backward from its statistics give the same
    loss2, stats2, _, _ = tr._divergence_forward(s, t, w, m, spec, config=config)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    torch.testing.assert_close(stats2[m], stats[m], rtol=0, atol=0)
    bs, bt = tr._divergence_backward(s, t, w, m, stats2, grad_rows, spec, True, True, config)
    torch.testing.assert_close(bs, gs, rtol=0, atol=0)
    torch.testing.assert_close(bt, gt, rtol=0, atol=0)


def test_bad_config():
    from ssld_kernels.triton import divergence as tr

    s = torch.randn(2, 100)
    with pytest.raises(ValueError, match="BLOCK must be a power of two"):
        tr._divergence_forward(s, s, None, None, make_spec(), config={"block": 24})
    with pytest.raises(ValueError, match="num_warps"):
        tr._divergence_forward(s, s, None, None, make_spec(), config={"num_warps": 3})
    # a chunk larger than the row is cut to the row's power of two
    assert tr._launch_config(4, 100, {"block": 8192, "programs": 9}) == (128, 1, 4)
