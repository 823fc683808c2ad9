"""Training configuration: frozen dataclasses, YAML recipes (configs/), ``key=value`` overrides.

A recipe is YAML with the sections below; every key is checked (unknown keys, wrong types and
impossible values are errors naming the key) before any work starts. Overrides use dotted
keys: ``ssld train --config configs/demo_tiny.yaml optim.lr=0.05 run.out=runs/x``.

Teacher-output cache (beyond the paper; ``data.crop_replay``, ``data.teacher_cache``,
``data.cache_topm``, ``data.cache_dtype``): with ``crop_replay = R >= 1`` every image has R
augmented views and epoch e crops/flips it exactly as epoch ``e % R`` did; with a cache folder
the teacher's top-m probabilities (at the loss temperature) of each (image, view) are stored
on disk, so from epoch R on the teacher forward is skipped and the loss takes the sparse
teacher (``ssld_kernels.SparseTeacher``, the remainder spread uniformly). With the cache on,
every step distils from the stored form (also in the step that computes it), so a run's
numbers do not depend on what the cache already holds; ``cache_topm`` = number of classes with
``cache_dtype: float32`` reproduces the uncached loss (see ``ssld.train.teacher_cache``).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, reported in one line naming the key."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "ssld.models:tiny_resnet"  # timm name, module:callable, .pt2/TorchScript file
    weights: str | None = None  # local file (torch.load(weights_only=True))
    num_classes: int | None = None  # passed to the builder when set
    kwargs: dict = field(default_factory=dict)  # more builder arguments


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    bn_train: bool = False  # BatchNorm in train mode (PaddleClas's setting); else eval mode


@dataclass(frozen=True)
class DataConfig:
    train: str | None = None  # T: folder with one subfolder per class
    unlabeled: str | None = None  # U: `ssld select` CSV, text list or folder (labels unused)
    unlabeled_root: str | None = None  # folder the U paths are relative to (default: its dir)
    val: str | None = None  # folder with class subfolders (same class order as T)
    input_size: int = 224
    min_scale: float = 0.08  # RandomResizedCrop scale range (min_scale, 1)
    hflip: bool = True
    autoaugment: bool = False  # kornia AutoAugment on the GPU (large students)
    eval_crop_pct: float = 0.875  # eval: resize to input_size / crop_pct, centre crop
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    workers: int = 8
    loader: str = "torch"  # torch (DataLoader, OpenCV decode) | dali (NVIDIA DALI, optional)
    dali_decode: str = "auto"  # dali: gpu (nvJPEG, hardware engines) | cpu | auto (gpu on CUDA)
    synthetic: bool = False  # random uint8 batches already on the device: throughput only
    synthetic_size: int = 1281167
    # crop replay and the teacher-output cache (module docstring; ssld.train.teacher_cache)
    crop_replay: int = 0  # R >= 1: epoch e uses the crops/flips of epoch e % R (0: all differ)
    teacher_cache: str | None = None  # folder of the cache (None: off); needs crop_replay >= 1
    cache_topm: int = 10  # m: teacher probabilities kept per (image, view); m <= classes
    cache_dtype: str = "float16"  # float16 | float32 (float32 + m = classes: exact loss)


@dataclass(frozen=True)
class LossConfig:
    kind: str = "jsd"  # jsd | sym_kl | kl (ssld_kernels.softmax_divergence)
    beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 0.0  # hard-label cross entropy on T images (0: the paper, no labels)
    kd_weight: float = 1.0  # weight of the divergence term (0: supervised only, no teacher)
    fused: bool = True  # loss and gradient from one kernel (softmax_divergence_and_grad)


@dataclass(frozen=True)
class OptimConfig:
    lr: float | None = None  # None: base_lr * batch_size / 256
    base_lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 4e-5  # the paper: 4e-5 large students, 1e-5 small
    no_decay_bn_bias: bool = True
    epochs: int = 360
    steps: int | None = None  # a step budget instead of epochs (schedule and stop)
    warmup_epochs: float = 5.0
    min_lr: float = 0.0


@dataclass(frozen=True)
class RunConfig:
    out: str = "runs/ssld"
    batch_size: int = 256  # global, over all processes and accumulation steps
    grad_accum: int = 1
    amp: str = "bf16"  # bf16 | fp16 (with GradScaler) | none
    channels_last: bool = True
    compile: bool = False  # torch.compile student and teacher
    ema: float = 0.0  # EMA decay of the student weights (0: off)
    sync_bn: bool = False
    seed: int = 0
    device: str = "auto"
    log_every: int = 50  # steps between reading the device-side meters
    ckpt_every: int = 1000  # steps between checkpoints (also at every epoch end)
    eval_every: int = 1  # epochs between evaluations (0: only at the end)
    max_steps: int | None = None  # stop early (tests, benchmarks)
    progress: bool = True
    deterministic: bool = False


@dataclass(frozen=True)
class FinetuneConfig:
    """`ssld finetune`: continue the distilled student on T only (the paper: 30 epochs)."""

    epochs: int = 30
    base_lr: float = 0.01  # x batch_size / 256; not given by the paper: 10x below training
    warmup_epochs: float = 0.0
    out: str | None = None  # default: run.out + "-finetune"


@dataclass(frozen=True)
class TrainConfig:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


_CHOICES = {
    ("loss", "kind"): ("jsd", "sym_kl", "kl"),
    ("run", "amp"): ("bf16", "fp16", "none"),
    ("data", "cache_dtype"): ("float16", "float32"),
    ("data", "loader"): ("torch", "dali"),
    ("data", "dali_decode"): ("auto", "gpu", "cpu"),
}


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def _coerce(value, tp, key: str):
    """``value`` checked (and mildly converted: int -> float, list -> tuple) against ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names & set(data):
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key)
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    return cls(**kwargs)


STAGES = ("train", "finetune", "eval")


def is_model_name(spec: str) -> bool:
    """True when a model spec names a timm model: not ``module:callable``, not a file."""
    return ":" not in spec and not Path(spec).is_file()


def validate(cfg: TrainConfig, stage: str = "train") -> TrainConfig:
    """Value checks that need more than a type; raises ConfigError naming the key.

    ``stage`` says what the configuration is for: ``train`` (T and/or U; the teacher when
    ``loss.kd_weight > 0``), ``finetune`` (T; the teacher when ``loss.kd_weight > 0``, so
    ``loss.kd_weight=0 loss.ce_weight=1`` finetunes on the labels alone, without a teacher) or
    ``eval`` (the student and ``data.val`` only: training data, teacher, teacher cache and
    loader are not looked at).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    for (section, name), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{section}.{name} must be one of {choices}, got {value!r}")
    at_least = {
        1: (
            "data.input_size",
            "run.batch_size",
            "run.grad_accum",
            "run.log_every",
            "run.ckpt_every",
            "optim.epochs",
            "data.synthetic_size",
            "finetune.epochs",
        ),
        0: (
            "data.workers",
            "optim.base_lr",
            "optim.weight_decay",
            "optim.warmup_epochs",
            "optim.min_lr",
            "loss.ce_weight",
            "loss.kd_weight",
            "run.eval_every",
            "data.crop_replay",
        ),
    }
    for minimum, keys in at_least.items():
        for key in keys:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            if value < minimum:
                raise ConfigError(f"{key} must be >= {minimum}, got {value}")
    if cfg.optim.lr is not None and cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if not 0.0 <= cfg.optim.momentum < 1.0:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {cfg.optim.momentum}")
    if not 0.0 <= cfg.loss.beta <= 1.0:
        raise ConfigError(f"loss.beta must be in [0, 1], got {cfg.loss.beta}")
    if cfg.loss.temperature <= 0:
        raise ConfigError(f"loss.temperature must be > 0, got {cfg.loss.temperature}")
    if not 0.0 <= cfg.run.ema < 1.0:
        raise ConfigError(f"run.ema must be in [0, 1), got {cfg.run.ema}")
    if not 0.0 < cfg.data.min_scale <= 1.0:
        raise ConfigError(f"data.min_scale must be in (0, 1], got {cfg.data.min_scale}")
    if not 0.0 < cfg.data.eval_crop_pct <= 1.0:
        raise ConfigError(f"data.eval_crop_pct must be in (0, 1], got {cfg.data.eval_crop_pct}")
    for key in ("mean", "std"):
        v = getattr(cfg.data, key)
        if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
            raise ConfigError(f"data.{key} must be 3 numbers, got {v!r}")
    if any(x <= 0 for x in cfg.data.std):
        raise ConfigError(f"data.std must be > 0, got {cfg.data.std}")
    if cfg.loss.kd_weight == 0 and cfg.loss.ce_weight == 0:
        raise ConfigError("loss.kd_weight and loss.ce_weight are both 0: nothing to train")
    if cfg.optim.steps is not None and cfg.optim.steps < 1:
        raise ConfigError(f"optim.steps must be >= 1, got {cfg.optim.steps}")
    if cfg.run.max_steps is not None and cfg.run.max_steps < 1:
        raise ConfigError(f"run.max_steps must be >= 1, got {cfg.run.max_steps}")
    if stage == "eval":
        _validate_folders(cfg, ("val",), ("val",))
        return cfg
    if not cfg.data.synthetic:
        if stage == "finetune" and cfg.data.train is None:
            raise ConfigError("finetuning needs data.train (the labeled set T)")
        if cfg.data.train is None and cfg.data.unlabeled is None:
            raise ConfigError("data.train or data.unlabeled must be set (or data.synthetic)")
        _validate_folders(cfg, ("train", "val", "unlabeled", "unlabeled_root"), ("train", "val"))
    _validate_cache(cfg)
    if cfg.data.loader == "dali" and not cfg.data.synthetic:
        try:
            require_dali()
        except ImportError as e:
            raise ConfigError(str(e)) from None
    for key in ("student", "teacher"):
        w = getattr(cfg, key).weights
        if w is not None and not Path(w).is_file():
            raise ConfigError(f"{key}.weights: file not found: {w}")
    t = cfg.teacher
    if cfg.loss.kd_weight > 0 and t.weights is None and is_model_name(t.name):
        raise ConfigError(
            f"teacher.weights: required for the timm teacher {t.name!r} (a local file; nothing "
            "is downloaded), unless loss.kd_weight=0 (no teacher)"
        )
    return cfg


def _validate_folders(cfg: TrainConfig, paths, class_folders) -> None:
    """data.<key> exists for every key of ``paths`` that is set; those of ``class_folders``
    are folders."""
    for key in paths:
        path = getattr(cfg.data, key)
        if path is not None and not Path(path).exists():
            raise ConfigError(f"data.{key}: path not found: {path}")
    for key in class_folders:
        path = getattr(cfg.data, key)
        if path is not None and not Path(path).is_dir():
            raise ConfigError(f"data.{key} must be a folder with class subfolders: {path}")


def _validate_cache(cfg: TrainConfig) -> None:
    d = cfg.data
    if d.cache_topm < 1:
        raise ConfigError(f"data.cache_topm must be >= 1, got {d.cache_topm}")
    if d.teacher_cache is None:
        return
    if not d.teacher_cache:
        raise ConfigError("data.teacher_cache must be a folder or null")
    if d.crop_replay < 1:
        raise ConfigError(
            "data.teacher_cache needs data.crop_replay >= 1 (the number of augmented views per "
            "image whose teacher outputs are cached)"
        )
    if d.autoaugment:
        raise ConfigError(
            "data.teacher_cache cannot be combined with data.autoaugment (its randomness is "
            "not replayed, so cached teacher outputs would not match the student's input)"
        )
    if d.synthetic:
        raise ConfigError("data.teacher_cache needs real data (data.synthetic is true)")
    if cfg.loss.kd_weight == 0:
        raise ConfigError("data.teacher_cache is set but loss.kd_weight is 0 (no teacher)")
    if Path(d.teacher_cache).exists() and not Path(d.teacher_cache).is_dir():
        raise ConfigError(f"data.teacher_cache must be a folder: {d.teacher_cache}")


def require_dali():
    """Import NVIDIA DALI (``data.loader: dali``), or raise ImportError saying how to install
    it. Here, not in :mod:`ssld.data.dali`, so that validating a configuration imports no
    pipeline package."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "data.loader=dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 "
            f"(or nvidia-dali-cuda130 for CUDA 13) ({e})"
        ) from None
    return nvidia.dali


def finetune_config(cfg: TrainConfig) -> TrainConfig:
    """The configuration of the finetuning stage derived from a training recipe (a teacher
    cache moves to ``data.teacher_cache + "-finetune"``: T alone is another dataset)."""
    f = cfg.finetune
    if cfg.data.train is None and not cfg.data.synthetic:
        raise ConfigError("finetuning needs data.train (the labeled set T)")
    return replace(
        cfg,
        **{
            "data.unlabeled": None,
            "optim.epochs": f.epochs,
            "optim.steps": None,
            "optim.base_lr": f.base_lr,
            "optim.lr": None,
            "optim.warmup_epochs": f.warmup_epochs,
            "run.out": f.out or cfg.run.out.rstrip("/") + "-finetune",
            "data.teacher_cache": (
                cfg.data.teacher_cache.rstrip("/") + "-finetune" if cfg.data.teacher_cache else None
            ),
        },
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML: numbers, true/false, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key")
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        for conv in (int, float):
            try:
                return parts, conv(value)
            except ValueError:
                pass
    return parts, value


def load_config(
    path: str | None = None, overrides=(), validate_paths: bool = True, stage: str = "train"
) -> TrainConfig:
    """TrainConfig from a YAML recipe (or the defaults) plus ``key=value`` overrides, checked
    for ``stage`` (see :func:`validate`; ``validate_paths=False``: types only)."""
    data: dict = {}
    if path is not None:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections")
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {p} is not a section")
        node[parts[-1]] = value
    cfg = _build(TrainConfig, data, "")
    return validate(cfg, stage) if validate_paths else cfg


def replace(cfg, **changes):
    """dataclasses.replace with dotted section keys: replace(cfg, **{"optim.lr": 0.01})."""
    by_section: dict[str, dict] = {}
    top = {}
    for key, value in changes.items():
        if "." in key:
            section, name = key.split(".", 1)
            by_section.setdefault(section, {})[name] = value
        else:
            top[key] = value
    for section, sub in by_section.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **sub)
    return dataclasses.replace(cfg, **top)
