"""Triton kernels of ssld_kernels (fused softmax divergence: ``ssld_kernels.triton.divergence``)."""
