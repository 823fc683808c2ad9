"""Every command and snippet in README.md, and the commands in the configs' header comments,
works as written.

Python: the ```python blocks of README.md are extracted (not copied) and run in order in one
namespace that starts with FIXTURES (small random tensors for the free names the snippets
use); a snippet using a name that is neither a fixture nor bound by an earlier snippet fails
the test, so a new snippet has to be wired in here.

Shell: every ``ssld ...`` line of the ```bash blocks (backslash continuations joined, comments
dropped) has its placeholders (GALLERY_DIR, teacher.pth, IMAGENET/train, ...) replaced by
small generated data through a substitution table: the scikit-image photo set
(:mod:`ssld.photos`) as gallery and validation images, its 10 reference photos as 10
classes, and the in-repo tiny CNN (:mod:`ssld.models`) as teacher. A value missing from the
table fails the test. Each command must then parse, its configuration must validate as
written (the recipe's own models, the mapped paths), and it runs end to end in a few seconds:
the recipes' timm models are swapped for tiny ones and training is cut to a couple of steps
by overrides appended after the README's. ``ssld demo`` (minutes) is only parsed.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("cv2")
pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from ssld.cli import build_parser, main  # noqa: E402
from ssld.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PARSE_ONLY = {"demo"}  # minutes of work; tests/test_demo.py runs its --quick form

# ---- what the placeholders stand for (paths relative to the test's working folder) ----

README_SUBST = {
    "GALLERY_DIR": "gallery",
    "VAL_DIR": "IMAGENET/val",
    "OUT": "dedup",  # the same folder as the full-scale run's: that one resumes
    "OUT/duplicates.csv": "dedup/duplicates.csv",
    "dedup": "dedup",
    "dedup/duplicates.csv": "dedup/duplicates.csv",
    "IMAGENET22K": "gallery",
    "IMAGENET/train": "IMAGENET/train",
    "IMAGENET/val": "IMAGENET/val",
    "resnext101_32x16d": "ssld.models:tiny_resnet",
    "teacher.pth": "teacher.pth",
    "selected.csv": "selected.csv",
    "runs/resnet50d_ssld-finetune/student.pt": "runs/resnet50d_ssld-finetune/student.pt",
}
CONFIG_SUBST = {
    "/path/resnext101_32x16d.pth": "teacher.pth",
    "/data/imagenet/train": "IMAGENET/train",
    "/data/imagenet/val": "IMAGENET/val",
    "/data/imagenet22k": "gallery",
    "selected.csv": "unlabeled.txt",
    "runs/resnet50d_ssld-finetune/student.pt": "student.pt",
    "runs/mobilenetv3_large_ssld-finetune/student.pt": "student.pt",
    "runs/demo_tiny_teacher": "runs/demo_tiny_teacher",
    "runs/demo_tiny_teacher/student.pt": "runs/demo_tiny_teacher/student.pt",
    "runs/demo_tiny-finetune/student.pt": "runs/demo_tiny-finetune/student.pt",
    "null": "null",
    "{widths: [16, 32, 64]}": "{widths: [16, 32, 64]}",
}
# "...same overrides..." (README, finetune after train): the previous command's overrides
SAME_OVERRIDES = "...same overrides..."

# end to end: the recipes' models replaced by tiny ones, a few steps, no worker processes
TINY_STUDENT = [
    "student.name=ssld.models:tiny_resnet",
    "student.num_classes=10",
    "student.kwargs={widths: [8, 16, 32]}",
    "data.input_size=32",
    "data.workers=0",
]
TINY_TEACHER = [
    "teacher.name=ssld.models:tiny_resnet",
    "teacher.num_classes=10",
    "teacher.kwargs={}",
]
QUICK = [
    "run.batch_size=8",
    "optim.steps=2",
    "finetune.epochs=1",
    "run.progress=false",
    "run.log_every=1",
]
if importlib.util.find_spec("kornia") is None:  # optional: the recipe's AutoAugment
    QUICK.append("data.autoaugment=false")
CONFIG_COMMANDS = ("train", "finetune", "eval")  # their config is validated for that stage

# ---- extraction ----


def fenced_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}[ \t]*\n(.*?)^```", text, flags=re.M | re.S)


def shell_lines(block: str) -> list[str]:
    """Lines with backslash continuations joined."""
    out, cur = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
        else:
            out.append(cur + line)
            cur = ""
    if cur:
        out.append(cur)
    return out


def ssld_commands(text: str) -> list[list[str]]:
    """argv of every ``ssld`` command of the bash blocks of ``text``, comments dropped; the
    README's "...same overrides..." stays one token."""
    cmds = []
    for block in fenced_blocks(text, "bash"):
        for line in shell_lines(block):
            line = line.replace(SAME_OVERRIDES, "'" + SAME_OVERRIDES + "'")
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "ssld":
                cmds.append(argv[1:])
    return cmds


def config_comment_lines(path: Path) -> list[str]:
    """The commands of a config's header comment (lines ``#   cmd``, continuations joined)."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:])
    cmds = [ln.strip() for ln in shell_lines("\n".join(header))]
    return [c for c in cmds if c.startswith(("ssld ", "python "))]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def substitute(argv: list[str], table: dict, previous_overrides=()) -> list[str]:
    """``argv`` with every value mapped through ``table``; flags, numbers and the repository's
    configs pass unchanged. A value not in the table fails the test."""
    out = argv[:1]  # the sub-command
    for tok in argv[1:]:
        if tok == SAME_OVERRIDES:
            assert previous_overrides, f"{SAME_OVERRIDES!r} without an earlier command"
            out += previous_overrides
            continue
        if tok.startswith("-"):
            out.append(tok)
            continue
        key, eq, value = tok.partition("=")
        if not eq or "/" in key:  # a plain value, not section.key=value
            key, eq, value = "", "", tok
        if _is_number(value):
            mapped = value
        elif value.startswith("configs/") and (REPO / value).is_file():
            mapped = str(REPO / value)
        else:
            assert value in table, (
                f"placeholder {value!r} of `ssld {' '.join(argv)}` is not mapped: add it to the "
                "substitution table of tests/test_readme.py"
            )
            mapped = table[value]
        out.append(f"{key}={mapped}" if eq else mapped)
    return out


def parse_and_validate(argv: list[str]):
    """The parsed arguments; for config commands also the configuration, validated as written
    (SystemExit / ConfigError fail the test with the command in the message)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`ssld {' '.join(argv)}` does not parse (exit {e.code})")
    if args.command in CONFIG_COMMANDS:
        extra = [f"data.val={args.val}"] if getattr(args, "val", None) else []
        load_config(args.config, list(args.overrides) + extra, stage=args.command)
    return args


def run_end_to_end(argv: list[str], args) -> None:
    extra = []
    if args.command in ("train", "finetune"):
        extra = TINY_STUDENT + TINY_TEACHER + QUICK
    elif args.command == "eval":
        extra = TINY_STUDENT
    elif args.command == "select":
        extra = ["--quiet"]
    elif args.command == "dedup":
        extra = ["--quiet", "--pictures", "1"]
    assert main(argv + extra) == 0, argv


# ---- generated data ----


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """gallery/ (photo copies + unrelated photos), IMAGENET/val/<photo>/ (the 10 reference
    photos, one class each), IMAGENET/train/<photo>/ (two other copies of each), teacher.pth
    (a tiny_resnet of 10 classes), unlabeled.txt, student.pt (tiny student weights)."""
    import cv2

    from ssld.models import tiny_resnet
    from ssld.photos import REFERENCE, UNRELATED, make_photo_set

    root = tmp_path_factory.mktemp("readme-data")
    gal = make_photo_set(
        root / "photos",
        copy_transforms=("crop", "flip"),
        unrelated=UNRELATED[:4],
        unrelated_transforms=("orig",),
    )
    shutil.move(str(gal["query"]), root / "gallery")
    for name in REFERENCE:
        (root / "IMAGENET" / "val" / name).mkdir(parents=True)
        shutil.move(str(gal["reference"] / f"{name}.png"), root / "IMAGENET" / "val" / name)
    train = make_photo_set(
        root / "photos-train", copy_transforms=("rescale", "jitter"), unrelated=()
    )
    for p in sorted((train["query"] / "copies").iterdir()):
        name = next(n for n in REFERENCE if p.stem.startswith(n + "_"))
        (root / "IMAGENET" / "train" / name).mkdir(parents=True, exist_ok=True)
        shutil.move(str(p), root / "IMAGENET" / "train" / name)
    for p in root.rglob("*.*"):  # half size: SIFT and decoding 4x faster, copies still found
        if p.suffix in (".png", ".jpg"):
            img = cv2.imread(str(p))
            h, w = img.shape[:2]
            cv2.imwrite(str(p), cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA))
    torch.save(tiny_resnet(10).state_dict(), root / "teacher.pth")
    torch.save(tiny_resnet(10, widths=(8, 16, 32)).state_dict(), root / "student.pt")
    (root / "unlabeled.txt").write_text("unrelated/page_orig.png\n")
    return root


@pytest.fixture
def workdir(data, tmp_path, monkeypatch):
    """A fresh working folder holding links to the generated data."""
    for p in data.iterdir():
        (tmp_path / p.name).symlink_to(p)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- the tests ----


def _free_names(code: str) -> set[str]:
    tree = ast.parse(code)
    bound, used = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return used - bound - set(dir(builtins))


def _fixtures() -> dict:
    g = torch.Generator().manual_seed(0)

    def sift(n):
        return torch.randint(0, 256, (n, 128), dtype=torch.uint8, generator=g)

    n, v = 6, 10
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = -100
    return {
        "student_logits": torch.randn(n, v, generator=g).requires_grad_(),
        "teacher_logits": torch.randn(n, v, generator=g),
        "student_hidden": torch.randn(n, 8, generator=g).requires_grad_(),
        "teacher_hidden": torch.randn(n, 12, generator=g),
        "student_head": torch.nn.Linear(8, v, bias=False),
        "teacher_head": torch.nn.Linear(12, v, bias=False).requires_grad_(False),
        "labels": labels,
        "shift_labels": labels,
        "queries": sift(40),
        "database": sift(70),
        "a_list": [sift(30), sift(25)],
        "b_list": [sift(20), sift(35)],
    }


def _trl_stand_in(monkeypatch):
    """Where TRL is not installed, a stand-in module with GKDTrainer's static loss slot, so that
    the README's swap runs; the assignment must then replace it."""
    if importlib.util.find_spec("trl") is not None:
        return None
    import types

    class GKDTrainer:
        @staticmethod
        def generalized_jsd_loss(*args, **kwargs):
            raise AssertionError("TRL's own loss was not replaced")

    for name in ("trl", "trl.experimental", "trl.experimental.gkd"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["trl.experimental.gkd"].GKDTrainer = GKDTrainer
    return GKDTrainer


def test_readme_python_snippets(monkeypatch):
    trainer = _trl_stand_in(monkeypatch)
    snippets = fenced_blocks(README.read_text(), "python")
    assert snippets, "README.md has no python blocks"
    ns = _fixtures()
    known = set(ns)
    for code in snippets:
        missing = _free_names(code) - known
        assert not missing, (
            f"a README snippet uses {sorted(missing)}: provide them in _fixtures() of "
            f"tests/test_readme.py\n{code}"
        )
        exec(compile(code, "README.md", "exec"), ns)
        known |= {k for k in ns if not k.startswith("__")}
    # what the snippets computed is what they say
    assert torch.isfinite(ns["loss"]) and ns["student_logits"].grad is not None
    assert ns["dist2"].shape == ns["index"].shape == (40, 2)
    assert len(ns["matches"]) == len(ns["a_list"])
    assert ns["student_hidden"].grad is not None and ns["student_head"].weight.grad is not None
    if trainer is not None:  # the swap took: TRL's trainer now computes ssld's loss
        from ssld_kernels.compat import generalized_jsd_loss

        s, t = ns["student_logits"].detach(), ns["teacher_logits"]
        assert torch.equal(trainer.generalized_jsd_loss(s, t), generalized_jsd_loss(s, t))


def test_readme_commands(workdir, capsys):
    cmds = ssld_commands(README.read_text())
    assert {c[0] for c in cmds} >= {"demo", "dedup", "select", "train", "finetune", "eval"}
    done, previous = set(), {}
    for raw in cmds:
        same = previous.get("train", []) if raw[0] == "finetune" else []
        argv = substitute(raw, README_SUBST, same)
        args = parse_and_validate(argv)
        if args.command in ("train", "finetune", "eval"):
            previous[args.command] = [t for t in argv[1:] if "=" in t and not t.startswith("-")]
        if args.command in PARSE_ONLY or tuple(argv) in done:
            continue  # the full-scale block repeats commands: run once
        run_end_to_end(argv, args)
        done.add(tuple(argv))
    out = capsys.readouterr().out
    assert "query images flagged" in out and "images selected" in out
    assert out.count('"top1"') == 2  # the two evals
    assert Path("runs/resnet50d_ssld-finetune/student.pt").is_file()
    assert (
        Path("runs/resnet50d_ssld/curves.png").is_file()
        or importlib.util.find_spec("matplotlib") is None
    )


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_comment_commands(config, workdir, capsys, monkeypatch):
    """The example commands at the top of each recipe parse and validate as written (paths
    mapped); demo_tiny's, on tiny data, also run (shortened; the digits at their native 8 px,
    no curves.png: a second of matplotlib per run, drawn in test_readme_commands)."""
    from ssld.train.metrics import RunLog

    monkeypatch.setattr(RunLog, "plot", lambda self: None)
    lines = config_comment_lines(config)
    assert any(c.startswith("ssld ") for c in lines), f"{config.name}: no example command"
    run = config.stem == "demo_tiny"
    for line in lines:
        argv = shlex.split(line, comments=True)
        if argv[0] == "python":  # python -c "CODE": the data preparation step
            assert argv[1] == "-c", line
            if run:
                exec(argv[2], {})
            continue
        argv = substitute(argv[1:], CONFIG_SUBST)
        args = parse_and_validate(argv)
        if run:
            quick = ["data.workers=0", "data.input_size=8"]
            if args.command != "eval":  # 2 steps of 256 images (finetune: its 1 epoch)
                quick += ["run.progress=false", "run.batch_size=256", "optim.steps=2"]
                quick += ["finetune.epochs=1", "data.val=null"]
            assert main(argv + quick) == 0, line
