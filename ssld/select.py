"""``ssld select``: keep, per teacher class, the K gallery images the teacher is surest of.

Every gallery image is classified by the frozen teacher; class = argmax, score = its softmax
probability. Per class the K highest scores are kept, ties to the lexicographically smaller
path; a class with fewer than K candidates keeps all of them.

Streaming: the per-class top-K lives on the device in a (classes, K) table
(:class:`ClassTopK`); batches are appended to a fixed-size buffer that is merged into the
table by two stable sorts when it fills, so memory is O(classes x K), the hot loop has no
host synchronisation and the result does not depend on when merges happen.

Resumable and shardable: image ids are ranks in the sorted gallery; global batch b holds ids
[b * B, (b + 1) * B) and shard i of n processes the batches with b % n == i, so every batch
has the same images (and the same scores) however the work is split. The state (table,
batches done, unreadable images) is written atomically to ``FILE.part-i-of-n.npz`` every
``checkpoint_seconds`` and at the end; a killed run restarts from its last checkpoint and
produces the identical file. When all parts are done, they are merged (again by the same
exact top-K) into FILE (``path,class,score``), FILE.failed.txt, FILE.classes.csv (count and
score quantiles per class), FILE.hist.png (score histogram, when matplotlib is installed)
and, with ``topm > 0``, FILE.topm.npz (the teacher's top-m probabilities, fp16, per row).
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssld._io import (
    atomic_savez,
    atomic_write_text,
    list_images,
    progress_bar,
    pyplot,
    read_list,
)
from ssld._resume import refuse_changed
from ssld.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    ImageList,
    Normalize,
    worker_options,
)

EMPTY_ID = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class SelectConfig:
    k: int
    batch_size: int = 256
    topm: int = 0
    transform: EvalTransform = field(default_factory=EvalTransform)
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True
    compile: bool = False
    checkpoint_seconds: float = 300.0

    def __post_init__(self):
        for name in ("k", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.topm, int) or self.topm < 0:
            raise ValueError(f"topm must be an integer >= 0, got {self.topm!r}")
        if not self.checkpoint_seconds >= 0:
            raise ValueError(f"checkpoint_seconds must be >= 0, got {self.checkpoint_seconds}")

    def identity(self) -> dict:
        """Settings that determine the result (a resumed run must use the same ones)."""
        d = asdict(self)
        for key in ("amp", "compile", "checkpoint_seconds", "channels_last"):
            d.pop(key)
        d["mean"], d["std"] = list(d["mean"]), list(d["std"])
        return d


class ClassTopK:
    """Exact streaming top-K per class with ties to the smaller id, on one device.

    ``add`` takes per-image (class, score, id[, top-m values, top-m classes]) tensors; rows
    with id == EMPTY_ID are ignored. Scores must be >= 0 (probabilities).
    """

    def __init__(self, num_classes: int, k: int, device, topm: int = 0, buffer: int = 0):
        self.c, self.k, self.m, self.device = num_classes, k, topm, torch.device(device)
        self.scores = torch.full((num_classes, k), -1.0, device=self.device)
        self.ids = torch.full((num_classes, k), EMPTY_ID, dtype=torch.int64, device=self.device)
        self.top_val = torch.zeros((num_classes, k, topm), dtype=torch.float16, device=device)
        self.top_cls = torch.zeros((num_classes, k, topm), dtype=torch.int32, device=device)
        self.cap = max(buffer, num_classes * k, 4096)
        self.n = 0  # host-side fill level of the buffer
        self.b_cls = torch.zeros(self.cap, dtype=torch.int64, device=self.device)
        self.b_score = torch.full((self.cap,), -1.0, device=self.device)
        self.b_id = torch.full((self.cap,), EMPTY_ID, dtype=torch.int64, device=self.device)
        self.b_val = torch.zeros((self.cap, topm), dtype=torch.float16, device=self.device)
        self.b_tcls = torch.zeros((self.cap, topm), dtype=torch.int32, device=self.device)

    def add(self, cls, score, ids, top_val=None, top_cls=None) -> None:
        n = len(ids)
        if n > self.cap:
            for i in range(0, n, self.cap):
                sl = slice(i, i + self.cap)
                self.add(
                    cls[sl],
                    score[sl],
                    ids[sl],
                    None if top_val is None else top_val[sl],
                    None if top_cls is None else top_cls[sl],
                )
            return
        if self.n + n > self.cap:
            self.flush()
        sl = slice(self.n, self.n + n)
        self.b_cls[sl] = cls
        self.b_score[sl] = score
        self.b_id[sl] = ids
        if self.m:
            self.b_val[sl] = top_val
            self.b_tcls[sl] = top_cls
        self.n += n

    def flush(self) -> None:
        """Merge the buffer into the table: exact, fixed shapes, no host synchronisation."""
        if self.n == 0:
            return
        n, c, k = self.n, self.c, self.k
        valid = self.b_id[:n] != EMPTY_ID
        cls = torch.cat([torch.arange(c, device=self.device).repeat_interleave(k), self.b_cls[:n]])
        cls = torch.where(
            torch.cat([torch.ones(c * k, dtype=torch.bool, device=self.device), valid]), cls, 0
        )
        score = torch.cat([self.scores.flatten(), torch.where(valid, self.b_score[:n], -1.0)])
        ids = torch.cat([self.ids.flatten(), torch.where(valid, self.b_id[:n], EMPTY_ID)])
        # order: class ascending, score descending, id ascending (two stable sorts)
        perm = torch.argsort(ids, stable=True)
        bits = score[perm].clamp(min=0).view(torch.int32).to(torch.int64)
        inv = torch.where(score[perm] < 0, 0xFFFFFFFF, 0x7FFFFFFF - bits)
        perm = perm[torch.argsort((cls[perm] << 32) | inv, stable=True)]
        counts = torch.bincount(cls, minlength=c)  # every class has >= k (table) entries
        start = torch.cumsum(counts, 0) - counts
        take = perm[start[:, None] + torch.arange(k, device=self.device)[None]]  # (c, k)
        self.scores, self.ids = score[take], ids[take]
        if self.m:
            val = torch.cat([self.top_val.reshape(c * k, -1), self.b_val[:n]])
            tcl = torch.cat([self.top_cls.reshape(c * k, -1), self.b_tcls[:n]])
            self.top_val, self.top_cls = val[take], tcl[take]
        self.n = 0

    def state(self) -> dict:
        self.flush()
        out = {"scores": self.scores.cpu().numpy(), "ids": self.ids.cpu().numpy()}
        if self.m:
            out.update(top_val=self.top_val.cpu().numpy(), top_cls=self.top_cls.cpu().numpy())
        return out

    def load(self, state: dict) -> None:
        self.scores = torch.as_tensor(state["scores"]).to(self.device)
        self.ids = torch.as_tensor(state["ids"]).to(self.device)
        if self.m:
            self.top_val = torch.as_tensor(state["top_val"]).to(self.device)
            self.top_cls = torch.as_tensor(state["top_cls"]).to(self.device)
        self.n = 0


def part_path(out: Path, i: int, n: int) -> Path:
    return out.with_name(f"{out.name}.part-{i}-of-{n}.npz")


@dataclass
class ShardState:
    """What one shard's part file holds: the table so far (None until the first batch gives
    the number of classes), the batches done and the ids of unreadable images."""

    table: ClassTopK | None = None
    batches_done: int = 0
    failed: set[int] = field(default_factory=set)


def _save_part(path: Path, meta: dict, state: ShardState, done: bool) -> None:
    table = state.table
    arrays = table.state() if table is not None else {}
    atomic_savez(
        path,
        meta=np.array(json.dumps(meta, sort_keys=True)),
        batches_done=np.int64(state.batches_done),
        failed=np.asarray(sorted(state.failed), np.int64),
        done=np.bool_(done),
        num_classes=np.int64(table.c if table is not None else -1),
        **arrays,
    )


def _part_done(path: Path) -> bool:
    """Whether a part file exists and is finished (reads only that flag, not its table)."""
    if not path.exists():
        return False
    with np.load(path) as z:
        return bool(z["done"])


def _load_part(path: Path) -> dict:
    with np.load(path) as z:
        d = {k: z[k] for k in z.files}
    d["meta"] = json.loads(str(d["meta"]))
    return d


_META_NAMES = {  # run_select's meta keys: (what they are part of, how the user knows them)
    "images": ("gallery", "the number of images"),
    "first": ("gallery", "the first path"),
    "last": ("gallery", "the last path"),
    "teacher": ("teacher", "the teacher"),
    "shards": ("setting", "the number of shards"),
}


def _describe_meta(key: str) -> tuple[str, str]:
    return _META_NAMES.get(key) or ("setting", key.removeprefix("config."))


def _resume_part(path: Path, meta: dict, cfg: SelectConfig, device) -> ShardState:
    """The saved state of a part file, refused when it was written for other settings."""
    saved = _load_part(path)
    refuse_changed(
        saved["meta"], meta, where=f"{path}", remedy="remove it or choose another output",
        describe=_describe_meta,
    )  # fmt: skip
    state = ShardState(None, int(saved["batches_done"]), set(saved["failed"].tolist()))
    if int(saved["num_classes"]) > 0:
        state.table = ClassTopK(int(saved["num_classes"]), cfg.k, device, cfg.topm)
        state.table.load(saved)
    return state


@dataclass
class Throughput:
    images: int = 0
    seconds: float = 0.0
    data_wait: float = 0.0
    compute: float = 0.0

    def line(self) -> str:
        ips = self.images / self.seconds if self.seconds else 0.0
        return (
            f"{self.images} images in {self.seconds:.1f} s: {ips:.1f} images/s; waiting for data "
            f"{self.data_wait:.1f} s, teacher + selection {self.compute:.1f} s"
        )


def run_select(
    teacher: nn.Module,
    paths: list[str],
    root: str | os.PathLike,
    out: str | os.PathLike,
    cfg: SelectConfig,
    *,
    teacher_id: str = "",
    shard: tuple[int, int] = (0, 1),
    device="cpu",
    workers: int = 0,
    progress: bool = True,
    write_output: bool = True,
    max_batches: int | None = None,
    log=print,
) -> dict:
    """Run or resume shard ``shard`` of the selection over the sorted unique ``paths``.

    ``max_batches`` stops (after a checkpoint) once that many batches were processed in this
    call, for time-limited jobs. Returns a summary including the throughput.
    """
    log = log or (lambda *a: None)
    i_shard, n_shard = shard
    if not (isinstance(n_shard, int) and n_shard >= 1 and 0 <= i_shard < n_shard):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    if not paths:
        raise ValueError("the gallery is empty: no images to select from")
    if list(paths) != sorted(set(paths)):
        raise ValueError("paths must be sorted and unique (ids are ranks in the sorted gallery)")
    out, device = Path(out), torch.device(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "images": len(paths),
        "first": paths[0],
        "last": paths[-1],
        "config": cfg.identity(),
        "teacher": teacher_id,
        "shards": n_shard,
    }
    ppath = part_path(out, i_shard, n_shard)
    B = cfg.batch_size
    mine = list(range(i_shard, (len(paths) + B - 1) // B, n_shard))
    state = ShardState()
    if ppath.exists():
        state = _resume_part(ppath, meta, cfg, device)
        if state.batches_done == len(mine):
            log(f"shard {i_shard}/{n_shard} already done")
    todo = mine[state.batches_done :]
    tp = Throughput()
    if todo:
        ids = [i for b in todo for i in range(b * B, min(len(paths), (b + 1) * B))]
        loader = _gallery_loader(paths, root, ids, cfg, device, workers)
        model = prepare_teacher(teacher, cfg, device)
        bar = progress_bar(len(ids), progress, "select", "img", smoothing=0.05)
        try:
            tp = classify(
                model, loader, cfg, device, state, bar=bar, max_batches=max_batches,
                checkpoint=lambda: _save_part(ppath, meta, state, done=False),
            )  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
        log(tp.line())
    finished = state.batches_done == len(mine)
    if finished:
        _save_part(ppath, meta, state, done=True)
    summary = {"shard": list(shard), "finished": finished, "throughput": asdict(tp)}
    parts = [part_path(out, i, n_shard) for i in range(n_shard)]
    all_done = finished and all(_part_done(p) for p in parts)
    summary["written"] = False
    if all_done and write_output:
        summary.update(merge(out, n_shard, paths))
        summary["written"] = True
    elif finished and not all_done:
        log(f"shard {i_shard}/{n_shard} done; the last shard to finish writes {out}")
    return summary


def _gallery_loader(paths, root, ids: list[int], cfg: SelectConfig, device, workers: int):
    """DataLoader of ``(uint8 images, ids, ok)`` batches of the gallery images ``ids``."""
    ds = ImageList([paths[i] for i in ids], root, cfg.transform, indices=ids)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=False,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        **worker_options(workers),
    )


def prepare_teacher(teacher: nn.Module, cfg: SelectConfig, device) -> nn.Module:
    """The teacher on ``device`` in eval mode, channels_last and compiled as configured."""
    model = teacher.to(device)
    try:
        model.eval()
    except NotImplementedError:  # exported programs (.pt2) keep the mode they were exported in
        pass
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model = torch.compile(model)
    return model


def consume(
    model, batches, cfg, device, state, failed, bar=None, checkpoint=None, max_batches=None
) -> Throughput:
    """:func:`classify` for callers that keep the state in a dict (``"table"``,
    ``"done_batches"``, updated in place) and a set of failed ids (bench/bench_select.py)."""
    st = ShardState(state["table"], state["done_batches"], failed)
    try:
        return classify(
            model, batches, cfg, device, st, bar=bar, checkpoint=checkpoint,
            max_batches=max_batches,
        )  # fmt: skip
    finally:
        state["table"], state["done_batches"] = st.table, st.batches_done


def classify(
    model, batches, cfg: SelectConfig, device, state: ShardState, *, bar=None, checkpoint=None,
    max_batches: int | None = None,
) -> Throughput:  # fmt: skip
    """The hot loop: classify ``(uint8 images, ids, ok)`` batches into ``state.table``.

    No host synchronisation per batch: shapes are checked from metadata, unreadable ids come
    from the host-side ``ok`` mask, GPU time is measured with CUDA events read at the end.
    ``checkpoint()`` is called every ``cfg.checkpoint_seconds`` and before a
    ``max_batches`` stop.
    """
    device = torch.device(device)
    norm = Normalize(cfg.mean, cfg.std).to(device)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.amp)
    tp = Throughput()
    events = []
    t_start = last_ckpt = time.perf_counter()
    processed = 0
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            imgs, batch_ids, ok = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        tp.data_wait += t1 - t0
        if cuda:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
        with torch.inference_mode(), amp:
            logits = model(norm(imgs))
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError(
                "the teacher must return (N, classes) logits, got "
                f"{type(logits).__name__}{tuple(getattr(logits, 'shape', ()))}"
            )
        if logits.shape[0] != len(batch_ids):
            raise ValueError(
                f"the teacher returned {logits.shape[0]} rows for {len(batch_ids)} images"
            )
        table = state.table
        if table is None:
            table = state.table = ClassTopK(logits.shape[1], cfg.k, device, cfg.topm)
        elif logits.shape[1] != table.c:
            raise ValueError(f"the teacher returned {logits.shape[1]} classes, not {table.c}")
        with torch.inference_mode():
            probs = logits.float().softmax(1)
            score, cls = probs.max(1)
            okd = ok.to(device, non_blocking=True)
            idd = batch_ids.to(device, non_blocking=True)
            tv = tc = None
            if cfg.topm:
                tv, tc = probs.topk(min(cfg.topm, table.c), 1)
                tv, tc = _pad_topm(tv.half(), tc.int(), cfg.topm)
            table.add(cls, score, torch.where(okd, idd, EMPTY_ID), tv, tc)
        if cuda:
            ev[1].record()
            events.append(ev)
        else:
            tp.compute += time.perf_counter() - t1
        bad = batch_ids[~ok]
        if len(bad):
            state.failed.update(bad.tolist())
        state.batches_done += 1
        processed += 1
        tp.images += len(batch_ids)
        if bar is not None:
            bar.update(len(batch_ids))
        stop = max_batches is not None and processed >= max_batches
        now = time.perf_counter()
        if checkpoint is not None and (
            stop or (cfg.checkpoint_seconds and now - last_ckpt >= cfg.checkpoint_seconds)
        ):
            checkpoint()
            last_ckpt = time.perf_counter()
        if stop:
            break
    if cuda:
        torch.cuda.synchronize(device)
        tp.compute = sum(a.elapsed_time(b) for a, b in events) / 1e3
    tp.seconds = time.perf_counter() - t_start
    return tp


def _pad_topm(val, cls, m):
    if val.shape[1] == m:
        return val, cls
    pad = m - val.shape[1]
    return (
        torch.nn.functional.pad(val, (0, pad)),
        torch.nn.functional.pad(cls, (0, pad), value=-1),
    )


def find_shard_count(out: str | os.PathLike) -> int:
    """n of the ``FILE.part-i-of-n.npz`` files next to ``out`` (exactly one n allowed)."""
    out = Path(out)
    found = {
        int(p.name.rsplit("-of-", 1)[1].split(".")[0])
        for p in out.parent.glob(f"{out.name}.part-*-of-*.npz")
    }
    if len(found) != 1:
        raise FileNotFoundError(
            f"expected the parts of one sharded run next to {out}, found shard counts "
            f"{sorted(found) or 'none'}"
        )
    return found.pop()


def merge(out: str | os.PathLike, n_shard: int, paths: list[str]) -> dict:
    """Merge the finished parts of ``out`` into the output files; returns counts."""
    out = Path(out)
    parts = [_load_part(part_path(out, i, n_shard)) for i in range(n_shard)]
    metas = {json.dumps({**p["meta"], "shards": 0}, sort_keys=True) for p in parts}
    if len(metas) != 1:
        raise ValueError(f"the parts of {out} come from different runs; rerun them")
    if not all(bool(p["done"]) for p in parts):
        raise ValueError(f"not every part of {out} is finished")
    if parts[0]["meta"]["images"] != len(paths):
        raise ValueError(f"the parts of {out} were made for another gallery")
    classes = {int(p["num_classes"]) for p in parts if int(p["num_classes"]) > 0}
    if len(classes) > 1:
        raise ValueError(f"the parts of {out} disagree on the number of classes: {classes}")
    failed = sorted({int(f) for p in parts for f in p["failed"]})
    if not classes:  # every batch empty of readable images is impossible; no parts ran
        raise ValueError(f"no part of {out} classified any image")
    c = classes.pop()
    k, topm = parts[0]["meta"]["config"]["k"], parts[0]["meta"]["config"]["topm"]
    table = ClassTopK(c, k, "cpu", topm)
    for p in parts:
        if int(p["num_classes"]) <= 0:
            continue
        cls = torch.arange(c).repeat_interleave(k)
        tv = torch.from_numpy(p["top_val"]).reshape(c * k, -1) if topm else None
        tc = torch.from_numpy(p["top_cls"]).reshape(c * k, -1) if topm else None
        table.add(
            cls, torch.from_numpy(p["scores"]).flatten(), torch.from_numpy(p["ids"]).flatten(),
            tv, tc,
        )  # fmt: skip
    state = table.state()
    return write_selection(out, paths, state, failed, k, topm)


def write_selection(out: Path, paths, state, failed, k: int, topm: int) -> dict:
    scores, ids = state["scores"], state["ids"]
    keep = ids != EMPTY_ID
    rows_c, rows_j = np.nonzero(keep)  # class-major, rank order within a class
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "class", "score"])
        for c, j in zip(rows_c, rows_j):
            w.writerow([paths[ids[c, j]], int(c), f"{float(scores[c, j]):.9g}"])
    os.replace(tmp, out)
    atomic_write_text(
        out.with_name(out.name + ".failed.txt"), "".join(f"{paths[i]}\n" for i in failed)
    )
    lines = ["class,count,min,p25,median,p75,max"]
    for c in range(scores.shape[0]):
        s = scores[c][keep[c]]
        if len(s):
            q = np.quantile(s.astype(np.float64), [0, 0.25, 0.5, 0.75, 1.0])
            lines.append(f"{c},{len(s)}," + ",".join(f"{x:.6g}" for x in q))
        else:
            lines.append(f"{c},0,,,,,")
    atomic_write_text(out.with_name(out.name + ".classes.csv"), "\n".join(lines) + "\n")
    if topm:
        topm_path = out.with_name(out.name + ".topm.npz")
        atomic_savez(topm_path, prob=state["top_val"][keep], cls=state["top_cls"][keep])
    hist = _histogram(out, scores[keep])
    per_class = keep.sum(1)
    return {
        "selected": int(keep.sum()),
        "classes": int(scores.shape[0]),
        "classes_full": int((per_class == k).sum()),
        "failed": len(failed),
        "histogram": hist,
    }


def _histogram(out: Path, scores) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(scores, bins=50, range=(0, 1))
    ax.set_xlabel("teacher probability of the selected class")
    ax.set_ylabel("selected images")
    ax.set_title(f"{len(scores)} selected images")
    fig.tight_layout()
    path = out.with_name(out.name + ".hist.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def gallery_paths(gallery: str | os.PathLike, root=None) -> tuple[list[str], Path]:
    """(sorted unique relative paths, root) of a gallery folder or a text list of paths."""
    gallery = Path(gallery)
    if gallery.is_dir():
        return list_images(gallery), gallery if root is None else Path(root)
    if not gallery.is_file():
        raise FileNotFoundError(f"gallery not found: {gallery}")
    paths = sorted(set(read_list(gallery)))
    return paths, gallery.parent if root is None else Path(root)


def apply_exclusions(paths: list[str], exclude=(), keep=()) -> tuple[list[str], int]:
    """Drop excluded paths; returns (remaining paths, number dropped).

    ``exclude`` files: a dedup ``duplicates.csv`` (its ``query`` column is dropped), a
    dedup ``keep.txt`` (recognised by the ``duplicates.csv`` next to it: everything it does
    not list is dropped), or a plain list of paths to drop. ``keep`` files: plain lists of
    the paths to keep.
    """
    allowed = None
    drop = set()
    for f in exclude:
        f = Path(f)
        if not f.is_file():
            raise FileNotFoundError(f"exclude file not found: {f}")
        with open(f, newline="") as fh:
            first = fh.readline().strip()
        if first.split(",")[:1] == ["query"]:
            with open(f, newline="") as fh:
                drop.update(row["query"] for row in csv.DictReader(fh))
        elif f.name == "keep.txt" and (f.parent / "duplicates.csv").is_file():
            listed = set(read_list(f))
            allowed = listed if allowed is None else allowed & listed
        else:
            drop.update(read_list(f))
    for f in keep:
        f = Path(f)
        if not f.is_file():
            raise FileNotFoundError(f"keep file not found: {f}")
        listed = set(read_list(f))
        allowed = listed if allowed is None else allowed & listed
    out = [p for p in paths if p not in drop and (allowed is None or p in allowed)]
    return out, len(paths) - len(out)
