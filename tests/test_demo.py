"""`ssld demo` smoke runs (a few steps): the documented outputs exist with sane values."""

import json

import pytest

pytest.importorskip("cv2")
pytest.importorskip("sklearn")
pytest.importorskip("skimage")

from ssld.cli import main  # noqa: E402
from ssld.demo import ABLATIONS, RESULT_KEYS  # noqa: E402


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    res = json.loads((out / "results.json").read_text())
    for key in RESULT_KEYS:
        assert 0.0 <= res[key] <= 100.0, key
        assert res[key + "_std"] >= 0.0
    # the dedup stage is the real one: every planted copy is found, nothing else
    assert res["dedup_precision"] == 1.0 and res["dedup_recall"] == 1.0
    assert res["per_seed"][0]["selected"] > 0
    report = (out / "report.md").read_text()
    assert "SSLD on T + U" in report and "duplicate_pair.png" in report
    assert (out / "duplicate_pair.png").exists()
    assert "student, labels on T" in capsys.readouterr().out


def test_demo_ablation_quick(tmp_path):
    out = tmp_path / "ablation"
    assert main(["demo", "--out", str(out), "--quick", "--ablation"]) == 0
    res = json.loads((out / "ablation.json").read_text())
    for name, spec in ABLATIONS.items():
        rows = res[name]["rows"]
        if name != "steps":
            assert [str(r["value"]) for r in rows] == [str(v) for v in spec["values"]]
        assert len(rows) == len(spec["values"])
        assert all(0.0 <= r["top1"] <= 100.0 for r in rows)
        assert isinstance(res[name]["reproduced"], bool)
    md = (out / "ablation.md").read_text()
    assert "Paper's claim" in md and "weight_decay" in md
