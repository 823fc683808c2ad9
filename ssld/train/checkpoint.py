"""Atomic checkpoints: everything needed to continue a run at the exact step.

A checkpoint is one ``torch.save`` file written to a temporary name and renamed, so a kill
at any moment leaves either the previous or the new checkpoint, never a torn one. It holds
only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(path: str | os.PathLike, state: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def student_state(path: str | os.PathLike) -> dict:
    """The student weights of a training checkpoint (EMA weights when the run kept them), or
    of a plain state-dict file."""
    obj = load(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj.get("ema") or obj["model"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path} is neither an ssld checkpoint nor a state dict")
