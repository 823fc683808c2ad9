"""`ssld dedup` end to end on real photos (scikit-image) and their transformed copies.

The photo set (ssld.photos): 10 reference photos, 8 transformed copies of each (crop, rescale,
rotation, JPEG q=20, colour jitter, mirror, blur, mirror+crop+rescale) and 20 unrelated
photos/textures. The pipeline must flag every copy with its original and nothing else.
"""

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")
pytest.importorskip("skimage")

from ssld.cli import main  # noqa: E402
from ssld.dedup import shortlist as sl  # noqa: E402
from ssld.dedup.extract import ExtractConfig  # noqa: E402
from ssld.dedup.pipeline import DedupConfig, run_dedup  # noqa: E402
from ssld.dedup.verify import VerifyConfig, geometric_inliers, one_to_one  # noqa: E402
from ssld.photos import make_photo_set, score  # noqa: E402

EXTRACT = ExtractConfig(max_side=480, max_keypoints=384, shard_size=25)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photoset")
    info = make_photo_set(root)
    (info["query"] / "unrelated" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    return info


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def vlad_run(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("vlad")
    cfg = DedupConfig(extract=EXTRACT, shortlist_k=2)
    summary = run_dedup(
        photos["query"], photos["reference"], out, cfg, workers=2, progress=False, log=None
    )
    return out, cfg, summary


def _copy_features(src, dst):
    shutil.copytree(src / "features", dst / "features")


def test_vlad_pipeline_finds_every_copy_and_nothing_else(photos, vlad_run):
    out, _, summary = vlad_run
    header, rows = _read_csv(out / "duplicates.csv")
    assert header == ["query", "reference", "matches", "inliers"]
    s = score([tuple(r[:2]) for r in rows], photos["truth"])
    assert s["precision"] == 1.0 and s["recall"] == 1.0, s
    assert all(int(r[3]) >= 12 and int(r[2]) >= int(r[3]) for r in rows)
    keep = (out / "keep.txt").read_text().split()
    assert sorted(keep) == sorted(n for n in photos["negatives"])  # broken.jpg is not kept
    assert (out / "failed.txt").read_text().split() == ["unrelated/broken.jpg"]
    assert summary["written"] and summary["failed"] == 1
    # the shortlist kept verification small: at most 2 reference images per query entry
    assert summary["candidate_image_pairs"] <= 2 * 2 * summary["query_images"]
    report = (out / "report.md").read_text()
    for text in ("| query images flagged | 80 |", "Extrapolation", "| verify |", "matches/00.png"):
        assert text in report
    pics = sorted((out / "matches").glob("*.png"))
    assert len(pics) == 8
    img = cv2.imread(str(pics[0]))
    assert img is not None and img.shape[1] > img.shape[0]  # side by side


def test_exhaustive_agrees_and_mirrors_matter(photos, vlad_run, tmp_path):
    src, _, _ = vlad_run
    _copy_features(src, tmp_path / "ex")
    cfg = DedupConfig(extract=EXTRACT, shortlist="exhaustive", pictures=0)
    run_dedup(photos["query"], photos["reference"], tmp_path / "ex", cfg, progress=False, log=None)
    assert (tmp_path / "ex" / "duplicates.csv").read_text() == (src / "duplicates.csv").read_text()
    # without the mirrored query entries the mirrored copies are missed (SIFT is not flip
    # invariant), the others are still found
    cfg = DedupConfig(extract=EXTRACT, shortlist="exhaustive", flip=False, pictures=0)
    run_dedup(photos["query"], photos["reference"], tmp_path / "nf", cfg, progress=False, log=None)
    found = {tuple(r[:2]) for r in _read_csv(tmp_path / "nf" / "duplicates.csv")[1]}
    mirrored = {t for t in photos["truth"] if "_flip" in t[0]}
    assert not found & mirrored
    assert found == set(photos["truth"]) - mirrored


def test_shards_resume_and_merge(photos, vlad_run, tmp_path):
    src, cfg, _ = vlad_run
    out = tmp_path / "sharded"
    _copy_features(src, out)
    first = run_dedup(
        photos["query"], photos["reference"], out, cfg, shard=(0, 3), progress=False, log=None
    )
    assert not first["written"] and not (out / "duplicates.csv").exists()
    assert first["verified_shards"] == 2  # query shards 0 and 3 of 4
    run_dedup(photos["query"], photos["reference"], out, cfg, shard=(2, 3), progress=False)
    last = run_dedup(
        photos["query"], photos["reference"], out, cfg, shard=(1, 3), progress=False, log=None
    )
    assert last["written"]
    assert (out / "duplicates.csv").read_text() == (src / "duplicates.csv").read_text()
    assert (out / "keep.txt").read_text() == (src / "keep.txt").read_text()
    # resume: nothing is redone; a lost shard result is recomputed identically
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "work").glob("verify-*.npz")}
    lost = out / "work" / "verify-00002.npz"
    before = dict(np.load(lost))
    lost.unlink()
    run_dedup(photos["query"], photos["reference"], out, cfg, progress=False, log=None)
    for p, t in mtimes.items():
        if p != lost:
            assert p.stat().st_mtime_ns == t
    after = dict(np.load(lost))
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # another configuration is refused, the report threshold may change
    with pytest.raises(ValueError, match="another configuration"):
        run_dedup(
            photos["query"],
            photos["reference"],
            out,
            DedupConfig(extract=EXTRACT, shortlist_k=3),
            progress=False,
            log=None,
        )
    strict = DedupConfig(extract=EXTRACT, shortlist_k=2, verify=VerifyConfig(min_inliers=10**6))
    s = run_dedup(photos["query"], photos["reference"], out, strict, progress=False, log=None)
    assert s["flagged_images"] == 0 and _read_csv(out / "duplicates.csv")[1] == []


def test_embedding_shortlist(photos, vlad_run, tmp_path):
    """User embeddings: rows in sorted path order. Here a planted embedding that points each
    copy at its original, so k=1 must still find everything (and only through it)."""
    from ssld.dedup.extract import list_images

    src, _, _ = vlad_run
    refs = list_images(photos["reference"])
    queries = list_images(photos["query"])
    truth = dict(photos["truth"])
    rng = np.random.default_rng(0)
    r_emb = np.eye(len(refs), 16, dtype=np.float32)
    q_emb = rng.normal(size=(len(queries), 16)).astype(np.float32)
    for i, q in enumerate(queries):
        if q in truth:
            q_emb[i] = r_emb[refs.index(truth[q])] + 0.01 * q_emb[i]
    np.save(tmp_path / "q.npy", q_emb)
    np.save(tmp_path / "r.npy", r_emb)
    out = tmp_path / "emb"
    _copy_features(src, out)
    cfg = DedupConfig(extract=EXTRACT, shortlist="embeddings", shortlist_k=1, pictures=0)
    emb = (tmp_path / "q.npy", tmp_path / "r.npy")
    s = run_dedup(
        photos["query"], photos["reference"], out, cfg, embeddings=emb, progress=False, log=None
    )
    assert s["candidate_image_pairs"] == len(queries) - 1  # one per readable query image
    found = [tuple(r[:2]) for r in _read_csv(out / "duplicates.csv")[1]]
    assert score(found, photos["truth"])["recall"] == 1.0
    np.save(tmp_path / "bad.npy", q_emb[:5])
    with pytest.raises(ValueError, match="one row per image"):
        run_dedup(
            photos["query"],
            photos["reference"],
            tmp_path / "emb2",
            cfg,
            embeddings=(tmp_path / "bad.npy", tmp_path / "r.npy"),
            progress=False,
            log=None,
        )


def test_cli_end_to_end_and_errors(photos, vlad_run, tmp_path, capsys):
    src, _, _ = vlad_run
    out = tmp_path / "cli"
    _copy_features(src, out)
    args = ["dedup", "--query", str(photos["query"]), "--reference", str(photos["reference"])]
    args += ["--out", str(out), "--max-side", "480", "--max-keypoints", "384"]
    args += ["--shard-size", "25", "--shortlist-k", "2", "--quiet", "--device", "cpu"]
    assert main(args) == 0
    assert "80 of 101 query images flagged" in capsys.readouterr().out
    assert (out / "duplicates.csv").read_text() == (src / "duplicates.csv").read_text()
    bad = [
        (["--shard", "3/3"], "--shard"),
        (["--ratio", "1.5"], "--ratio"),
        (["--min-inliers", "0"], "--min-inliers"),
        (["--query-embeddings", str(tmp_path / "nope.npy")], "--query-embeddings"),
        (["--geometry", "affine"], "--geometry"),
        (["--device", "tpu"], "--device"),
        (["--backend", "fast"], "--backend"),
    ]
    if not torch.cuda.is_available():
        bad.append((["--device", "cuda"], "no CUDA device"))
    for extra, needle in bad:
        with pytest.raises(SystemExit) as e:
            main(args + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err and "Traceback" not in err
    np.save(tmp_path / "q.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(SystemExit) as e:
        main(args + ["--query-embeddings", str(tmp_path / "q.npy")])
    assert e.value.code == 2 and "give both" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test written for Linux")
def test_torchrun_two_processes(photos, vlad_run, tmp_path):
    src, _, _ = vlad_run
    out = tmp_path / "ddp"
    _copy_features(src, out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--standalone", "-m", "ssld", "dedup"]
    cmd += ["--query", str(photos["query"]), "--reference", str(photos["reference"])]
    cmd += ["--out", str(out), "--max-side", "480", "--max-keypoints", "384"]
    cmd += ["--shard-size", "25", "--shortlist-k", "2", "--quiet", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "duplicates.csv").read_text() == (src / "duplicates.csv").read_text()
    timings = list((out / "work" / "timings").glob("shard*of2-*.json"))
    assert {p.name.split("-")[0] for p in timings} == {"shard0of2", "shard1of2"}


# ---- the pieces, against independent oracles ----


def test_one_to_one_keeps_the_closest_per_reference_descriptor():
    pairs = np.array([[0, 5], [1, 5], [2, 7], [3, 5], [4, 7]])
    d2 = np.array([9.0, 4.0, 1.0, 4.0, 1.0])
    # reference 5: query 1 and 3 tie at 4 -> the lower query index; reference 7: query 2
    assert one_to_one(pairs, d2).tolist() == [[1, 5], [2, 7]]
    assert one_to_one(np.zeros((0, 2), np.int64), np.zeros(0)).shape == (0, 2)


@pytest.mark.parametrize("geometry", ["similarity", "homography"])
def test_geometric_inliers_recovers_planted_transform(geometry):
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 400, (80, 2))
    angle, scale = np.deg2rad(20), 0.7
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rot.T + [30, -12] + rng.normal(0, 0.5, src.shape)
    outliers = rng.choice(80, 30, replace=False)
    dst[outliers] = rng.uniform(0, 400, (30, 2))
    mask = geometric_inliers(src, dst, VerifyConfig(geometry=geometry, reproj_px=4.0))
    truth = np.ones(80, bool)
    truth[outliers] = False
    assert (mask == truth).mean() > 0.97 and mask[truth].all()
    assert not geometric_inliers(src[:1], dst[:1], VerifyConfig()).any()


def test_vlad_properties():
    rng = np.random.default_rng(0)
    desc = rng.integers(0, 256, (3000, 128)).astype(np.uint8)
    cb = sl.learn_codebook(desc, 8, iters=5)
    assert torch.equal(cb.centroids, sl.learn_codebook(desc, 8, iters=5).centroids)  # seeded
    offsets = np.array([0, 100, 100, 300, 400])  # entry 1 is empty
    # entry 3 holds entry 0's descriptors in another order: same VLAD (order-free)
    desc[300:400] = desc[:100][::-1]
    v = sl.vlad(desc, offsets, cb)
    assert v.shape == (4, 8 * 128)
    torch.testing.assert_close(v.norm(dim=1), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(v[0], v[3], atol=1e-6, rtol=0)
    # oracle: numpy VLAD with brute-force assignment
    x = desc[:100].astype(np.float64)
    x = np.sqrt(x / x.sum(1, keepdims=True))
    c = cb.centroids.double().numpy()
    a = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    ref = np.zeros((8, 128))
    np.add.at(ref, a, x - c[a])
    ref = np.sign(ref) * np.sqrt(np.abs(ref))
    ref /= np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    ref = ref.reshape(-1) / np.linalg.norm(ref)
    np.testing.assert_allclose(v[0].numpy(), ref, atol=1e-5)
    # PCA: skipped with too few vectors, exact projection otherwise
    assert sl.fit_pca(cb, v, 16) is cb
    many = sl.normalize(torch.randn(200, 8 * 128, generator=torch.Generator().manual_seed(0)))
    pca = sl.fit_pca(cb, many, 16)
    p = sl.project(many, pca)
    assert p.shape == (200, 16)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(200))
    torch.testing.assert_close(sl.project(torch.zeros(2, 8 * 128), pca), torch.zeros(2, 16))
