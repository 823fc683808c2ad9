"""`ssld demo` smoke runs (a few steps): the documented outputs, their exact structure, and
values that can only come out of the real pipeline."""

import csv
import json
import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest

pytest.importorskip("cv2")
pytest.importorskip("sklearn")
pytest.importorskip("skimage")

from ssld.cli import main  # noqa: E402
from ssld.demo import ABLATIONS, RESULT_KEYS, DemoSettings  # noqa: E402

N_CLASSES = 10


def _n_test(out: Path) -> int:
    """The held-out test split the demo wrote (one image file per test example)."""
    return sum(1 for p in (out / "data" / "digits" / "val").rglob("*") if p.is_file())


def _assert_accuracy_on(top1: float, n: int, what: str) -> None:
    """A top-1 accuracy measured on n examples is 100 * (an integer count) / n: in float64,
    count * 100 / n * n / 100 is that count to a few ulps (n < 10^4: < 1e-9)."""
    count = top1 * n / 100
    assert 0 <= count <= n and abs(count - round(count)) < 1e-9, (what, top1, n)


def _chance_margin(n: int) -> float:
    """Accuracy (%) a chance-level classifier over N_CLASSES balanced classes exceeds on n
    test examples with probability < 3e-7: 1/N_CLASSES + 5 binomial standard deviations."""
    p = 1 / N_CLASSES
    return 100 * (p + 5 * math.sqrt(p * (1 - p) / n))


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    res = json.loads((out / "results.json").read_text())
    settings = DemoSettings.quick()
    # the exact structure of results.json
    keys = {"dedup_precision", "dedup_recall", "seeds", "per_seed", "settings", "seconds"}
    keys |= {"device", *RESULT_KEYS, *(k + "_std" for k in RESULT_KEYS)}
    assert set(res) == keys
    assert res["seeds"] == settings.seeds == len(res["per_seed"]) == 1
    assert res["settings"] == json.loads(json.dumps(asdict(settings)))
    assert res["device"] == "cpu" and res["seconds"] > 0
    (seed0,) = res["per_seed"]
    assert set(seed0) == {*RESULT_KEYS, "selected"}
    n = _n_test(out)
    assert n > 0 and f"test = {n} held out" in capsys.readouterr().out
    for key in RESULT_KEYS:  # one seed: the mean is that seed's, the spread 0
        assert res[key] == seed0[key] and res[key + "_std"] == 0.0, key
        _assert_accuracy_on(res[key], n, key)  # measured on the held-out split
    # the teacher learned: far above chance on the held-out split
    assert res["teacher_top1"] > _chance_margin(n)
    # the dedup stage is the real one: every planted copy is found, nothing else
    assert res["dedup_precision"] == 1.0 and res["dedup_recall"] == 1.0
    # the selection: the teacher's top-k per predicted class, counted in results.json
    with open(out / "select" / "seed0.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert seed0["selected"] == len(rows) > 0
    per_class = Counter(r["class"] for r in rows)
    assert set(per_class) <= {str(c) for c in range(N_CLASSES)}
    assert max(per_class.values()) <= settings.k
    # a softmax's largest probability over N_CLASSES classes is at least 1 / N_CLASSES
    assert all(1 / N_CLASSES - 1e-6 <= float(r["score"]) <= 1 for r in rows)
    report = (out / "report.md").read_text()
    assert "SSLD on T + U" in report and "duplicate_pair.png" in report
    assert (out / "duplicate_pair.png").exists()


def test_demo_ablation_quick(tmp_path):
    out = tmp_path / "ablation"
    assert main(["demo", "--out", str(out), "--quick", "--ablation"]) == 0
    res = json.loads((out / "ablation.json").read_text())
    assert set(res) == {*ABLATIONS, "seeds"} and res["seeds"] == 1
    n = _n_test(out)
    for name, spec in ABLATIONS.items():
        rows = res[name]["rows"]
        if name != "steps":
            assert [str(r["value"]) for r in rows] == [str(v) for v in spec["values"]]
        assert len(rows) == len(spec["values"])
        for r in rows:  # one seed: the mean is that seed's accuracy on the test split
            assert r["per_seed"] == [r["top1"]] and r["top1_std"] == 0.0, (name, r)
            _assert_accuracy_on(r["top1"], n, f"{name}={r['value']}")
        assert isinstance(res[name]["reproduced"], bool)
    md = (out / "ablation.md").read_text()
    assert "Paper's claim" in md and "weight_decay" in md
