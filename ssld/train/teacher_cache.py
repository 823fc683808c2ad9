"""Teacher-output cache: the teacher's top-m probabilities per (image, view), on disk.

With ``data.crop_replay = R`` an image has R augmented views: epoch e crops and flips image i
exactly as epoch ``e % R`` did (TrainTransform is a pure function of (seed, epoch, index)), so
the teacher's output for the key (i, view = e % R) can be computed once and replayed. The
folder ``data.teacher_cache`` holds, as numpy ``.npy`` files opened as memmaps::

    probs.npy   (N, R, m) float16 | float32  top-m of softmax(teacher_logits / T), T = the
                                             loss temperature, in decreasing order
    index.npy   (N, R, m) int32              their class ids
    filled.npy  (N, R)    uint8              1 where the row holds data
    meta.json   what the cache was built for: teacher (spec, kwargs, sha256 of the weights),
                dataset (size, sha256 of the relative path list), transform (input size,
                crop scale, flip, seed, R, normalisation) and format (m, dtype, T, classes).
                A cache built for anything else is refused (``SettingsChanged``, naming
                the setting); a damaged one raises ``CacheError``.

N = len(trainset). Rows are written by the process that trained on them (DDP samplers are
disjoint, so ranks write disjoint rows of the shared files: one node, or a file system with
coherent shared mmap), from host copies made without a per-step synchronisation (pinned
buffers + an event, written once the event has completed, at the latest at the next log
interval or checkpoint; checkpoints also msync). A killed run leaves ``filled = 0`` for the
rows it had not written yet; they are recomputed when needed.

Semantics: with the cache on, every step distils from the stored (sparse) teacher rows, also
in the step that computes them (a batch with some rows filled runs the teacher and uses the
stored rows where filled, the fresh top-m elsewhere). So the numbers of a run are a function
of its configuration only, not of what the cache already held: a resumed run, or a second run
over a full cache, reproduces an uninterrupted run exactly, while its teacher forwards are
skipped. With ``m = classes`` and float32 storage the loss equals the uncached one up to
rounding; float16 storage rounds the probabilities (relative 2^-11).

Size: N x R x (6m + 1) bytes with float16 (m = 10, R = 10: 0.6 KB per image, 3.3 GB for
5.3M images). Limits: the teacher's numerics (amp, channels_last, compile, the device) are
not part of the identity; with ``teacher.bn_train`` a stored row depends on the batch it was
computed in; the images ``drop_last`` leaves out are filled in batches of their own; DDP over
several nodes needs a cache folder on a file system with coherent shared mmap writes.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ssld._resume import refuse_changed
from ssld.data.train import TeacherRows

FILES = ("probs.npy", "index.npy", "filled.npy")
VERSION = 1


class CacheError(ValueError):
    """A cache folder whose files are missing or damaged."""


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def dataset_fingerprint(trainset) -> str:
    """sha256 over (source number, relative path) of every item, in order (roots excluded:
    the data may move)."""
    h = hashlib.sha256()
    for s, p in zip(trainset.source, trainset.paths):
        h.update(f"{s}\t{p}\n".encode())
    return h.hexdigest()


def build_meta(cfg, trainset, num_classes: int) -> dict:
    """The identity of a cache: the keys compared when an existing cache is opened (plus
    ``info``, recorded but not compared)."""
    d, t = cfg.data, cfg.teacher
    spec_file = t.name if os.path.isfile(t.name) else None
    meta = {
        "version": VERSION,
        "teacher": {
            "name": t.name,
            "spec_sha256": _sha256_file(spec_file) if spec_file else None,
            "weights_sha256": _sha256_file(t.weights) if t.weights else None,
            "num_classes": t.num_classes,
            "kwargs": t.kwargs,
            "bn_train": t.bn_train,
        },
        "dataset": {"size": len(trainset), "paths_sha256": dataset_fingerprint(trainset)},
        "transform": {
            "input_size": d.input_size,
            "min_scale": d.min_scale,
            "hflip": d.hflip,
            "seed": cfg.run.seed,
            "crop_replay": d.crop_replay,
            "mean": d.mean,
            "std": d.std,
        },
        "format": {
            "topm": d.cache_topm,
            "dtype": d.cache_dtype,
            "temperature": cfg.loss.temperature,
            "classes": num_classes,
        },
        "info": {"teacher_weights": str(t.weights) if t.weights else None},
    }
    return json.loads(json.dumps(meta))  # tuples -> lists, as read back from meta.json


_KEYS = {  # meta key -> config key, for the error message
    ("transform", "seed"): "run.seed",
    ("format", "topm"): "data.cache_topm",
    ("format", "dtype"): "data.cache_dtype",
    ("format", "temperature"): "loss.temperature",
    ("format", "classes"): "the number of classes",
    ("dataset", "size"): "the number of training images",
    ("dataset", "paths_sha256"): "the training image list",
    ("teacher", "spec_sha256"): "the teacher file's content",
    ("teacher", "weights_sha256"): "the teacher weights' content",
}


def _describe(key: str) -> tuple[str, str]:
    """(section, setting) of a meta key, e.g. ``transform.min_scale`` -> the transform,
    ``data.min_scale``: the names of the error message."""
    if key == "version":
        return "format version", "version"
    sec, _, k = key.partition(".")
    return sec, _KEYS.get((sec, k)) or f"{'teacher' if sec == 'teacher' else 'data'}.{k}"


def _identity(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "info"}


class CacheReader:
    """Read-only view for DataLoader workers: ``read(index, view)`` -> :class:`TeacherRows`.

    Opens the memmaps lazily in each process (and drops them when pickled), so workers
    started by fork or spawn map the files themselves and see rows written by the trainer.
    """

    def __init__(self, folder, topm: int, dtype: str):
        self.folder, self.topm, self.dtype = Path(folder), topm, np.dtype(dtype)
        self._maps = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def _open(self):
        if self._maps is None:
            self._maps = tuple(np.load(self.folder / f, mmap_mode="r") for f in FILES)
        return self._maps

    def read(self, index: int, view: int) -> TeacherRows:
        probs, ids, filled = self._open()
        if filled[index, view]:
            p = torch.from_numpy(np.array(probs[index, view]))
            i = torch.from_numpy(np.array(ids[index, view]))
            return TeacherRows(True, p, i)
        m = self.topm
        zeros = torch.from_numpy(np.zeros(m, self.dtype))
        return TeacherRows(False, zeros, torch.zeros(m, dtype=torch.int32))


class TeacherCache:
    """The cache of one run (see the module docstring): open or create, queue rows, write.

    Args:
        folder: the cache folder (created when missing).
        meta: :func:`build_meta`; an existing cache must match it (else SettingsChanged).
        rank, world: this process in a DDP group; rank 0 creates the files, the others wait.
    """

    def __init__(self, folder, meta: dict, *, rank: int = 0, world: int = 1, log=None):
        self.folder = Path(folder)
        self.meta = meta
        t, f = meta["transform"], meta["format"]
        self.n, self.views, self.topm = meta["dataset"]["size"], t["crop_replay"], f["topm"]
        self.np_dtype = np.dtype(f["dtype"])
        self.dtype = {"float16": torch.float16, "float32": torch.float32}[f["dtype"]]
        created = False
        if rank == 0 and self._read_meta() is None:
            self._create()
            created = True
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
        self._check()
        self.probs, self.index, self.filled = (
            np.load(self.folder / f, mmap_mode="r+") for f in FILES
        )
        self.pending: collections.deque = collections.deque()
        self.rows_written = 0
        if log is not None and rank == 0:
            done = int(np.count_nonzero(self.filled))
            size = sum((self.folder / f).stat().st_size for f in FILES) / 2**20
            log(
                f"teacher cache {self.folder}: {'created' if created else 'opened'}, "
                f"{self.n} images x {self.views} views x top-{self.topm} ({size:.0f} MiB), "
                f"{done}/{self.n * self.views} rows filled"
            )

    # ---- files ----

    def _read_meta(self) -> dict | None:
        path = self.folder / "meta.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            raise CacheError(f"{path} is unreadable; delete the folder or use another") from None

    def _create(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        shapes = {
            "probs.npy": ((self.n, self.views, self.topm), self.np_dtype),
            "index.npy": ((self.n, self.views, self.topm), np.int32),
            "filled.npy": ((self.n, self.views), np.uint8),
        }
        for name, (shape, dtype) in shapes.items():  # sparse files of zeros, renamed in place
            tmp = self.folder / f"{name}.{os.getpid()}.tmp"
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            mm.flush()
            del mm
            os.replace(tmp, self.folder / name)
        tmp = self.folder / f"meta.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.meta, indent=1))
        os.replace(tmp, self.folder / "meta.json")  # last: the cache exists from here on

    def _check(self) -> None:
        old = self._read_meta()
        if old is None:
            raise CacheError(f"{self.folder}/meta.json is missing")
        refuse_changed(
            _identity(old), _identity(self.meta), where=f"{self.folder}",
            remedy="use another folder or delete it", describe=_describe,
        )  # fmt: skip
        want = {
            "probs.npy": ((self.n, self.views, self.topm), self.np_dtype),
            "index.npy": ((self.n, self.views, self.topm), np.dtype(np.int32)),
            "filled.npy": ((self.n, self.views), np.dtype(np.uint8)),
        }
        for name, (shape, dtype) in want.items():
            try:
                a = np.load(self.folder / name, mmap_mode="r")
            except (OSError, ValueError):
                a = None
            if a is None or a.shape != shape or a.dtype != dtype:
                raise CacheError(
                    f"{self.folder}/{name} is missing or damaged; delete the folder or use another"
                )

    def reader(self) -> CacheReader:
        return CacheReader(self.folder, self.topm, self.np_dtype.name)

    # ---- rows ----

    def is_filled(self, indices, view: int) -> np.ndarray:
        return self.filled[np.asarray(indices, dtype=np.int64), view] != 0

    def put(self, indices, view: int, need, probs: torch.Tensor, ids: torch.Tensor) -> None:
        """Queue rows ``indices[need]`` of ``view``: (n, m) probs (the cache dtype) and int32
        ids on the device. Copies to host without waiting (CUDA: pinned buffers, an event)."""
        need = np.asarray(need, dtype=bool)
        if not need.any():
            return
        event = None
        if probs.device.type == "cuda":
            hp = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
            hi = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            hp.copy_(probs, non_blocking=True)
            hi.copy_(ids, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            hp, hi = probs.detach().cpu(), ids.detach().cpu()
        self.pending.append((np.asarray(indices, dtype=np.int64), view, need, hp, hi, event))

    def drain(self, block: bool = True) -> None:
        """Write the queued rows whose copies are complete (all of them when ``block``)."""
        while self.pending:
            indices, view, need, hp, hi, event = self.pending[0]
            if event is not None:
                if not block and not event.query():
                    break
                event.synchronize()
            rows = indices[need]
            self.probs[rows, view] = hp.numpy()[need]
            self.index[rows, view] = hi.numpy()[need]
            self.filled[rows, view] = 1  # after the data
            self.rows_written += len(rows)
            self.pending.popleft()

    def flush(self) -> None:
        """Write everything queued and msync (checkpoints): data before the filled flags."""
        self.drain(block=True)
        for mm in (self.probs, self.index, self.filled):
            mm.flush()


def sparse_rows(t_logits: torch.Tensor, topm: int, temperature: float, dtype: torch.dtype):
    """(probs in ``dtype``, int32 ids): top-m of softmax(t_logits / T), as stored."""
    with torch.no_grad():
        x = t_logits.detach().float() / float(temperature)
        probs, ids = torch.softmax(x, dim=-1).topk(topm, dim=-1)
    return probs.to(dtype), ids.to(torch.int32)
