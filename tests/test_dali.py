"""The optional DALI training loader (CPU decoding here) against the DataLoader path, and
the header parser it relies on against OpenCV's decoder.

Only the loader's tests need NVIDIA DALI (they skip without it); the header parser's need
OpenCV and scikit-image's photos, and so does a config naming the missing DALI."""

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")
skdata = pytest.importorskip("skimage.data")

from ssld.data.imagesize import image_size, jpeg_complete  # noqa: E402
from ssld.data.train import ResumableSampler, TrainSet, TrainTransform  # noqa: E402


def _photos():
    return [
        skdata.astronaut(),
        skdata.coffee(),
        skdata.chelsea(),
        skdata.rocket(),
        np.ascontiguousarray(skdata.astronaut()[:301, :419]),  # odd sizes (chroma rounding)
    ]


def _encode(rgb, ext, *params):
    ok, buf = cv2.imencode(ext, rgb[:, :, ::-1] if rgb.ndim == 3 else rgb, list(params))
    assert ok
    return buf.tobytes()


def _with_exif(jpeg: bytes, orientation: int, little: bool) -> bytes:
    """``jpeg`` with an APP1 EXIF segment holding only IFD0 Orientation."""
    e = "<" if little else ">"
    tiff = (b"II" if little else b"MM") + struct.pack(e + "HI", 42, 8)
    tiff += struct.pack(e + "H", 2)  # two entries: a dummy tag first, then Orientation
    tiff += struct.pack(e + "HHI", 0x010F, 2, 1) + b"A\0\0\0"  # Make = "A"
    tiff += struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff += struct.pack(e + "I", 0)
    body = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def _decoded_hw(data: bytes):
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if img is None else img.shape[:2]


@pytest.mark.parametrize("kind", ["jpeg", "jpeg_progressive", "jpeg_gray", "png", "png_gray"])
def test_image_size_matches_opencv(kind):
    for rgb in _photos():
        if kind.endswith("gray"):
            rgb = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if kind.startswith("jpeg"):
            extra = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if "progressive" in kind else []
            data = _encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 85, *extra)
        else:
            data = _encode(rgb, ".png")
        assert image_size(data) == _decoded_hw(data) == rgb.shape[:2]
        assert image_size(np.frombuffer(data, np.uint8)) == rgb.shape[:2]  # arrays too


@pytest.mark.parametrize("little", [True, False])
def test_image_size_applies_exif_orientation_like_opencv(little):
    rgb = np.ascontiguousarray(skdata.astronaut()[:200, :330])
    jpeg = _encode(rgb, ".jpg")
    for orientation in range(1, 9):
        data = _with_exif(jpeg, orientation, little)
        want = (330, 200) if orientation >= 5 else (200, 330)
        assert _decoded_hw(data) == want, orientation  # the premise: OpenCV rotates
        assert image_size(data) == want, orientation


def test_image_size_orientation_stored_as_long_and_in_png():
    rgb = np.ascontiguousarray(skdata.astronaut()[:200, :330])
    jpeg = _encode(rgb, ".jpg")
    tiff = b"II" + struct.pack("<HI", 42, 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHII", 0x0112, 4, 1, 6) + struct.pack("<I", 0)  # LONG, value 6
    body = b"Exif\0\0" + tiff
    data = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]
    assert _decoded_hw(data) == (330, 200) == image_size(data)
    png = _encode(rgb, ".png")
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    data = png[:33] + chunk + png[33:]  # after IHDR (8 + 25 bytes), before IDAT
    assert image_size(data) == (330, 200)
    if _decoded_hw(data) == (330, 200):  # OpenCV versions that apply PNG eXIf agree
        assert image_size(data) == _decoded_hw(data)


def test_jpeg_complete():
    jpeg = _encode(skdata.coffee(), ".jpg")
    assert jpeg_complete(jpeg) and jpeg_complete(jpeg + b"trailing bytes")
    assert not jpeg_complete(jpeg[:-2]) and not jpeg_complete(jpeg[: len(jpeg) // 2])
    assert not jpeg_complete(jpeg[: jpeg.find(b"\xff\xda")])


def _exif_app1(orientation: int, little: bool, long: bool) -> bytes:
    e = "<" if little else ">"
    tiff = (b"II" if little else b"MM") + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", 1)
    if long:
        tiff += struct.pack(e + "HHII", 0x0112, 4, 1, orientation)
    else:
        tiff += struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0)
    body = b"Exif\0\0" + tiff + struct.pack(e + "I", 0)
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    given = None

if given is not None:

    @settings(max_examples=60, deadline=None)
    @given(
        h=st.integers(1, 120), w=st.integers(1, 120), gray=st.booleans(),
        quality=st.integers(5, 100), progressive=st.booleans(),
        orientation=st.integers(0, 8), little=st.booleans(), long=st.booleans(),
        extra=st.lists(st.sampled_from([0xFE, 0xE2, 0xEE, 0xED]), max_size=3),
        fill=st.integers(0, 3), seed=st.integers(0, 2**16),
    )  # fmt: skip
    def test_image_size_property_against_opencv(
        h, w, gray, quality, progressive, orientation, little, long, extra, fill, seed
    ):
        """Random JPEGs with comment/APPn segments, fill bytes and EXIF orientation (0: no
        EXIF; SHORT or LONG, either byte order): the header size is OpenCV's decoded size."""
        rng = np.random.default_rng(seed)
        img = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
        params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
        jpeg = _encode(img, ".jpg", *params)
        head = b"".join(_segment(m, rng.bytes(int(rng.integers(0, 40)))) for m in extra)
        if orientation:
            head += _exif_app1(orientation, little, long)
        data = jpeg[:2] + b"\xff" * fill + head + jpeg[2:]
        assert image_size(data) == _decoded_hw(data)


def test_image_size_rejects_what_it_cannot_read():
    jpeg = _encode(skdata.coffee(), ".jpg")
    sof = jpeg.find(b"\xff\xc0")
    assert sof > 0
    twelve_bit = jpeg[: sof + 4] + b"\x0c" + jpeg[sof + 5 :]
    no_scan = jpeg[: sof + 19]  # frame header, then the file ends
    png = _encode(skdata.coffee(), ".png")
    for bad in (b"", b"\xff\xd8", b"hello world" * 10, twelve_bit, no_scan, jpeg[:100],
                png[:20], b"\xff\xd8\xff\xd9"):  # fmt: skip
        assert image_size(bad) is None, bad[:24]
    assert image_size(_encode(skdata.coffee(), ".bmp")) is None  # other formats: decode


# ---- the loader ----

from ssld.data.dali import DaliLoader  # noqa: E402 - importable without DALI

try:
    import nvidia.dali  # noqa: F401

    NO_DALI = None
except ImportError as e:  # the loader's tests skip, the rest of the module runs
    NO_DALI = f"NVIDIA DALI is not installed ({e})"
needs_dali = pytest.mark.skipif(NO_DALI is not None, reason=NO_DALI or "")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of photos (JPEG, PNG, an EXIF-rotated JPEG, sizes below the crop) plus
    a JPEG cut inside its scan (OpenCV decodes part of it: the DALI source hands that over
    as PNG) and bad files: text named .jpg, an empty file, a JPEG cut after its frame
    header, a header claiming 60000 x 60000 pixels and a scan naming a missing component
    (DALI's decoder fails on it: the batch falls back to OpenCV) (black, ok = False)."""
    root = tmp_path_factory.mktemp("dali_set")
    photos = _photos() + [skdata.camera(), np.ascontiguousarray(skdata.chelsea()[:40, :50])]
    files = []
    for i, rgb in enumerate(photos):
        for j, (ext, transform) in enumerate(
            [(".png", None), (".jpg", None), (".jpg", "exif"), (".png", "small")]
        ):
            img = rgb if transform != "small" else cv2.resize(rgb, (61, 47))
            data = _encode(img, ext) if ext == ".png" else _encode(img, ext, 1, 92)
            if transform == "exif":
                data = _with_exif(data, 6 if i % 2 else 8, little=bool(j % 2))
            files.append((f"c{i % 2}/img{i}_{j}{ext}", data))
    jpeg = _encode(skdata.coffee(), ".jpg")
    files.append(("c0/text.jpg", b"not an image at all\n" * 5))
    files.append(("c1/header_only.jpg", jpeg[: jpeg.find(b"\xff\xc0") + 19]))
    sos = jpeg.find(b"\xff\xda")
    files.append(("c0/cut_in_scan.jpg", jpeg[: sos + 14]))  # OpenCV decodes part of it
    bad_scan = jpeg[: sos + 5] + b"\x09" + jpeg[sos + 6 :]  # scan names a missing component
    files.append(("c1/bad_scan.jpg", bad_scan))
    sof = jpeg.find(b"\xff\xc0")
    huge = jpeg[: sof + 5] + (60000).to_bytes(2, "big") * 2 + jpeg[sof + 9 :]
    files.append(("c1/huge.jpg", huge))  # OpenCV raises on > 2^30 pixels
    files.append(("c0/empty.png", b""))
    paths = []
    for rel, data in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        paths.append(rel)
    labels = [int(p[1]) for p in paths]
    return root, paths, labels


BAD = ("c0/text.jpg", "c1/header_only.jpg", "c0/empty.png", "c1/huge.jpg", "c1/bad_scan.jpg")
# a complete header that DALI's decoder refuses (OpenCV too): the batch falls back to OpenCV
REFUSED = "c1/bad_scan.jpg"


def _dataset(folder, size=48, drop=()):
    root, paths, labels = folder
    keep = [i for i, p in enumerate(paths) if p not in drop]
    paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    return TrainSet([(root, paths, labels)], TrainTransform(size, 0.3, True, seed=3), replay=0)


def _torch_batches(ds, sampler, mb):
    loader = torch.utils.data.DataLoader(ds, batch_size=mb, sampler=sampler, drop_last=True)
    return [tuple(b[:4]) for b in loader]


def _compare(dali_batches, ref_batches, ds):
    assert len(dali_batches) == len(ref_batches)
    jpeg_err = []
    for (img, lab, ok, idx), (rimg, rlab, rok, ridx) in zip(dali_batches, ref_batches):
        assert torch.equal(idx, ridx) and torch.equal(lab, rlab) and torch.equal(ok, rok)
        assert img.dtype == torch.uint8 and img.shape == rimg.shape
        for k in range(len(idx)):
            d = (img[k].int() - rimg[k].int()).abs()
            if ds.paths[int(idx[k])].endswith(".png"):
                assert int(d.max()) <= 1, ds.paths[int(idx[k])]  # resize rounding only
            else:
                jpeg_err.append(float(d.float().mean()))
            if not ok[k]:
                assert int(img[k].max()) == 0
    # JPEG: different IDCT / chroma upsampling (libjpeg-turbo vs nvImageCodec): small
    assert max(jpeg_err) < 3.0, jpeg_err


@needs_dali
def test_dali_loader_matches_the_dataloader(folder):
    """Both ranks of a 2-process run, two epochs: same keys, labels and ok flags as the
    DataLoader, pixels within rounding, bad files black with ok = False."""
    ds = _dataset(folder)
    mb = 4
    seen_bad, fallbacks = set(), 0
    for rank in (0, 1):
        sampler = ResumableSampler(len(ds), mb * 2, world=2, rank=rank, seed=5)
        loader = DaliLoader(ds, sampler, mb, device=torch.device("cpu"), decode="cpu", workers=2)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                got = list(loader)
            assert len(got) == len(loader)
            sampler.set_epoch(epoch)
            _compare(got, _torch_batches(ds, sampler, mb), ds)
            for _, _, ok, idx in got:
                for good, i in zip(ok.tolist(), idx.tolist()):
                    assert good == (ds.paths[i] not in BAD), ds.paths[i]
                    if not good:
                        seen_bad.add(ds.paths[i])
            cut = ds.paths.index(REFUSED)
            if any(cut in i.tolist() for _, _, _, i in got):
                assert any("decoding it with OpenCV" in str(x.message) for x in w)
        fallbacks += loader.fallbacks
    assert seen_bad == set(BAD) and fallbacks >= 1


@needs_dali
def test_dali_loader_resumes_mid_epoch_and_reuses_its_pipeline(folder):
    ds = _dataset(folder, drop=(REFUSED,))  # no fallbacks: they restart the pipeline
    mb = 3
    sampler = ResumableSampler(len(ds), mb, seed=1)
    loader = DaliLoader(ds, sampler, mb, device=torch.device("cpu"), decode="cpu", workers=1)
    sampler.set_epoch(4)
    full = list(loader)
    sampler.set_epoch(4, start_batch=5)  # resume: a new pipeline starting at batch 5
    tail = list(loader)
    assert len(tail) == len(full) - 5
    for a, b in zip(full[5:], tail):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    pipe = loader._pipe
    sampler.set_epoch(5)  # the next epoch continues the same pipeline
    nxt = list(loader)
    sampler.set_epoch(5)
    _compare(nxt, _torch_batches(ds, sampler, mb), ds)
    assert loader._pipe is pipe and loader.fallbacks == 0
    # a pass cut short is not continued: the next pass starts where it is told to
    sampler.set_epoch(6)
    it = iter(loader)
    first = next(it)
    del it
    sampler.set_epoch(6)
    again = next(iter(loader))
    assert all(torch.equal(x, y) for x, y in zip(first, again))


@needs_dali
def test_fallback_restarts_at_the_next_micro_batch(folder):
    """Micro-batches smaller than the global batch (gradient accumulation): a batch DALI
    refuses is decoded by OpenCV and the pipeline resumes at the next micro-batch."""
    ds = _dataset(folder)
    refused = ds.paths.index(REFUSED)
    for seed in range(20):  # a seed putting the refused file early in the epoch
        sampler = ResumableSampler(len(ds), 8, seed=seed)
        sampler.set_epoch(0)
        if [i for i, _ in sampler][:12].count(refused):
            break
    loader = DaliLoader(ds, sampler, 4, device=torch.device("cpu"), decode="cpu", workers=1)
    sampler.set_epoch(0)
    with pytest.warns(RuntimeWarning, match="micro-batch"):
        got = list(loader)
    sampler.set_epoch(0)
    _compare(got, _torch_batches(ds, sampler, 4), ds)
    assert loader.fallbacks == 1 and len(got) == len(loader) == (len(ds) // 8) * 2


@needs_dali
@pytest.mark.cuda
@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_dali_loader_on_the_gpu_matches_the_dataloader(folder, decode):
    """GPU outputs (nvJPEG ROI decode + GPU resize, or CPU decode copied by DALI): the same
    keys and flags as the DataLoader, pixels within decoder rounding."""
    ds = _dataset(folder)
    mb = 4
    sampler = ResumableSampler(len(ds), mb, seed=2)
    loader = DaliLoader(ds, sampler, mb, device=torch.device("cuda"), decode=decode, workers=2)
    sampler.set_epoch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback batch
        got = list(loader)
    assert all(b[0].is_cuda for b in got)
    got = [(b[0].cpu(), *b[1:4]) for b in got]
    sampler.set_epoch(0)
    _compare(got, _torch_batches(ds, sampler, mb), ds)


@needs_dali
def test_dali_loader_argument_errors(folder):
    ds = _dataset(folder)
    s = ResumableSampler(len(ds), 4)
    with pytest.raises(ValueError, match="decode must be one of"):
        DaliLoader(ds, s, 4, device=torch.device("cpu"), decode="fast")
    with pytest.raises(ValueError, match="needs a CUDA training device"):
        DaliLoader(ds, s, 4, device=torch.device("cpu"), decode="gpu")


def test_missing_dali_is_a_config_error(tmp_path, monkeypatch):
    import sys

    from ssld.config import ConfigError, load_config

    (tmp_path / "t" / "a").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import fails as if absent
    with pytest.raises(ConfigError, match="pip install nvidia-dali"):
        load_config(None, [f"data.train={tmp_path / 't'}", "data.loader=dali"])
    with pytest.raises(ConfigError, match="data.loader must be one of"):
        load_config(None, [f"data.train={tmp_path / 't'}", "data.loader=ffcv"])
