"""Top-1 / top-5 on a validation folder, and ``ssld eval``: a student checkpoint evaluated
alone.

Evaluation needs the student and the validation images only: no teacher, no training data,
no augmentation library (eval is resize + centre crop, :class:`ssld.data.EvalTransform`), and
timm only when the student is a timm model name. Nothing is written but what the caller asks
for. The Trainer's per-epoch evaluation is the same :func:`evaluate`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ssld import config as C
from ssld.data import EvalTransform, ImageList, Normalize, worker_options
from ssld.train import checkpoint as ckpt


class ValSet(NamedTuple):
    """A folder with one subfolder per class: image paths relative to ``root``, labels."""

    root: Path
    paths: list[str]
    labels: torch.Tensor  # int64 (n,)
    classes: list[str]


def val_set(folder: str | os.PathLike) -> ValSet:
    from ssld.data.train import class_folder

    classes, items = class_folder(folder)
    labels = torch.tensor([y for _, y in items], dtype=torch.int64)
    return ValSet(Path(folder), [p for p, _ in items], labels, classes)


def build_model(mc: C.ModelConfig, role: str) -> nn.Module:
    """The model of a ``student`` / ``teacher`` section, on the CPU: a timm teacher needs
    local weights, a student may start from random ones. ConfigError naming the section when
    the spec cannot give a model (e.g. a timm name without timm installed)."""
    from ssld.teacher import TeacherError, load_model

    kwargs = dict(mc.kwargs)
    if mc.num_classes is not None:
        kwargs["num_classes"] = mc.num_classes
    try:
        return load_model(mc.name, mc.weights, require_weights=role == "teacher", **kwargs)
    except TeacherError as e:
        raise C.ConfigError(f"{role}: {e}") from None


def autocast_dtype(amp: str, device: torch.device):
    """The autocast dtype of ``run.amp`` on ``device`` (None: float32; amp is GPU only)."""
    if device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def autocast(device: torch.device, amp_dtype) -> torch.autocast:
    """The autocast context of :func:`autocast_dtype`'s result (disabled for None)."""
    return torch.autocast(
        device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    val: ValSet,
    data: C.DataConfig,
    device: torch.device,
    *,
    amp_dtype=None,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 128,
    workers: int | None = None,
) -> dict:
    """Top-1 / top-5 (%) of ``model`` on ``val`` (this rank's share, all-reduced over the
    process group when ``world > 1``), preprocessed as ``data`` says (input size, crop,
    mean/std); unreadable images are not counted."""
    idx = list(range(rank, len(val.paths), world))
    tf = EvalTransform(data.input_size, data.eval_crop_pct)
    ds = ImageList([val.paths[i] for i in idx], val.root, tf, idx)
    workers = min(data.workers, 8) if workers is None else workers
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, pin_memory=device.type == "cuda", **worker_options(workers)
    )
    normalize = Normalize(data.mean, data.std).to(device)
    was = model.training
    model.eval()
    counts = torch.zeros(3, device=device)
    labels = val.labels.to(device)
    amp = autocast(device, amp_dtype)
    for imgs, ids, ok in loader:
        with amp:
            logits = model(normalize(imgs))
        y = labels[ids.to(device)]
        top5 = logits.float().topk(min(5, logits.shape[1]), 1).indices
        okd = ok.to(device)
        counts[0] += ((top5[:, 0] == y) & okd).sum()
        counts[1] += ((top5 == y[:, None]).any(1) & okd).sum()
        counts[2] += okd.sum()
    model.train(was)
    if world > 1:
        torch.distributed.all_reduce(counts)
    c = counts.tolist()
    n = max(c[2], 1.0)
    return {"top1": 100 * c[0] / n, "top5": 100 * c[1] / n, "images": int(c[2])}


def run_val_folder(checkpoint: str | os.PathLike) -> str | None:
    """``data.val`` of the run that wrote ``checkpoint`` (its folder's config.json), if any."""
    path = Path(checkpoint).parent / "config.json"
    try:
        val = json.loads(path.read_text())["data"]["val"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return val if isinstance(val, str) else None


def evaluate_checkpoint(
    cfg: C.TrainConfig,
    checkpoint: str | os.PathLike,
    *,
    device: torch.device,
    batch_size: int = 128,
    workers: int | None = None,
) -> dict:
    """``ssld eval``: the student of ``cfg`` with the weights of ``checkpoint`` (an ssld
    training checkpoint, its EMA weights when kept, or a state dict) on ``cfg.data.val``."""
    if cfg.data.val is None:
        raise C.ConfigError("data.val: no validation folder")
    val = val_set(cfg.data.val)
    # the checkpoint's weights replace student.weights (the initial weights of training)
    model = build_model(dataclasses.replace(cfg.student, weights=None), "student")
    ckpt.load_student_weights(model, checkpoint)
    with torch.inference_mode():  # the head's width against the folder's classes
        s = cfg.data.input_size
        n_out = model(torch.zeros(1, 3, s, s)).shape[-1]
    if n_out != len(val.classes):
        raise C.ConfigError(
            f"data.val has {len(val.classes)} classes but the student has {n_out} outputs"
        )
    model = model.to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = autocast_dtype(cfg.run.amp, device)
    res = evaluate(
        model, val, cfg.data, device, amp_dtype=amp_dtype, batch_size=batch_size, workers=workers
    )
    return {**res, "checkpoint": str(checkpoint), "val": str(cfg.data.val)}
