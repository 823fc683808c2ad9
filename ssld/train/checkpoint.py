"""Atomic checkpoints: everything needed to continue a run at the exact step.

A checkpoint is one ``torch.save`` file written to a temporary name and renamed, so a kill
at any moment leaves either the previous or the new checkpoint, never a torn one. It holds
only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import zipfile
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


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or used (one-line message naming the file)."""


def load(path: str | os.PathLike) -> dict:
    """The checkpoint's content (on the CPU); FileNotFoundError when missing, CheckpointError
    when the file is not a readable ``torch.save`` file of plain values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for damaged files
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives
            why = "not a torch.save file, or a damaged (truncated?) one"
        else:
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        raise CheckpointError(f"cannot read checkpoint {path}: {why}") from e


def student_state(path: str | os.PathLike) -> dict:
    """The student weights of a training checkpoint (EMA weights when the run kept them), or
    of a plain state-dict file."""
    obj = load(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj.get("ema") or obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path} is neither an ssld checkpoint nor a state dict")


def load_student_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load :func:`student_state` of ``path`` into ``model`` (strict; ``module.`` and
    ``_orig_mod.`` prefixes of DDP / torch.compile are stripped); CheckpointError, in one
    line, when the weights do not fit."""
    state = {}
    for k, v in student_state(path).items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        state[k] = v
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = [
            f"{what} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape of", shapes),
            )
            if keys
        ]
        raise CheckpointError(f"{path} does not fit the student: {', '.join(parts)}")
    model.load_state_dict(state)
