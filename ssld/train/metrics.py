"""Device-side meters, per-phase step timing, and the run directory's logs and curves."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ssld._io import pyplot


class Meters:
    """Running sums kept as device tensors; ``read()`` is the only host synchronisation."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()

    def read(self) -> dict[str, float]:
        if not self.sums:
            return {}
        names = list(self.sums)
        values = torch.stack([self.sums[n].reshape(()) for n in names]).cpu().tolist()
        self.sums = {}
        return dict(zip(names, values))


PHASES = ("data", "teacher", "student", "loss", "optimizer")


class StepTimer:
    """Seconds per phase of the training step: host time waiting for data, and CUDA events
    around teacher forward, student forward+backward, loss and optimizer (read only when
    ``read()`` is called, at log intervals). On the CPU the phases are host timings."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.pending: list[tuple[str, object, object]] = []
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._t = None
        self._ev = None

    def data(self, seconds: float) -> None:
        self.totals["data"] += seconds

    def start(self) -> None:
        if self.cuda:
            self._ev = torch.cuda.Event(enable_timing=True)
            self._ev.record()
        else:
            self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        """End ``phase`` (it began at the previous mark or start) and begin the next one."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.pending.append((phase, self._ev, ev))
            self._ev = ev
        else:
            now = time.perf_counter()
            self.totals[phase] += now - self._t
            self._t = now

    def read(self) -> dict[str, float]:
        if self.pending:
            self.pending[-1][2].synchronize()
            for phase, a, b in self.pending:
                self.totals[phase] += a.elapsed_time(b) / 1e3
            self.pending = []
        out, self.totals = self.totals, dict.fromkeys(PHASES, 0.0)
        return out


class RunLog:
    """OUT/config.json, OUT/metrics.jsonl, TensorBoard (when installed), PNG curves."""

    def __init__(self, out: Path, enabled: bool = True):
        self.out = Path(out)
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tb"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def config(self, cfg: dict) -> None:
        if self.enabled:
            (self.out / "config.json").write_text(json.dumps(cfg, indent=1))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def records(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def plot(self) -> Path | None:
        """loss, learning rate and accuracy curves (matplotlib, when installed)."""
        if not self.enabled:
            return None
        plt = pyplot()
        if plt is None:
            return None
        recs = self.records()
        train = [r for r in recs if r.get("kind") == "train"]
        evals = [r for r in recs if r.get("kind") == "eval"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        if train:
            steps = [r["step"] for r in train]
            axes[0].plot(steps, [r["loss"] for r in train])
            axes[1].plot(steps, [r["lr"] for r in train])
        if evals:
            axes[2].plot([r["epoch"] for r in evals], [r["top1"] for r in evals], label="top-1")
            axes[2].plot([r["epoch"] for r in evals], [r["top5"] for r in evals], label="top-5")
            axes[2].legend()
        for ax, title, xl in zip(
            axes, ("distillation loss", "learning rate", "student accuracy (%)"),
            ("step", "step", "epoch"),
        ):  # fmt: skip
            ax.set_title(title)
            ax.set_xlabel(xl)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
