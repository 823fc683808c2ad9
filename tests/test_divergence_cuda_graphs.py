"""CUDA-graph capture of the divergence loss (GPU only).

Capture fails on any host synchronisation, allocation outside the graph pool or non-capturable
call, so capturing the fused call and forward + autograd backward is the test that the hot path
of the cuda and triton backends has none. After capture, new data is copied into the static
inputs, the graph replayed and the outputs compared with eager results computed outside it.
"""

import pytest
import torch

import ssld_kernels as sk
from ssld_kernels._backends import backend_status

pytestmark = pytest.mark.cuda

N, C = 256, 1000
KINDS = [("jsd", 0.5), ("sym_kl", 0.5)]


def _require(backend):
    ok, why = backend_status("cuda")[backend]
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")


def _logits(dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(N, C, device="cuda", generator=gen) * 3).to(dtype)


def _warm_up(fn, iters=3):
    """Run ``fn`` on a side stream (compiles / autotunes Triton kernels, sets up the autograd
    streams) before capture, as torch.cuda.graphs recommends."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(iters):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def _replays_do_not_allocate(graph, outputs):
    """10 replays: no growth of the allocator's memory and the same results each time."""
    torch.cuda.synchronize()
    first = [o.clone() for o in outputs]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    for a, b in zip(outputs, first):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fused_call_captured(backend, dtype, kind, beta):
    _require(backend)
    s_static, t_static = _logits(dtype, 0), _logits(dtype, 1)
    loss_out = torch.empty((), dtype=torch.float32, device="cuda")
    grad_out = torch.empty_like(s_static)

    def step():
        loss, grad = sk.softmax_divergence_and_grad(
            s_static, t_static, kind=kind, beta=beta, backend=backend
        )
        loss_out.copy_(loss)
        grad_out.copy_(grad)

    _warm_up(step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    s_new, t_new = _logits(dtype, 2), _logits(dtype, 3)
    s_static.copy_(s_new)
    t_static.copy_(t_new)
    graph.replay()
    torch.cuda.synchronize()

    loss_ref, grad_ref = sk.softmax_divergence_and_grad(
        s_new, t_new, kind=kind, beta=beta, backend=backend
    )
    torch.testing.assert_close(loss_out, loss_ref)
    torch.testing.assert_close(grad_out, grad_ref)
    # the graph really computed on the new data, not a stale copy of the capture's
    loss_old, _ = sk.softmax_divergence_and_grad(
        _logits(dtype, 0), _logits(dtype, 1), kind=kind, beta=beta, backend=backend
    )
    assert not torch.equal(loss_out, loss_old)
    _replays_do_not_allocate(graph, [loss_out, grad_out])


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_autograd_forward_backward_captured(backend, dtype, kind, beta):
    _require(backend)
    s_static = _logits(dtype, 0).requires_grad_(True)
    t_static = _logits(dtype, 1)

    def step():
        loss = sk.softmax_divergence(s_static, t_static, kind=kind, beta=beta, backend=backend)
        loss.backward()
        return loss

    _warm_up(lambda: (setattr(s_static, "grad", None), step()))
    s_static.grad = None  # backward allocates .grad from the graph's pool during capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_static = step()
    grad_static = s_static.grad
    assert grad_static is not None

    s_new, t_new = _logits(dtype, 2), _logits(dtype, 3)
    with torch.no_grad():
        s_static.copy_(s_new)
        t_static.copy_(t_new)
    graph.replay()
    torch.cuda.synchronize()

    s_ref = s_new.clone().requires_grad_(True)
    loss_ref = sk.softmax_divergence(s_ref, t_new, kind=kind, beta=beta, backend=backend)
    loss_ref.backward()
    torch.testing.assert_close(loss_static, loss_ref.detach())
    torch.testing.assert_close(grad_static, s_ref.grad)
    assert s_static.grad is grad_static  # replays overwrite the captured gradient in place
    # the eager autograd result also agrees with the fused call on the same data
    loss_fused, grad_fused = sk.softmax_divergence_and_grad(
        s_new, t_new, kind=kind, beta=beta, backend=backend
    )
    torch.testing.assert_close(loss_static, loss_fused)
    torch.testing.assert_close(grad_static, grad_fused)
    _replays_do_not_allocate(graph, [loss_static, grad_static])
