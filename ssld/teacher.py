"""Loading a frozen model from a SPEC string, with local weights only.

SPEC is one of
  * ``module:callable``: ``importlib.import_module(module).callable()`` returns an nn.Module
    (e.g. ``ssld.models:tiny_resnet``);
  * a ``torch.export`` program (``.pt2``, ``torch.export.save``), or a TorchScript file
    (``torch.jit.save``, deprecated by PyTorch but still read);
  * a timm model name (``resnet50d``, ``resnext101_32x16d``...): timm is imported only here,
    the model is built without pretrained weights and ``weights`` is required.

``weights`` (a local file) is loaded with ``torch.load(weights_only=True)``: a state dict,
or a checkpoint holding one under ``state_dict``, ``model``, ``model_ema`` or ``module``;
``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are stripped.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from torch import nn

STATE_KEYS = ("state_dict", "model", "model_ema", "module")


class TeacherError(ValueError):
    """A SPEC or weights file that cannot give a model (one-line message)."""


def load_state_dict(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types
        raise TeacherError(f"cannot read weights {path}: {type(e).__name__}: {e}") from None
    for key in STATE_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherError(f"{path} holds no state dict of tensors")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def _apply_weights(model: nn.Module, weights, spec: str) -> None:
    if weights is None:
        return
    state = load_state_dict(weights)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise TeacherError(
            f"weights {weights} do not fit {spec}: missing {list(result.missing_keys)[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )


def load_model(
    spec: str, weights: str | os.PathLike | None = None, *, require_weights: bool = True, **kwargs
) -> nn.Module:
    """The model of ``spec`` (see the module docstring), in eval mode, on the CPU.

    ``require_weights=False`` lets a timm model start from random weights (a student).
    """
    if not isinstance(spec, str) or not spec:
        raise TeacherError(f"teacher spec must be a non-empty string, got {spec!r}")
    if ":" in spec and not os.path.exists(spec):
        mod_name, _, attr = spec.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise TeacherError(f"cannot import {mod_name!r} for {spec!r}: {e}") from None
        fn = getattr(mod, attr, None)
        if not callable(fn):
            raise TeacherError(f"{spec!r}: {mod_name} has no callable {attr!r}")
        model = fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise TeacherError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
        _apply_weights(model, weights, spec)
        return model.eval()
    if os.path.isfile(spec) and spec.endswith(".pt2"):
        try:
            model = torch.export.load(spec).module()
        except Exception as e:  # noqa: BLE001
            raise TeacherError(f"cannot load the exported program {spec}: {e}") from None
        _apply_weights(model, weights, spec)
        return model
    if os.path.isfile(spec):
        try:
            model = torch.jit.load(spec, map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise TeacherError(f"{spec} is not a TorchScript file: {type(e).__name__}") from None
        _apply_weights(model, weights, spec)
        return model.eval()
    try:
        import timm
    except ImportError:
        raise TeacherError(
            f"{spec!r} is not a file or module:callable, and timm (needed for model names) is "
            "not importable: pip install timm"
        ) from None
    if weights is None and require_weights:
        raise TeacherError(
            f"timm model {spec!r} needs local weights (--teacher-weights / teacher.weights); "
            "nothing is downloaded"
        )
    try:
        model = timm.create_model(spec, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm raises RuntimeError for unknown names
        raise TeacherError(f"timm cannot build {spec!r}: {e}") from None
    _apply_weights(model, weights, spec)
    return model.eval()
