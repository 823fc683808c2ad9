"""Where this process runs: torchrun's environment and the device a setting names.

One reading of ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` and one resolution of a device
setting (``--device`` of the CLI, ``run.device`` of a recipe), shared by the CLI and the
Trainer. Errors are :class:`DeviceError` without the name of the setting: each caller puts
its own (``argument --device: ...``, ``run.device: ...``) in front.
"""

from __future__ import annotations

import os
from typing import NamedTuple


class DeviceError(ValueError):
    """A device setting that names no usable device."""


class ProcessEnv(NamedTuple):
    """This process in a torchrun job (1, 0, 0 when started alone)."""

    world: int
    rank: int
    local_rank: int


def process_env() -> ProcessEnv:
    env = os.environ
    return ProcessEnv(
        int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    )


def resolve_device(text: str, local_rank: int = 0):
    """``auto`` -> ``cuda:LOCAL_RANK`` when a GPU is visible, else ``cpu``; ``cuda`` ->
    ``cuda:LOCAL_RANK``; ``cpu`` and ``cuda:i`` are checked (the GPU must exist)."""
    import torch

    if text == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DeviceError(f"not a device: {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{text} requested but no CUDA device is visible")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"{device} does not exist")
    elif device.type != "cpu":
        raise DeviceError(f"expected auto, cpu or cuda[:i], got {text!r}")
    return device
