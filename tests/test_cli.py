"""The ``ssld`` command line: ``ssld eval`` on its own, and failures as one line with the
documented exit codes (2: bad arguments, 1: failures while running, 130: interrupted), or the
traceback with ``--debug``."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")

from ssld import cli  # noqa: E402
from ssld.cli import main  # noqa: E402
from ssld.models import tiny_resnet  # noqa: E402
from ssld.train.checkpoint import CheckpointError  # noqa: E402

CLASSES = 3
WIDTHS = (4, 8)

# a recipe whose training parts cannot work here: a timm teacher without weights, missing
# training data, AutoAugment, the DALI loader; evaluation must not look at any of them
RECIPE = textwrap.dedent(
    f"""\
    student:
      name: ssld.models:tiny_resnet
      num_classes: {CLASSES}
      kwargs: {{widths: {list(WIDTHS)}}}
    teacher:
      name: resnext101_32x16d
      weights: null
    data:
      train: /nonexistent/train
      unlabeled: /nonexistent/u.csv
      input_size: 16
      autoaugment: true
      loader: dali
      workers: 2
    run:
      device: cpu
    """
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """val/<class>/*.png (3 classes x 4 random images), recipe.yaml, a student checkpoint
    (state dict) and a training-style checkpoint of it, a truncated copy, a misfit one."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / "val" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            cv2.imwrite(str(root / "val" / f"c{c}" / f"{i}.png"), img)
    (root / "recipe.yaml").write_text(RECIPE)  # and a 5-class student, five.pt
    state = tiny_resnet(CLASSES, widths=WIDTHS).state_dict()
    torch.save(state, root / "student.pt")
    torch.save({"model": state, "ema": None, "step": 3}, root / "last.pt")
    blob = (root / "student.pt").read_bytes()
    (root / "corrupt.pt").write_bytes(blob[: len(blob) // 2])
    torch.save(tiny_resnet(CLASSES, widths=(4, 4)).state_dict(), root / "misfit.pt")
    torch.save(tiny_resnet(5, widths=WIDTHS).state_dict(), root / "five.pt")
    return root


def _eval_args(files, checkpoint="student.pt", *extra):
    return [
        "eval",
        "--config",
        str(files / "recipe.yaml"),
        "--checkpoint",
        str(files / checkpoint),
        "--val",
        str(files / "val"),
        *extra,
    ]


def test_eval_needs_only_the_student_and_the_images(files, tmp_path):
    """No teacher, no training data, no kornia or timm (made unimportable), no DALI, and
    nothing left in TMPDIR (worker processes included)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "res" / "eval.json"
    argv = _eval_args(files, "student.pt", "--out", str(out))
    code = (
        "import sys\n"
        "sys.modules['kornia'] = sys.modules['timm'] = sys.modules['nvidia.dali'] = None\n"
        "from ssld.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["images"] == 4 * CLASSES and 0 <= got["top1"] <= got["top5"] <= 100
    assert "top-1" in res.stdout
    assert json.loads(out.read_text()) == got
    assert list(tmp.iterdir()) == []


def test_eval_results(files, capsys):
    """A training checkpoint and its state dict give the same numbers; the validation folder
    comes from the run's config.json when neither --val nor data.val is given."""
    assert main(_eval_args(files, "student.pt", "--workers", "0")) == 0
    a = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(_eval_args(files, "last.pt", "--workers", "0")) == 0
    b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (a["top1"], a["top5"], a["images"]) == (b["top1"], b["top5"], b["images"])
    run = files / "run"
    run.mkdir(exist_ok=True)
    (run / "student.pt").write_bytes((files / "student.pt").read_bytes())
    (run / "config.json").write_text(json.dumps({"data": {"val": str(files / "val")}}))
    args = ["eval", "--config", str(files / "recipe.yaml"), "--checkpoint", str(run / "student.pt")]
    assert main(args + ["data.workers=0"]) == 0
    c = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert c["top1"] == a["top1"] and c["val"] == str(files / "val")


def _exit(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return e.value.code, err


def test_eval_errors(files, capsys, tmp_path):
    code, err = _exit(_eval_args(files, "corrupt.pt"), capsys)
    assert code == 1 and "cannot read checkpoint" in err and "corrupt.pt" in err
    code, err = _exit(_eval_args(files, "misfit.pt"), capsys)
    assert code == 1 and "does not fit the student" in err
    # the traceback instead, with --debug after or before the sub-command
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        main(_eval_args(files, "corrupt.pt", "--debug"))
    with pytest.raises(CheckpointError):
        main(["--debug", *_eval_args(files, "corrupt.pt")])
    # bad arguments: exit 2
    code, err = _exit(_eval_args(files, "five.pt", "student.num_classes=5"), capsys)
    assert code == 2 and "data.val has 3 classes but the student has 5 outputs" in err
    args = ["eval", "--config", str(files / "recipe.yaml"), "--checkpoint"]
    code, err = _exit(args + [str(files / "student.pt")], capsys)
    assert code == 2 and "--val" in err
    code, err = _exit(args + [str(tmp_path / "nope.pt")], capsys)
    assert code == 2 and "--checkpoint" in err
    if "timm" not in sys.modules:
        try:
            import timm  # noqa: F401
        except ImportError:  # a timm student without timm: one line naming it
            code, err = _exit(_eval_args(files, "student.pt", "student.name=resnet50d"), capsys)
            assert code == 2 and "timm" in err


def test_corrupt_checkpoint_from_the_console(files):
    """The installed entry point: one line, exit 1, no traceback."""
    res = subprocess.run(
        [sys.executable, "-m", "ssld", *_eval_args(files, "corrupt.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("ssld eval: error: cannot read checkpoint")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def _minimal_args(files, command):
    val = str(files / "val")
    return {
        "dedup": ["dedup", "--query", val, "--reference", val, "--out", str(files / "d")],
        "select": ["select", "--gallery", val, "--k", "1", "--out", str(files / "s.csv")],
        "train": ["train"],
        "finetune": ["finetune"],
        "eval": _eval_args(files),
        "demo": ["demo"],
    }[command]


FAILURES = [
    (RuntimeError("CUDA error: an illegal memory access was encountered\nmore"), 1, "CUDA error"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1, "batch size"),
    (OSError(28, "No space left on device"), 1, "No space left"),
    (ValueError("the teacher returned 7 classes, not 10"), 2, "returned 7 classes"),
    (cli.UsageError("argument --k: bad"), 2, "--k"),
    (KeyboardInterrupt(), 130, "interrupted"),
]


@pytest.mark.parametrize("command", ["dedup", "select", "train", "finetune", "eval", "demo"])
def test_failures_are_one_line(files, command, capsys, monkeypatch):
    func = "_cmd_train" if command == "finetune" else f"_cmd_{command}"
    for exc, want_code, needle in FAILURES:

        def fail(args, exc=exc):
            raise exc

        monkeypatch.setattr(cli, func, fail)
        code, err = _exit(_minimal_args(files, command), capsys)
        assert code == want_code and needle in err, (command, exc, err)
        assert err.startswith(f"ssld {command}: "), err
        if code == 130 and command in ("train", "finetune"):
            assert "--resume" in err
        if code == 1:
            assert "--debug" in err
        with pytest.raises(type(exc)):
            main([*_minimal_args(files, command), "--debug"])
        monkeypatch.setenv("SSLD_DEBUG", "1")
        with pytest.raises(type(exc)):
            main(_minimal_args(files, command))
        monkeypatch.delenv("SSLD_DEBUG")
