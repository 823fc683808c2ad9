"""Optional NVIDIA DALI training loader (``data.loader: dali``): JPEG decoding on the GPU.

At ImageNet rates the CPU, not the GPU, limits a DataLoader that decodes with OpenCV (about
1.5-2 ms of CPU per 500x375 JPEG, so 16 cores feed ~8k img/s at best, before cropping).
DALI's ``mixed`` decoder runs the Huffman stage on the CPU and the IDCT on the GPU (and on
the A100/H100 hardware JPEG engines through ``hw_decoder_load``), and decodes only the crop
(region-of-interest decoding), then resizes and flips on the GPU.

Same samples as the DataLoader path (:class:`ssld.data.train.TrainSet`): the sample order
is the :class:`~ssld.data.train.ResumableSampler`'s, and every crop/flip is drawn in Python
by :class:`~ssld.data.train.TrainTransform` from (seed, view, index), using the image size
read from the file header (:mod:`ssld.data.imagesize`), and handed to DALI as the slice to
decode. So exact resume, crop replay and the teacher-output cache work unchanged, and the
pixels differ from the OpenCV path only by decoder and interpolation rounding.

Batches: :class:`~ssld.data.train.Batch` (uint8 (N, 3, S, S) images on the device, labels,
ok, indices), or :class:`~ssld.data.train.CachedBatch` with the cached teacher rows, like
the DataLoader's. Files are read, and headers parsed, by DALI's parallel external
source (``workers // 4`` spawned processes, at least one). Files DALI would refuse or that
cannot be sized from the header (other formats, odd headers, JPEGs cut before their end
marker, which OpenCV decodes partially) are decoded there with OpenCV and handed over as
lossless PNG; what OpenCV cannot read becomes a black image with ``ok = False``. If DALI
still fails on a batch (a corrupt body it refuses), that batch is decoded with OpenCV by the
DataLoader's code and the pipeline restarts at the next micro-batch, so a broken file never
stops a run. The pipeline's reader processes are spawned: a script that builds a loader
must be importable (``if __name__ == "__main__":``); the ``ssld`` CLI is.
``decode="cpu"`` runs everything on the CPU (DALI CPU operators): no GPU needed,
which is how the tests run it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ssld._io import read_bgr
from ssld.config import require_dali
from ssld.data.imagesize import image_size, jpeg_complete
from ssld.data.train import Batch, CachedBatch, ResumableSampler, TeacherRows, TrainSet

DECODE_CHOICES = ("auto", "gpu", "cpu")
_PLACEHOLDER_SIZE = 8
MAX_PIXELS = 1 << 30  # OpenCV's CV_IO_MAX_IMAGE_PIXELS: larger claims count as bad files


def _placeholder() -> np.ndarray:
    import cv2

    ok, buf = cv2.imencode(".png", np.zeros((_PLACEHOLDER_SIZE,) * 2 + (3,), np.uint8))
    assert ok
    return buf.reshape(-1)


class _Source:
    """DALI parallel external source: encoded bytes and crop windows of one micro-batch.

    Called in DALI's worker processes with ``info.iteration`` (batch within the epoch) and
    ``info.epoch_idx`` (epochs since the pipeline was built: epoch ``epoch0 + epoch_idx``;
    the first one starts at global batch ``start0``, then skips ``skip0`` micro-batches).
    """

    def __init__(self, dataset: TrainSet, sampler: ResumableSampler, micro_batch: int,
                 epoch0: int, start0: int, skip0: int = 0):  # fmt: skip
        self.dataset, self.micro_batch = dataset, micro_batch
        self.sampler_args = (sampler.n, sampler.B, sampler.world, sampler.rank, sampler.seed)
        self.epoch0, self.start0, self.skip0 = epoch0, start0, skip0
        self._keys = (None, None)
        self._placeholder = None

    def keys(self, epoch: int, start: int) -> list[int]:
        if self._keys[0] != (epoch, start):
            s = ResumableSampler(*self.sampler_args)
            s.set_epoch(epoch, start)
            self._keys = ((epoch, start), [i for i, _ in s])
        return self._keys[1]

    def sample(self, index: int, view: int):
        """(bytes, (y, x), (h, w), flip, ok) of one image."""
        ds = self.dataset
        try:
            path = ds.roots[ds.source[index]] / ds.paths[index]
            data = np.fromfile(path, dtype=np.uint8)
            hw = image_size(data)
            if hw is not None and data[0] == 0xFF and not jpeg_complete(data):
                hw = None  # a cut JPEG: DALI refuses it, OpenCV decodes what is there
            if hw is None:  # not JPEG/PNG, an odd header or a cut file: decode with OpenCV
                import cv2

                img = read_bgr(path)  # as the DataLoader path reads it
                if img is None:
                    hw = None
                else:  # hand DALI the decoded pixels, losslessly (EXIF already applied)
                    good, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
                    data, hw = (buf.reshape(-1), img.shape[:2]) if good else (data, None)
            if hw is not None and hw[0] * hw[1] <= MAX_PIXELS:
                y, x, ch, cw, flip = ds.transform.params(hw[0], hw[1], view, index)
                return data, (y, x), (ch, cw), flip, True
        except Exception:  # noqa: BLE001 - unreadable, or OpenCV refuses (cv2.error): bad
            pass
        if self._placeholder is None:
            self._placeholder = _placeholder()
        return self._placeholder, (0, 0), (_PLACEHOLDER_SIZE,) * 2, False, False

    def __call__(self, info):
        k = info.epoch_idx
        epoch, start = self.epoch0 + k, self.start0 if k == 0 else 0
        b = info.iteration + (self.skip0 if k == 0 else 0)  # micro-batch of this pass
        keys = self.keys(epoch, start)
        mb = self.micro_batch
        if (b + 1) * mb > len(keys):
            raise StopIteration
        view = self.dataset.view(epoch)
        enc, anchor, shape, flip, ok = [], [], [], [], []
        for index in keys[b * mb : (b + 1) * mb]:
            d, a, s, f, good = self.sample(index, view)
            enc.append(d)
            anchor.append(np.asarray(a, np.int32))
            shape.append(np.asarray(s, np.int32))
            flip.append(np.asarray(f, np.int32))
            ok.append(np.asarray(good, np.uint8))
        return enc, anchor, shape, flip, ok


class DaliLoader:
    """Iterates this rank's micro-batches of ``dataset`` in ``sampler``'s order (call
    ``sampler.set_epoch(epoch, start_batch)`` before each pass, as for a DataLoader).

    Args:
        dataset: the TrainSet (its transform draws the crops; its cache reader, if any,
            supplies the teacher rows, read in this process).
        sampler: the ResumableSampler of this rank.
        micro_batch: images per batch on this rank.
        device: the training device; CUDA devices get GPU outputs.
        decode: "gpu" (DALI mixed decoder, resize on the GPU), "cpu" (all on the CPU,
            the result copied to the device), or "auto" (gpu on CUDA devices).
        workers: DALI CPU threads (decoding); a quarter as many Python reader processes
            (file reads and header parsing are light).
        hw_decoder_load: share of images for the hardware JPEG decoder (A100/H100).
    """

    def __init__(self, dataset: TrainSet, sampler: ResumableSampler, micro_batch: int, *,
                 device: torch.device, decode: str = "auto", workers: int = 4,
                 hw_decoder_load: float = 0.65, prefetch: int = 2):  # fmt: skip
        require_dali()
        if decode not in DECODE_CHOICES:
            raise ValueError(f"decode must be one of {DECODE_CHOICES}, got {decode!r}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if decode == "auto":
            decode = "gpu" if device.type == "cuda" else "cpu"
        if decode == "gpu" and device.type != "cuda":
            raise ValueError(f"decode='gpu' needs a CUDA training device, got {device}")
        self.dataset, self.sampler, self.micro_batch = dataset, sampler, micro_batch
        self.device, self.decode = device, decode
        self.workers, self.hw_decoder_load, self.prefetch = (
            max(1, workers),
            hw_decoder_load,
            prefetch,
        )
        self.size = dataset.transform.size
        self.fallbacks = 0  # batches DALI failed on and OpenCV decoded
        self._pipe, self._next = None, None  # the pipeline and the (epoch, start) it expects

    def __len__(self) -> int:
        return len(self.sampler) // self.micro_batch

    def _build(self, epoch: int, start: int, skip: int = 0):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        self._close()
        ds = self.dataset
        source_ds = TrainSet.__new__(TrainSet)  # the source needs no cache reader
        source_ds.__dict__.update(ds.__dict__, cache=None)
        src = _Source(source_ds, self.sampler, self.micro_batch, epoch, start, skip)
        gpu = self.device.type == "cuda"
        S = self.size

        @pipeline_def(
            batch_size=self.micro_batch,
            num_threads=self.workers,
            device_id=self.device.index if gpu else None,
            py_num_workers=max(1, self.workers // 4),
            py_start_method="spawn",
            prefetch_queue_depth=self.prefetch,
        )
        def pipeline():
            enc, anchor, shape, flip, ok = fn.external_source(
                source=src, num_outputs=5, batch=True, parallel=True, batch_info=True,
                prefetch_queue_depth=self.prefetch,
            )  # fmt: skip
            extra = {}
            if self.decode == "gpu":
                # libjpeg-turbo's chroma upsampling, as OpenCV and DALI's CPU decoder use
                extra = dict(hw_decoder_load=self.hw_decoder_load, jpeg_fancy_upsampling=True)
            imgs = fn.decoders.image_slice(
                enc, anchor, shape, device="mixed" if self.decode == "gpu" else "cpu",
                output_type=types.RGB, axis_names="HW", **extra,
            )  # fmt: skip
            imgs = fn.resize(imgs, size=(S, S), interp_type=types.INTERP_LINEAR, antialias=False)
            imgs = fn.crop_mirror_normalize(
                imgs, mirror=flip, output_layout="CHW", dtype=types.UINT8
            )
            if gpu and self.decode == "cpu":
                imgs = imgs.gpu()
            return imgs, ok

        pipe = pipeline()
        pipe.build()
        self._pipe = pipe
        return pipe

    def _close(self) -> None:
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            del pipe

    def _images(self, tl) -> torch.Tensor:
        t = tl.as_tensor()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        return torch.from_numpy(np.array(t))

    def _opencv_batch(self, keys, epoch):
        items = [self.dataset.image(i, epoch) for i in keys]
        imgs = torch.stack([img for img, _ in items])
        if self.device.type == "cuda":
            imgs = imgs.to(self.device, non_blocking=True)
        return imgs, torch.tensor([bool(ok) for _, ok in items])

    def __iter__(self):
        s = self.sampler
        epoch, start = s.epoch, s.start_batch
        keys = [i for i, _ in s]
        mb = self.micro_batch
        n = len(keys) // mb
        if self._pipe is None or self._next != (epoch, start):
            self._build(epoch, start)
        self._next = None  # set again only when this pass runs to its end
        pipe = self._pipe
        labels_all = self.dataset.labels
        b = 0
        while b < n:
            chunk = keys[b * mb : (b + 1) * mb]
            try:
                imgs_tl, ok_tl = pipe.run()
                imgs = self._images(imgs_tl)
                ok = torch.from_numpy(np.array(ok_tl.as_tensor()).reshape(-1).astype(bool))
            except StopIteration:
                raise RuntimeError(
                    f"DALI pipeline ended after {b} of {n} batches (epoch {epoch})"
                ) from None
            except Exception as e:  # noqa: BLE001 - DALI reports decode errors as RuntimeError
                self.fallbacks += 1
                why = [ln for ln in str(e).splitlines() if "ailed" in ln or "rror in" in ln]
                files = [str(self.dataset.paths[i]) for i in chunk]
                warnings.warn(
                    f"DALI failed on micro-batch {b} of this pass (epoch {epoch}) ({'; '.join(why[-2:])}; "
                    f"files {files[0]} ... {files[-1]}); decoding it with OpenCV and "
                    "restarting the pipeline at the next batch",
                    RuntimeWarning,
                    stacklevel=2,
                )
                imgs, ok = self._opencv_batch(chunk, epoch)
                pipe = self._build(epoch, start, skip=b + 1) if b + 1 < n else None
            idx = torch.tensor(chunk, dtype=torch.int64)
            labels = torch.tensor([labels_all[i] for i in chunk], dtype=torch.int64)
            if self.dataset.cache is None:
                batch = Batch(imgs, labels, ok, idx)
            else:
                rows = self._cache_rows(chunk, self.dataset.view(epoch))
                batch = CachedBatch(imgs, labels, ok, idx, rows)
            b += 1
            yield batch
        if pipe is not None:  # consume the end of the epoch, so the next one can start
            try:
                pipe.run()
                raise RuntimeError(f"DALI pipeline gave more than {n} batches (epoch {epoch})")
            except StopIteration:
                pipe.reset()
            self._next = (epoch + 1, 0)

    def _cache_rows(self, chunk, view) -> TeacherRows:
        rows = [self.dataset.cache.read(i, view) for i in chunk]
        return TeacherRows(
            torch.tensor([r.filled for r in rows], dtype=torch.bool),
            torch.stack([r.probs for r in rows]),
            torch.stack([r.ids for r in rows]),
        )
