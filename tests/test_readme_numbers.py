"""Every measured number in README.md and bench/README.md comes from a committed results file.

The numbers live in generated blocks (``<!-- results:NAME -->``) that
``python bench/summarize.py --write-readme`` renders from ``bench/results/*.json``, each
naming its source file, device, versions, commit and date. These tests fail when a block is
out of date with its files, and when a number with a unit of measurement appears outside
the blocks without being listed below as a setting, a target or a spec.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import summarize  # noqa: E402

READMES = ["README.md", "bench/README.md"]
UNIT = re.compile(
    r"(?<![\w.])(\d+(?:\.\d+)?)\s?(ms|us|µs|s|GB/s|TB/s|TOPS|img/s|images/s|x)(?![\w/])"
)
# Numbers with units outside the generated blocks that are not measurements, with why.
SPEC_NUMBERS = {
    "a 15x smaller student (20k vs 309k": "parameter counts of the demo's two model widths",
    "lr 0.1 x": "a recipe setting",
    ">= 5x eager": "a target",
    ">= 2x Liger": "a target",
    ">= 1.3x torch": "a target",
    "132 SMs x 4 x 32 lanes": "an H100's issue width, from its spec",
    "at least 3x faster": "a target",
    "at least 3x\n": "a target",
    "at least 2x `torch-cdist-topk`": "a target",
    "H200 1979 TOPS": "the vendor's int8 peak (a table in bench_match.py)",
    "grows 4x at a time": "the calibration's step",
    "(0.25 s)": "a default setting",
    "(60 s)": "a default setting",
    "(1000 ms)": "a default setting",
    "512 x 512": "a shape",
    "500 x 375": "a shape",
    ">= 0.90 x": "a target",
    ">= 1.5x": "a target",
    "at least 10x less": "a target",
    "within 1.2x of Liger": "a target",
    "1.3x its speed": "a target",
}


def _prose(text: str) -> str:
    """README text without the generated blocks and fenced code."""
    text = summarize.MARK.sub("", text)
    return re.sub(r"```.*?```", "", text, flags=re.S)


def test_generated_blocks_are_current():
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "summarize.py"), "--check-readme"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("fname", READMES)
def test_no_measured_number_outside_generated_blocks(fname):
    text = _prose((ROOT / fname).read_text())
    flagged = []
    for line in text.splitlines():
        for m in UNIT.finditer(line):
            window = line[max(0, m.start() - 40) : m.end() + 40] + "\n"
            if not any(k in window or k.strip() in line for k in SPEC_NUMBERS):
                flagged.append(window.strip())
    assert not flagged, (
        f"{fname}: numbers with units outside the generated blocks; render them from a "
        f"results file (bench/summarize.py BLOCKS) or list them in SPEC_NUMBERS: {flagged}"
    )


def test_every_block_names_its_source_file():
    for fname in READMES:
        text = (ROOT / fname).read_text()
        for m in summarize.MARK.finditer(text):
            body = m.group("body")
            files = re.findall(r"`(bench/results/[^`]+\.json)`", body)
            if body.startswith(summarize.NOT_MEASURED):
                assert not re.search(r"\d+(\.\d+)?\s?(ms|s|%|x)\b", body), body
                continue
            assert files, f"{fname}: block {m.group('name')} names no results file"
            for f in files:
                assert (ROOT / f).is_file(), f"{fname}: {f} is not committed"


def test_scanner_catches_a_hand_typed_number():
    """The check above can fail: a timing typed into the prose is flagged."""
    text = _prose(
        "Some prose.\nThe fused path takes 51 ms here.\n<!-- results:x -->\n9 ms\n"
        "<!-- /results:x -->\n```\n7 ms\n```\n"
    )
    assert [m.group(0) for m in UNIT.finditer(text)] == ["51 ms"]
