"""SIFT extraction shards: real photos from scikit-image, corrupt files, resume, flips."""

import json

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
skdata = pytest.importorskip("skimage.data")

from ssld.dedup.extract import ExtractConfig, describe, extract, list_images, load_features  # noqa: E402

PHOTOS = ["astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "brick"]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i, name in enumerate(PHOTOS):
        img = getattr(skdata, name)()
        if img.ndim == 3:
            img = cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2BGR)
        target = root / ("sub" if i % 2 else ".") / f"{name}.png"
        cv2.imwrite(str(target), img)
    (root / "broken.jpg").write_bytes(b"not an image at all")
    (root / "notes.txt").write_text("ignored")
    return root


def test_list_images(photo_dir):
    names = list_images(photo_dir)
    assert "broken.jpg" in names and "notes.txt" not in names
    assert names == sorted(names) and any(n.startswith("sub/") for n in names)
    with pytest.raises(FileNotFoundError, match="not found"):
        list_images(photo_dir / "missing")


def test_describe_limits_and_scale():
    img = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)  # 512 x 512
    cfg = ExtractConfig(max_side=256, max_keypoints=100)
    kpts, desc = describe(img, cfg)
    assert desc.dtype == np.uint8 and desc.shape == (100, 128) and kpts.shape == (100, 4)
    assert kpts[:, :2].max() <= 512 and kpts[:, :2].max() > 256  # coordinates in original pixels
    kpts2, desc2 = describe(img, cfg)
    assert np.array_equal(desc, desc2) and np.array_equal(kpts, kpts2)  # deterministic
    _, root = describe(img, ExtractConfig(max_side=256, max_keypoints=100, root_sift=True))
    assert root.dtype == np.uint8 and root.max() > 0


def test_extract_resume_and_flip(photo_dir, tmp_path):
    cfg = ExtractConfig(max_side=320, max_keypoints=64, flip=True, shard_size=3)
    out = tmp_path / "feat"
    summary = extract(photo_dir, out, cfg, progress=False)
    n = len(list_images(photo_dir))
    assert summary == {
        "images": n,
        "shards": 3,
        "written": 3,
        "extracted": n,
        "failed": ["broken.jpg"],
        "missing": [],
    }
    assert (out / "failed.txt").read_text().split() == ["broken.jpg"]
    feats = load_features(out)
    assert len(feats["offsets"]) == len(feats["image"]) + 1 == 2 * (n - 1) + 1
    assert feats["offsets"][-1] == len(feats["desc"]) == len(feats["kpts"])
    assert feats["flipped"].sum() == n - 1
    per_entry = np.diff(feats["offsets"])
    assert per_entry.max() <= 64 and per_entry.min() > 0
    assert np.array_equal(feats["size"][feats["image"] == 0][0], [512, 512])  # astronaut
    # the mirrored copy is a different set of descriptors of the same image
    first = np.flatnonzero(feats["image"] == feats["image"][0])
    a, b = (feats["desc"][feats["offsets"][e] : feats["offsets"][e + 1]] for e in first)
    assert not np.array_equal(a, b)
    # resume after losing a shard: only that shard is redone, identical content
    before = {k: v.copy() for k, v in feats.items() if k != "images"}
    (out / "shard-00001.npz").unlink()
    again = extract(photo_dir, out, cfg, progress=False)
    assert again["written"] == 1
    after = load_features(out)
    for k, v in before.items():
        assert np.array_equal(v, after[k]), k
    # nothing to do on a finished run; another configuration is refused
    assert extract(photo_dir, out, cfg, progress=False)["written"] == 0
    with pytest.raises(ValueError, match="another configuration"):
        extract(photo_dir, out, ExtractConfig(max_side=100), progress=False)
    assert json.loads((out / "manifest.json").read_text())["images"] == n


def test_workers_match_serial(photo_dir, tmp_path):
    cfg = ExtractConfig(max_side=200, max_keypoints=32, shard_size=4)
    extract(photo_dir, tmp_path / "a", cfg, progress=False)
    extract(photo_dir, tmp_path / "b", cfg, workers=2, progress=False)
    a, b = load_features(tmp_path / "a"), load_features(tmp_path / "b")
    for k in ("desc", "kpts", "offsets", "image", "flipped"):
        assert np.array_equal(a[k], b[k]), k


def test_bad_config():
    with pytest.raises(ValueError, match="max_keypoints"):
        ExtractConfig(max_keypoints=0)


def test_append_new_images(photo_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(photo_dir, src)
    cfg = ExtractConfig(max_side=160, max_keypoints=16, shard_size=3)
    out = tmp_path / "feat"
    first = extract(src, out, cfg, progress=False)
    n = first["images"]  # 8 images: shards of 3, 3, 2
    old = load_features(out)
    shutil.copy(src / "astronaut.png", src / "aaa_new.png")  # sorts first, but is appended
    (src / "coffee.png").unlink()
    again = extract(src, out, cfg, progress=False)
    assert again["images"] == n + 1 and again["written"] == 1  # the partial last shard redone
    assert again["missing"] == ["coffee.png"]
    new = load_features(out)
    assert new["images"] == old["images"] + ["aaa_new.png"]
    cam = new["images"].index("astronaut.png")
    rows = (
        lambda f, i: f["desc"][  # noqa: E731
            f["offsets"][np.flatnonzero(f["image"] == i)[0]] : f["offsets"][
                np.flatnonzero(f["image"] == i)[0] + 1
            ]
        ]
    )
    assert np.array_equal(rows(new, n), rows(new, cam))  # the copy has the same features
    assert np.array_equal(rows(new, 0), rows(old, 0))


def test_shard_subset(photo_dir, tmp_path):
    cfg = ExtractConfig(max_side=160, max_keypoints=16, shard_size=3)
    out = tmp_path / "feat"
    part = extract(photo_dir, out, cfg, progress=False, shards=lambda s: s % 2 == 1)
    assert part["written"] == 1
    assert load_features(out, shards=[1])["image"].min() == 3
    with pytest.raises(FileNotFoundError, match="did not finish"):
        load_features(out)
    assert extract(photo_dir, out, cfg, progress=False, start=1)["written"] == 2
    assert len(load_features(out)["images"]) == 8
