"""The SSLD training loop: a student learns to match a frozen teacher's softmax.

One :class:`Trainer` with explicit build steps (distributed, data, models, optimizer,
schedule) and a small step:

  uint8 batch -> device (pinned, non-blocking) -> normalise (+ AutoAugment) on the device
  teacher forward (inference mode, bf16 autocast)      -> teacher logits
  student forward (autocast)                           -> student logits
  fused JSD: loss and d(loss)/d(student logits) from one kernel
  (ssld_kernels.softmax_divergence_and_grad) -> student_logits.backward(grad)
  SGD (fused/foreach), cosine schedule with linear warm-up, optional EMA

No host synchronisation inside the step: losses and teacher/student agreement are summed on
the device and read every ``run.log_every`` steps, phase times come from CUDA events read at
the same moments. Checkpoints every ``run.ckpt_every`` steps and at each epoch end,
atomically; ``resume=True`` continues from the exact step (same batches, same augmentation,
same RNG).

Teacher-output cache (``data.teacher_cache``, ``data.crop_replay = R``; see
:mod:`ssld.train.teacher_cache`): the DataLoader workers also return each item's index and its
cached teacher row (top-m probabilities at the loss temperature) for the view ``epoch % R``.
A micro-batch whose rows are all filled (decided on the host) skips the teacher forward; the
others run it and queue their new rows (copied to pinned host memory without a sync, written
once complete, at the latest at the next log interval or checkpoint). Either way the loss
takes the stored rows as a ``SparseTeacher``. At each epoch end the teacher also fills the
rows of the images ``drop_last`` left out, so from epoch R on no batch needs the teacher.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ssld_kernels as sk
from ssld import config as C
from ssld._resume import SettingsChanged, refuse_changed
from ssld._runtime import DeviceError, process_env, resolve_device
from ssld.data import Normalize, worker_options
from ssld.data.train import (
    Batch,
    ResumableSampler,
    TeacherRows,
    TrainSet,
    TrainTransform,
    class_folder,
    unlabeled_list,
)
from ssld.train import checkpoint as ckpt
from ssld.train import evaluate as ev
from ssld.train import teacher_cache as tcache
from ssld.train.metrics import PHASES, Meters, RunLog, StepTimer

# settings a run may be resumed with changed: they do not change which samples, crops and
# steps it takes (a changed loader changes pixels only by decoder/interpolation rounding)
RESUMABLE_CHANGES = {
    "run.max_steps",
    "run.progress",
    "run.log_every",
    "data.workers",
    "data.loader",
    "data.dali_decode",
}


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def param_groups(model: nn.Module, weight_decay: float, no_decay_bn_bias: bool):
    """SGD parameter groups: no weight decay on biases and normalisation weights (1-D
    parameters) when ``no_decay_bn_bias``."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_decay_bn_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up from 1/warmup to 1 over ``warmup`` steps, then cosine to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class Distributed(NamedTuple):
    """What :meth:`Trainer.build_distributed` sets up for this process."""

    world: int
    rank: int
    device: torch.device
    micro_batch: int  # images per forward: run.batch_size / (world * run.grad_accum)


class TrainData(NamedTuple):
    """What :meth:`Trainer.build_data` builds: inputs, their order, the step counts."""

    classes: list[str] | None  # data.train's class names (None: synthetic or unlabeled only)
    normalize: nn.Module
    autoaugment: nn.Module | None
    trainset: TrainSet | None  # None for synthetic data
    sampler: ResumableSampler
    loader: Any  # DataLoader or DaliLoader; None for synthetic data
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    val: ev.ValSet | None


class Models(NamedTuple):
    """What :meth:`Trainer.build_models` builds."""

    student: nn.Module  # wrapped (DDP, torch.compile) as trained
    student_raw: nn.Module  # unwrapped: the optimizer's parameters
    teacher: nn.Module | None  # None when loss.kd_weight is 0
    ema: nn.Module | None
    num_classes: int
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler


class Trainer:
    """Distillation (``mode="train"``, T ∪ U) or finetuning (``mode="finetune"``, T only).

    Args:
        cfg: the TrainConfig.
        init: optional checkpoint or state dict for the student's initial weights.
        resume: continue OUT/last.pt if it exists.
    """

    def __init__(self, cfg: C.TrainConfig, *, mode="train", init=None, resume=False, log=print):
        self.cfg, self.mode, self.init, self.resume = cfg, mode, init, resume
        self.log = log or (lambda *a: None)
        self.out = Path(cfg.run.out)
        self.world, self.rank, self.device, self.micro_batch = self.build_distributed()
        data = self.build_data()
        self.classes, self.trainset, self.val = data.classes, data.trainset, data.val
        self.normalize, self.autoaugment = data.normalize, data.autoaugment
        self.sampler, self.loader = data.sampler, data.loader
        self.steps_per_epoch, self.total_steps = data.steps_per_epoch, data.total_steps
        self.num_epochs = data.num_epochs
        models = self.build_models()
        self.student, self.student_raw, self.ema = models.student, models.student_raw, models.ema
        self.teacher, self.num_classes = models.teacher, models.num_classes
        self.amp_dtype, self.scaler = models.amp_dtype, models.scaler
        self.cache = self.build_cache(self.num_classes)
        if self.cache is not None:  # the DataLoader's workers read the rows (first iteration)
            self.trainset.cache = self.cache.reader()
        self.teacher_forwards = 0  # teacher forwards in training (cached batches skip it)
        self._cache_counts = [0, 0]  # micro-batches served from the cache, all (log interval)
        o = cfg.optim
        self.peak_lr = o.lr if o.lr is not None else o.base_lr * cfg.run.batch_size / 256
        self.optimizer = self.build_optimizer()
        self.scheduler = self.build_schedule(self.optimizer)
        self.runlog = RunLog(self.out, enabled=self.rank == 0)
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0
        if resume and (self.out / "last.pt").exists():
            self.load_checkpoint(self.out / "last.pt")
        self.runlog.config({"mode": mode, "world": self.world, **cfg.to_dict()})

    # ---- build steps ----

    def build_distributed(self) -> Distributed:
        """world, rank, device (``run.device``; under torchrun ``cuda`` is the local GPU),
        micro_batch; sets up the process group, the current GPU, determinism and the seed."""
        env = process_env()
        try:
            device = resolve_device(self.cfg.run.device, env.local_rank)
        except DeviceError as e:
            raise C.ConfigError(f"run.device: {e}") from None
        if device.type == "cuda":
            torch.cuda.set_device(device)
        B, accum = self.cfg.run.batch_size, self.cfg.run.grad_accum
        if B % (env.world * accum):
            raise C.ConfigError(
                f"run.batch_size={B} is not divisible by {env.world} processes x "
                f"run.grad_accum={accum}"
            )
        if env.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, init_method="env://")
        if self.cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(self.cfg.run.seed + env.rank)
        micro_batch = B // (env.world * accum)
        return Distributed(world=env.world, rank=env.rank, device=device, micro_batch=micro_batch)

    def build_data(self) -> TrainData:
        """classes, normalize, autoaugment, trainset, sampler, loader, the step counts, val
        (needs :meth:`build_distributed`'s world, rank, device, micro_batch)."""
        d, run = self.cfg.data, self.cfg.run
        classes, trainset, loader = None, None, None
        normalize = Normalize(d.mean, d.std).to(self.device)
        autoaugment = None
        if d.autoaugment:
            try:
                from kornia.augmentation.auto import AutoAugment
            except ImportError:
                raise C.ConfigError("data.autoaugment needs kornia (pip install kornia)") from None
            autoaugment = AutoAugment(policy="imagenet").to(self.device)
        if d.synthetic:
            sampler = ResumableSampler(d.synthetic_size, run.batch_size, self.world, self.rank)
        else:
            sources = []
            if d.train is not None:
                classes, items = class_folder(d.train)
                sources.append((Path(d.train), [p for p, _ in items], [y for _, y in items]))
            if d.unlabeled is not None and self.mode == "train":
                root, paths = unlabeled_list(d.unlabeled, d.unlabeled_root)
                sources.append((root, paths, [-1] * len(paths)))
            if not sources:
                raise C.ConfigError("finetuning needs data.train (the labeled set T)")
            tf = TrainTransform(d.input_size, d.min_scale, d.hflip, run.seed)
            trainset = TrainSet(sources, tf, replay=d.crop_replay)
            sampler = ResumableSampler(
                len(trainset), run.batch_size, self.world, self.rank, run.seed
            )
            if d.loader == "dali":
                from ssld.data.dali import DaliLoader

                try:
                    loader = DaliLoader(
                        trainset,
                        sampler,
                        self.micro_batch,
                        device=self.device,
                        decode=d.dali_decode,
                        workers=d.workers,
                    )
                except ValueError as e:
                    raise C.ConfigError(f"data.dali_decode: {e}") from None
            else:
                loader = self._torch_loader(trainset, sampler)
        steps_per_epoch = sampler.batches_per_epoch
        o = self.cfg.optim
        total_steps = o.steps if o.steps else o.epochs * steps_per_epoch
        num_epochs = math.ceil(total_steps / steps_per_epoch)
        val = None
        if d.val is not None:
            val = ev.val_set(d.val)
            if classes is not None and val.classes != classes:
                raise C.ConfigError(
                    f"data.val classes differ from data.train classes "
                    f"({len(val.classes)} vs {len(classes)}, e.g. {val.classes[:3]})"
                )
        return TrainData(
            classes=classes,
            normalize=normalize,
            autoaugment=autoaugment,
            trainset=trainset,
            sampler=sampler,
            loader=loader,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            num_epochs=num_epochs,
            val=val,
        )

    def _torch_loader(self, trainset: TrainSet, sampler: ResumableSampler):
        d = self.cfg.data
        return torch.utils.data.DataLoader(
            trainset,
            batch_size=self.micro_batch,
            sampler=sampler,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=d.workers > 0,
            prefetch_factor=4 if d.workers else None,
            **worker_options(d.workers),
        )

    def build_models(self) -> Models:
        """The student, and the frozen teacher unless ``loss.kd_weight`` is 0 (supervised
        training or finetuning on labels only: no teacher is built, loaded or run); their
        number of classes, the EMA copy, autocast dtype and GradScaler."""
        cfg = self.cfg
        student = ev.build_model(cfg.student, "student")
        teacher = ev.build_model(cfg.teacher, "teacher") if cfg.loss.kd_weight > 0 else None
        if self.init is not None:
            ckpt.load_student_weights(student, self.init)
        student = student.to(self.device)
        if cfg.run.channels_last:
            student = student.to(memory_format=torch.channels_last)
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher = teacher.to(self.device)
            if cfg.run.channels_last:
                teacher = teacher.to(memory_format=torch.channels_last)
        num_classes = self._check_classes(student, teacher)
        if teacher is not None:
            teacher.eval()
            if cfg.teacher.bn_train:  # PaddleClas: teacher BatchNorm uses batch statistics
                for m in teacher.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.train()
        if cfg.run.sync_bn and self.world > 1:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        ema = None
        if cfg.run.ema > 0:
            ema = copy.deepcopy(student).eval()
            for p in ema.parameters():
                p.requires_grad_(False)
        student_raw = student
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            student = nn.parallel.DistributedDataParallel(student, device_ids=ids)
        if cfg.run.compile:
            student = torch.compile(student)
            teacher = torch.compile(teacher) if teacher is not None else None
        amp_dtype = ev.autocast_dtype(cfg.run.amp, self.device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        return Models(
            student=student,
            student_raw=student_raw,
            teacher=teacher,
            ema=ema,
            num_classes=num_classes,
            amp_dtype=amp_dtype,
            scaler=scaler,
        )

    def _check_classes(self, student, teacher) -> int:
        """The number of classes of the models' (N, classes) logits, checked against each
        other and the labels of data.train."""
        s = self.cfg.data.input_size
        x = torch.zeros(2, 3, s, s, device=self.device)
        was = student.training
        student.eval()
        with torch.no_grad():
            ys = student(x)
            yt = teacher(x) if teacher is not None else ys
        student.train(was)
        for name, y in (("student", ys), ("teacher", yt)):
            if not isinstance(y, torch.Tensor) or y.dim() != 2:
                raise C.ConfigError(f"{name} must return (N, classes) logits, got {type(y)}")
        if ys.shape[1] != yt.shape[1]:
            raise C.ConfigError(
                f"student has {ys.shape[1]} classes but teacher has {yt.shape[1]} "
                "(set student.num_classes)"
            )
        need_labels = self.cfg.loss.ce_weight > 0 or self.cfg.data.val is not None
        if self.classes is not None and need_labels and len(self.classes) != ys.shape[1]:
            raise C.ConfigError(
                f"data.train has {len(self.classes)} classes but the models have {ys.shape[1]}"
            )
        return ys.shape[1]

    def build_cache(self, num_classes: int) -> tcache.TeacherCache | None:
        """The teacher-output cache (data.teacher_cache) for models of ``num_classes``, or
        None; a cache built for other settings is refused."""
        d = self.cfg.data
        if d.teacher_cache is None:
            return None
        if d.cache_topm > num_classes:
            raise C.ConfigError(
                f"data.cache_topm={d.cache_topm} exceeds the {num_classes} classes of the models"
            )
        meta = tcache.build_meta(self.cfg, self.trainset, num_classes)
        try:
            return tcache.TeacherCache(
                d.teacher_cache, meta, rank=self.rank, world=self.world, log=self.log
            )
        except (SettingsChanged, tcache.CacheError) as e:  # another run's cache, or damaged
            raise C.ConfigError(f"data.teacher_cache: {e}") from None

    def build_optimizer(self) -> torch.optim.SGD:
        o = self.cfg.optim
        groups = param_groups(self.student_raw, o.weight_decay, o.no_decay_bn_bias)
        kw = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.SGD(
            groups, lr=self.peak_lr, momentum=o.momentum, nesterov=o.nesterov, **kw
        )

    def build_schedule(self, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        o = self.cfg.optim
        warmup = int(round(o.warmup_epochs * self.steps_per_epoch))
        min_ratio = o.min_lr / self.peak_lr if self.peak_lr else 0.0
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, self.total_steps, warmup, min_ratio)
        )

    # ---- checkpoints ----

    def state(self) -> dict:
        return {
            "model": _unwrap(self.student).state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": ckpt.rng_state(self.device),
            "config": self.cfg.to_dict(),
            "mode": self.mode,
        }

    def save_checkpoint(self, name: str = "last.pt") -> None:
        if self.cache is not None:  # every rank: its queued rows, then msync
            self.cache.flush()
        if self.rank == 0:
            ckpt.save(self.out / name, self.state())

    def load_checkpoint(self, path) -> None:
        st = ckpt.load(path)
        ignore = set(RESUMABLE_CHANGES)
        saved_cache = st["config"].get("data", {}).get("teacher_cache")
        if saved_cache and self.cfg.data.teacher_cache is not None:
            # the cache may move: a cached run's numbers do not depend on its contents
            ignore.add("data.teacher_cache")
        refuse_changed(
            {"mode": st.get("mode"), **st["config"]},
            {"mode": self.mode, **self.cfg.to_dict()},
            where=f"{path}",
            remedy="use a new run.out or the same settings",
            ignore=ignore,
            error=C.ConfigError,
        )
        _unwrap(self.student).load_state_dict(st["model"])
        if self.ema is not None and st["ema"] is not None:
            self.ema.load_state_dict(st["ema"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        self.step, self.epoch = int(st["step"]), int(st["epoch"])
        self.batch_in_epoch = int(st["batch_in_epoch"])
        ckpt.set_rng_state(st["rng"], self.device)
        self.log(f"resumed {path} at step {self.step} (epoch {self.epoch})")

    # ---- the step ----

    def _batches(self):
        """The micro-batches (:class:`~ssld.data.train.Batch`, or ``CachedBatch`` with a
        teacher cache) of this rank from the current position."""
        if self.loader is None:  # synthetic: one random batch reused, already on the device
            s = self.cfg.data.input_size
            gen = torch.Generator().manual_seed(self.cfg.run.seed)
            imgs = torch.randint(
                0, 256, (self.micro_batch, 3, s, s), dtype=torch.uint8, generator=gen
            )
            imgs = imgs.to(self.device)
            labels = torch.full((self.micro_batch,), -1, dtype=torch.int64, device=self.device)
            ok = torch.ones(self.micro_batch, dtype=torch.bool, device=self.device)
            n = (self.steps_per_epoch - self.batch_in_epoch) * self.cfg.run.grad_accum
            for _ in range(n):
                yield Batch(imgs, labels, ok, None)
            return
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        yield from self.loader

    def _inputs(self, imgs):
        x = imgs.to(self.device, non_blocking=True)
        if self.autoaugment is not None:
            x = self.autoaugment(x.float() / 255.0)
            x = (x * 255.0).clamp(0, 255)
        return self.normalize(x)

    def _micro_step(self, batch: Batch, meters, timer, last: bool):
        cfg, L = self.cfg, self.cfg.loss
        cached = batch.cached  # TeacherRows of a teacher cache, or None
        run_teacher = L.kd_weight > 0
        if cached is not None:
            run_teacher = not bool(cached.filled.all())  # host tensor: no device sync
            self._cache_counts[0] += not run_teacher
            self._cache_counts[1] += 1
        amp = ev.autocast(self.device, self.amp_dtype)
        x = self._inputs(batch.images)
        labels = batch.labels.to(self.device, non_blocking=True)
        ok = batch.ok.to(self.device, non_blocking=True)
        t_logits = None
        if run_teacher:
            t_logits = self._teacher_forward(x, amp)
        timer.mark("teacher")
        sync = (
            self.student.no_sync()
            if self.world > 1 and not last and hasattr(self.student, "no_sync")
            else _null()
        )
        with sync:
            with amp:
                s_logits = self.student(x)
            timer.mark("student")  # forward; the backward is added below
            accum = cfg.run.grad_accum
            total = None
            ce = None
            if L.ce_weight > 0:
                has = (labels >= 0) & ok
                ce = F.cross_entropy(s_logits.float(), labels.clamp(min=0), reduction="none")
                ce = (ce * has).sum() / has.sum().clamp(min=1)
                total = L.ce_weight * ce / accum
            loss = ce
            sparse = None
            if cached is not None:  # the stored rows (new ones queued for the cache)
                sparse = self._sparse_teacher(batch.index, cached, t_logits)
            if sparse is not None:
                t = sparse
            elif t_logits is not None:
                t = t_logits.clone() if t_logits.is_inference() else t_logits
            else:
                t = None
            if t is not None:
                div = dict(kind=L.kind, beta=L.beta, temperature=L.temperature, mask=ok)
                if L.fused:  # loss and gradient from one kernel; a surrogate carries the grad
                    s_in = s_logits.detach()
                    if s_in.dtype == torch.float16:
                        # the gradient of the unscaled loss (~p / batch) underflows float16:
                        # keep it in float32 until the GradScaler's scale has been applied
                        s_in = s_in.float()
                    loss, grad = sk.softmax_divergence_and_grad(s_in, t, **div)
                    if grad.dtype == s_logits.dtype:
                        kd = (s_logits * grad).sum()
                    else:  # d kd / d s_logits = grad * scale, rounded to float16 once
                        kd = (s_logits.float() * grad).sum()
                else:
                    loss = kd = sk.softmax_divergence(s_logits, t, **div)
                kd = L.kd_weight * kd / accum
                total = kd if total is None else total + kd
            timer.mark("loss")
            self.scaler.scale(total).backward()
        timer.mark("student")
        meters.add("loss", loss)
        if ce is not None:
            meters.add("ce", ce)
        if sparse is not None or t_logits is not None:
            t_top = sparse.index[:, 0] if sparse is not None else t_logits.argmax(1)
            agree = (s_logits.detach().argmax(1) == t_top) & ok
            meters.add("agree", agree.sum())
        meters.add("images", ok.sum())

    def _teacher_forward(self, x, amp):
        ctx = torch.no_grad() if self.cfg.teacher.bn_train else torch.inference_mode()
        with ctx, amp:
            t_logits = self.teacher(x)
        self.teacher_forwards += 1
        return t_logits

    def _sparse_teacher(self, indices, cached: TeacherRows, t_logits):
        """SparseTeacher of a micro-batch from its cached rows, and from ``t_logits`` (top-m
        at the loss temperature) where not filled; new rows are queued for the cache."""
        filled, probs, ids = cached.filled, cached.probs, cached.ids
        view = self.epoch % self.cfg.data.crop_replay
        if t_logits is None:  # every row filled
            probs = probs.to(self.device, non_blocking=True)
            ids = ids.to(self.device, non_blocking=True)
        else:
            L = self.cfg.loss
            fresh_p, fresh_i = tcache.sparse_rows(
                t_logits, self.cache.topm, L.temperature, self.cache.dtype
            )
            self.cache.put(indices.numpy(), view, (~filled).numpy(), fresh_p, fresh_i)
            if bool(filled.any()):  # keep the stored rows: the first computed value wins
                f = filled.to(self.device, non_blocking=True)[:, None]
                fresh_p = torch.where(f, probs.to(self.device, non_blocking=True), fresh_p)
                fresh_i = torch.where(f, ids.to(self.device, non_blocking=True), fresh_i)
            probs, ids = fresh_p, fresh_i
        return sk.SparseTeacher(probs, ids, remainder="uniform", validate=False)

    @torch.no_grad()
    def _fill_dropped(self) -> None:
        """Teacher rows of the images this epoch left out (drop_last; this rank's share), so
        that a later epoch with the same view finds all rows of its batches filled."""
        if self.cache is None or self.loader is None:
            return
        view = self.epoch % self.cfg.data.crop_replay
        self.cache.drain(block=True)
        dropped = np.asarray(self.sampler.dropped(), dtype=np.int64)
        todo = dropped[~self.cache.is_filled(dropped, view)].tolist()
        amp = ev.autocast(self.device, self.amp_dtype)
        L = self.cfg.loss
        for k in range(0, len(todo), self.micro_batch):
            chunk = todo[k : k + self.micro_batch]
            if self.cfg.teacher.bn_train and len(chunk) < 2:
                continue  # batch statistics of one image; filled when a batch needs it
            imgs = torch.stack([self.trainset.image(i, self.epoch)[0] for i in chunk])
            t_logits = self._teacher_forward(self._inputs(imgs), amp)
            p, ids = tcache.sparse_rows(t_logits, self.cache.topm, L.temperature, self.cache.dtype)
            self.cache.put(np.asarray(chunk), view, np.ones(len(chunk), bool), p, ids)

    def _optimizer_step(self, timer) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            d = self.cfg.run.ema
            ema_p = list(self.ema.parameters())
            src_p = list(self.student_raw.parameters())
            torch._foreach_lerp_(ema_p, [p.detach() for p in src_p], 1.0 - d)
            for b_ema, b in zip(self.ema.buffers(), self.student_raw.buffers()):
                b_ema.copy_(b)
        timer.mark("optimizer")

    # ---- the loop ----

    def fit(self) -> dict:
        cfg = self.cfg
        max_steps = cfg.run.max_steps
        if self.rank == 0:
            self.log(
                f"{self.mode}: {self.total_steps} steps ({self.steps_per_epoch} per epoch), "
                f"global batch {cfg.run.batch_size} ({self.world} x {self.micro_batch} x "
                f"{cfg.run.grad_accum}), peak lr {self.peak_lr:g}, device {self.device}"
            )
        if self.val is not None and self.teacher is not None and self.step == 0:  # every rank
            self._teacher_eval_once()
        meters, timer = Meters(self.device), StepTimer(self.device)
        self._logged_step = self.step
        bar = self._progress()
        t_log = time.perf_counter()
        images_since = 0
        stopped = False
        try:
            while self.step < self.total_steps and not stopped:
                self.student.train()
                accum_i = 0
                t_data = time.perf_counter()
                for batch in self._batches():
                    timer.data(time.perf_counter() - t_data)
                    if accum_i == 0:
                        timer.start()
                    accum_i += 1
                    last = accum_i == cfg.run.grad_accum
                    self._micro_step(batch, meters, timer, last)
                    images_since += len(batch.images) * self.world
                    if last:
                        accum_i = 0
                        self._optimizer_step(timer)
                        if self.cache is not None:
                            self.cache.drain(block=False)
                        self.step += 1
                        self.batch_in_epoch += 1
                        if bar is not None:
                            bar.update(1)
                        if self.step % cfg.run.log_every == 0:
                            t_log, images_since = self._log_train(
                                meters, timer, t_log, images_since, bar
                            )
                        if self.step % cfg.run.ckpt_every == 0:
                            self.save_checkpoint()
                        if max_steps is not None and self.step >= max_steps:
                            stopped = self.step < self.total_steps
                            break
                        if self.step >= self.total_steps:
                            break
                    t_data = time.perf_counter()
                if stopped:
                    break
                self._fill_dropped()
                self.epoch += 1
                self.batch_in_epoch = 0
                self.save_checkpoint()
                if self.cache is not None and self.world > 1:
                    torch.distributed.barrier()  # every rank's rows written: next epoch reads
                every = cfg.run.eval_every
                if self.val is not None and every and self.epoch % every == 0:
                    self.evaluate_and_log()
        finally:
            if bar is not None:
                bar.close()
        if meters.sums:
            self._log_train(meters, timer, t_log, images_since, None)
        self.save_checkpoint()
        result = {"step": self.step, "epoch": self.epoch, "finished": not stopped}
        if self.cache is not None:  # this process's teacher forwards in this fit()
            result["teacher_forwards"] = self.teacher_forwards
        if not stopped:
            if self.val is not None and not (
                cfg.run.eval_every and self.epoch % cfg.run.eval_every == 0
            ):
                self.evaluate_and_log()
            if self.rank == 0:
                weights = self.ema if self.ema is not None else _unwrap(self.student)
                ckpt.save(self.out / "student.pt", weights.state_dict())
                result["weights"] = str(self.out / "student.pt")
        if self.rank == 0:
            result["curves"] = str(self.runlog.plot() or "")
        self.runlog.close()
        return result

    def _log_train(self, meters, timer, t_log, images_since, bar):
        m = meters.read()  # the only synchronisation: once per log interval
        phases = timer.read()
        if self.cache is not None:
            self.cache.drain(block=True)
        now = time.perf_counter()
        n = max(m.get("images", 0.0), 1.0)
        steps = max(1, self.step - self._logged_step)  # the last record may be shorter
        self._logged_step = self.step
        rec = {
            "kind": "train",
            "step": self.step,
            "epoch": self.epoch + self.batch_in_epoch / max(1, self.steps_per_epoch),
            "loss": m.get("loss", 0.0) / (steps * self.cfg.run.grad_accum),
            "agree": 100.0 * m.get("agree", 0.0) / n,
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": images_since / max(now - t_log, 1e-9),
            **{f"t_{p}": phases[p] for p in PHASES},
        }
        if "ce" in m:
            rec["ce"] = m["ce"] / (steps * self.cfg.run.grad_accum)
        if self.cache is not None:  # micro-batches that skipped the teacher forward
            hits, total = self._cache_counts
            rec["cached"] = hits / max(total, 1)
            self._cache_counts = [0, 0]
        if self.rank == 0:
            self.runlog.write(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
        return now, 0

    def _progress(self):
        if not self.cfg.run.progress or self.rank != 0:
            return None
        from tqdm import tqdm

        total = self.total_steps
        if self.cfg.run.max_steps is not None:
            total = min(total, self.cfg.run.max_steps)
        return tqdm(total=total, initial=self.step, desc=self.mode, unit="step", mininterval=1.0)

    # ---- evaluation ----

    def evaluate(self, model: nn.Module, batch_size: int = 128) -> dict:
        """Top-1 / top-5 (%) of ``model`` on data.val (this rank's share, all-reduced)."""
        kw = dict(amp_dtype=self.amp_dtype, rank=self.rank, world=self.world)
        return ev.evaluate(model, self.val, self.cfg.data, self.device, batch_size=batch_size, **kw)

    def evaluate_and_log(self) -> dict:
        model = self.ema if self.ema is not None else _unwrap(self.student)
        res = self.evaluate(model)
        if self.rank == 0:
            self.runlog.write({"kind": "eval", "step": self.step, "epoch": self.epoch, **res})
            self.log(
                f"epoch {self.epoch}: student top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}%"
            )
        return res

    def _teacher_eval_once(self) -> None:
        res = self.evaluate(_unwrap(self.teacher))  # every rank: evaluate() all-reduces
        if self.rank == 0:
            (self.out / "teacher_eval.json").write_text(json.dumps(res))
            self.runlog.write({"kind": "teacher_eval", "step": 0, **res})
            self.log(f"teacher: top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}%")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
