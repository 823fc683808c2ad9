"""`ssld select` against brute-force sorting, on real photos and a small in-repo teacher."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("cv2")
pytest.importorskip("skimage")

from ssld.cli import main  # noqa: E402
from ssld.data import EvalTransform, ImageList, Normalize  # noqa: E402
from ssld.models import tiny_resnet  # noqa: E402
from ssld.photos import make_photo_set  # noqa: E402
from ssld.select import (  # noqa: E402
    EMPTY_ID,
    ClassTopK,
    SelectConfig,
    apply_exclusions,
    gallery_paths,
    run_select,
)

K = 4
BATCH = 8
TRANSFORM = EvalTransform(input_size=48)


def _teacher():
    """Random tiny ResNet with a sharpened head: its argmax spreads over several classes."""
    model = tiny_resnet(10, seed=1)
    with torch.no_grad():
        model.head.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    info = make_photo_set(root, unrelated_transforms=("orig",))
    g = info["query"]
    # an exact copy under a later name: equal scores, the smaller path must win ties
    shutil.copy(g / "copies" / "coffee_blur.png", g / "copies" / "coffee_blur_dup.png")
    (g / "unrelated" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    return g


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.jit.save(torch.jit.script(_teacher()), str(path))
    return path


def _brute_force(paths, root, k, batch=BATCH):
    """Every image classified in the same batches, then a plain Python sort per class."""
    model, norm = _teacher(), Normalize()
    ds = ImageList(paths, root, TRANSFORM)
    rows = []
    with torch.inference_mode():
        for b in range(0, len(ds), batch):
            items = [ds[i] for i in range(b, min(len(ds), b + batch))]
            x = torch.stack([it[0] for it in items])
            probs = model(norm(x)).float().softmax(1)
            score, cls = probs.max(1)
            for (_, idx, ok), s, c in zip(items, score.tolist(), cls.tolist()):
                if ok:
                    rows.append((paths[idx], c, np.float32(s)))
    best = []
    for c in sorted({r[1] for r in rows}):
        mine = sorted((r for r in rows if r[1] == c), key=lambda r: (-r[2], r[0]))
        best += mine[:k]
    return best


def _read(path):
    with open(path, newline="") as f:
        return [(r["path"], int(r["class"]), np.float32(r["score"])) for r in csv.DictReader(f)]


def _cfg(**kw):
    return SelectConfig(k=K, batch_size=BATCH, transform=TRANSFORM, **kw)


def test_class_topk_streaming_equals_sort():
    gen = torch.Generator().manual_seed(0)
    n, c, k = 5000, 7, 13
    cls = torch.randint(0, c, (n,), generator=gen)
    score = torch.randint(0, 50, (n,), generator=gen).float() / 50  # many exact ties
    ids = torch.randperm(n, generator=gen)
    ids[::97] = EMPTY_ID  # unreadable images: ignored
    tv = torch.rand(n, 3, generator=gen).half()
    tc = torch.randint(0, c, (n, 3), generator=gen).int()
    table = ClassTopK(c, k, "cpu", topm=3, buffer=100)  # many merges
    for a in range(0, n, 37):
        table.add(
            cls[a : a + 37], score[a : a + 37], ids[a : a + 37], tv[a : a + 37], tc[a : a + 37]
        )
    st = table.state()
    for cc in range(c):
        want = sorted(
            (-score[i].item(), ids[i].item(), i)
            for i in range(n)
            if cls[i] == cc and ids[i] != EMPTY_ID
        )[:k]
        assert st["ids"][cc].tolist() == [w[1] for w in want]
        assert st["scores"][cc].tolist() == [-w[0] for w in want]
        assert np.array_equal(st["top_val"][cc], tv[[w[2] for w in want]].numpy())
    # a class with fewer than k candidates keeps all of them, the rest is empty
    small = ClassTopK(3, 5, "cpu")
    small.add(torch.tensor([1, 1]), torch.tensor([0.5, 0.7]), torch.tensor([4, 2]))
    st = small.state()
    assert st["ids"][1].tolist()[:2] == [2, 4] and (st["ids"][0] == EMPTY_ID).all()


def test_select_equals_brute_force(gallery, tmp_path):
    paths, root = gallery_paths(gallery)
    out = tmp_path / "sel.csv"
    s = run_select(_teacher(), paths, root, out, _cfg(topm=3), progress=False, log=None)
    got = _read(out)
    want = _brute_force(paths, root, K)
    assert got == want
    assert len({c for _, c, _ in got}) >= 4 and s["failed"] == 1
    # the planted exact tie is ordered by path
    names = [p for p, _, _ in got]
    if "copies/coffee_blur_dup.png" in names:
        assert "copies/coffee_blur.png" in names
        assert names.index("copies/coffee_blur.png") < names.index("copies/coffee_blur_dup.png")
    assert (tmp_path / "sel.csv.failed.txt").read_text() == "unrelated/zz_broken.png\n"
    classes = list(csv.DictReader(open(tmp_path / "sel.csv.classes.csv")))
    assert sum(int(r["count"]) for r in classes) == len(got)
    top = np.load(tmp_path / "sel.csv.topm.npz")
    assert top["prob"].shape == (len(got), 3)
    assert np.array_equal(top["cls"][:, 0], [c for _, c, _ in got])
    np.testing.assert_allclose(top["prob"][:, 0], [x for _, _, x in got], rtol=1e-3)
    assert (tmp_path / "sel.csv.hist.png").exists() or s["histogram"] is None


def test_exclusions(gallery, tmp_path):
    paths, root = gallery_paths(gallery)
    dup = tmp_path / "dedup" / "duplicates.csv"
    dup.parent.mkdir()
    flagged = [p for p in paths if p.startswith("copies/astronaut") or "coffee" in p]
    with open(dup, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "reference", "matches", "inliers"])
        w.writerows((p, "x.png", 30, 20) for p in flagged)
    keep = dup.parent / "keep.txt"
    keep.write_text("".join(f"{p}\n" for p in paths if p not in flagged))
    a, dropped = apply_exclusions(paths, [dup])
    b, _ = apply_exclusions(paths, [keep])
    assert a == b and dropped == len(flagged) and not set(a) & set(flagged)
    plain = tmp_path / "drop.txt"
    plain.write_text("# comment\nunrelated/moon_orig.png\n")
    c, dropped = apply_exclusions(paths, [plain])
    assert dropped == 1 and "unrelated/moon_orig.png" not in c
    out = tmp_path / "sel.csv"
    run_select(_teacher(), a, root, out, _cfg(), progress=False, log=None)
    assert not {p for p, _, _ in _read(out)} & set(flagged)
    assert _read(out) == _brute_force(a, root, K)


def test_sharded_and_merged_equals_single(gallery, tmp_path):
    paths, root = gallery_paths(gallery)
    single = tmp_path / "single.csv"
    run_select(_teacher(), paths, root, single, _cfg(), progress=False, log=None)
    out = tmp_path / "sharded.csv"
    for i in (2, 0, 1):
        s = run_select(_teacher(), paths, root, out, _cfg(), shard=(i, 3), progress=False, log=None)
        assert s["written"] == (i == 1)
    assert out.read_text() == single.read_text()
    out.unlink()
    args = ["select", "--gallery", str(gallery), "--k", str(K), "--out", str(out), "--merge"]
    assert main(args) == 0
    assert out.read_text() == single.read_text()


def test_resume_after_stop_is_identical(gallery, tmp_path):
    paths, root = gallery_paths(gallery)
    ref = tmp_path / "ref.csv"
    run_select(_teacher(), paths, root, ref, _cfg(), progress=False, log=None)
    out = tmp_path / "stopped.csv"
    s = run_select(_teacher(), paths, root, out, _cfg(), max_batches=3, progress=False, log=None)
    assert not s["finished"] and not out.exists()
    s = run_select(_teacher(), paths, root, out, _cfg(), max_batches=5, progress=False, log=None)
    assert not s["finished"]
    run_select(_teacher(), paths, root, out, _cfg(), progress=False, log=None)
    assert out.read_text() == ref.read_text()
    with pytest.raises(ValueError, match=r"another setting \(topm: saved 0, now 2\); remove it"):
        run_select(_teacher(), paths, root, out, _cfg(topm=2), progress=False, log=None)


def _cli(gallery, teacher_file, out, *extra):
    args = ["select", "--teacher", str(teacher_file), "--gallery", str(gallery), "--k", str(K)]
    args += ["--out", str(out), "--batch-size", str(BATCH), "--input-size", "48", "--quiet"]
    args += ["--device", "cpu", "--workers", "0", *extra]
    return args


def test_kill_and_resume_gives_identical_file(gallery, teacher_file, tmp_path):
    ref = tmp_path / "ref.csv"
    assert main(_cli(gallery, teacher_file, ref)) == 0
    out = tmp_path / "killed.csv"
    cmd = [sys.executable, "-m", "ssld", *_cli(gallery, teacher_file, out)]
    cmd += ["--checkpoint-seconds", "0.001"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = tmp_path / "killed.csv.part-0-of-1.npz"
    deadline = time.time() + 120
    while not part.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert part.exists(), "no checkpoint was written before the kill"
    if not bool(np.load(part)["done"]):  # killed mid-run (the usual case)
        assert not out.exists()
    assert main(_cli(gallery, teacher_file, out)) == 0
    assert out.read_text() == ref.read_text()


def test_exported_program_teacher(gallery, tmp_path):
    """A torch.export program (.pt2) gives the same selection as the module it came from."""
    x = torch.zeros(2, 3, 48, 48)
    ep = torch.export.export(_teacher(), (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(ep, str(tmp_path / "teacher.pt2"))
    ref = tmp_path / "ref.csv"
    paths, root = gallery_paths(gallery)
    run_select(_teacher(), paths, root, ref, _cfg(), progress=False, log=None)
    out = tmp_path / "pt2.csv"
    assert main(_cli(gallery, tmp_path / "teacher.pt2", out)) == 0
    assert out.read_text() == ref.read_text()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test written for Linux")
def test_torchrun_two_processes(gallery, teacher_file, tmp_path):
    ref = tmp_path / "ref.csv"
    assert main(_cli(gallery, teacher_file, ref)) == 0
    out = tmp_path / "ddp.csv"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--standalone", "-m", "ssld"]
    cmd += _cli(gallery, teacher_file, out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.read_text() == ref.read_text()
    assert (tmp_path / "ddp.csv.part-1-of-2.npz").exists()


def test_bad_input(gallery, teacher_file, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_nc = tmp_path / "bad_teacher.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 4, 3)), str(not_nc))
    cases = [
        (_cli(gallery, teacher_file, tmp_path / "a.csv", "--k", "0"), "--k"),
        (_cli(empty, teacher_file, tmp_path / "b.csv"), "no images"),
        (_cli(gallery, tmp_path / "missing.pt", tmp_path / "c.csv"), "--teacher"),
        (_cli(gallery, "resnet50", tmp_path / "d.csv"), "--teacher"),
        (_cli(gallery, "ssld.models:nope", tmp_path / "e.csv"), "no callable"),
        (_cli(gallery, not_nc, tmp_path / "f.csv"), "(N, classes)"),
        (
            _cli(gallery, "ssld.models:tiny_resnet", tmp_path / "g.csv", "--teacher-weights")
            + [str(teacher_file)],
            "weights",
        ),
        (_cli(gallery, teacher_file, tmp_path / "h.csv", "--mean", "1,2"), "--mean"),
        (_cli(gallery, teacher_file, tmp_path / "i.csv", "--shard", "2/2"), "--shard"),
    ]
    for args, needle in cases:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err and "Traceback" not in err, (needle, err)
