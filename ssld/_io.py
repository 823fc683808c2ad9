"""Small shared helpers: atomic file writes, optional progress bars and plotting."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a per-process temporary file next to ``path``, then rename: readers
    (and a resumed run after a kill) see the old or the new file, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def atomic_write_lines(path: str | os.PathLike, lines) -> None:
    atomic_write_text(path, "".join(f"{x}\n" for x in lines))


def progress_bar(total: int, enabled: bool, desc: str, unit: str, **kwargs):
    """A tqdm bar, or None when disabled, empty, or tqdm is missing."""
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, **kwargs)


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend, or None when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
