"""``ssld demo``: the whole SSLD pipeline in miniature, on real data that ships with the
installed packages, in a few minutes on a laptop CPU.

1. dedup   scikit-image photos as the "validation set", a gallery of other photos plus
           transformed copies of the validation photos: ``ssld dedup`` must find the copies.
2. teacher a larger CNN trained with labels on T, a labeled split of scikit-learn's
           handwritten digits (real scans); the rest of the training pool is the unlabeled
           gallery (labels hidden); a held-out test split is never trained on.
3. select  ``ssld select`` keeps the teacher's top-k images per class of the gallery: U.
4. train   a smaller student, same step budget: (a) hard labels on T, (b) SSLD on T only,
           (c) SSLD on T ∪ U, (d) (c) + finetuning on T; over several seeds.
5. results a table, OUT/results.json, OUT/report.md with curves and a duplicate pair.

``ablation=True`` instead runs the paper's ablations in miniature (loss kind, weight decay,
unlabeled volume, training length), each over seeds.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ssld._io import progress_bar, pyplot

RESULT_KEYS = (
    "teacher_top1",
    "student_supervised_top1",
    "student_ssld_labeled_top1",
    "student_ssld_top1",
    "student_ssld_finetune_top1",
)
# the paper's ImageNet-1k top-1 (ResNet50-D <- ResNeXt101-32x16d), for context
PAPER = {
    "teacher_top1": None,
    "student_supervised_top1": 79.1,
    "student_ssld_labeled_top1": None,
    "student_ssld_top1": 82.2,
    "student_ssld_finetune_top1": 83.0,
}
LABELS = {
    "teacher_top1": "teacher (labels on T)",
    "student_supervised_top1": "(a) student, labels on T",
    "student_ssld_labeled_top1": "(b) student, SSLD on T",
    "student_ssld_top1": "(c) student, SSLD on T + U",
    "student_ssld_finetune_top1": "(d) (c) + finetune on T",
}


@dataclass(frozen=True)
class DemoSettings:
    seeds: int = 5
    steps: int = 300  # student step budget of (a), (b), (c)
    teacher_steps: int = 300
    finetune_steps: int = 40
    batch: int = 64
    input_size: int = 8  # the digits' native resolution
    k: int = 60  # per class, from a gallery of about 117 per class
    fractions: tuple = (0.05, 0.65, 0.3)  # T (scarce labels), gallery, test
    teacher_widths: tuple = (32, 64, 128)
    student_widths: tuple = (8, 16, 32)
    weight_decay: float = 5e-4
    base_lr: float = 0.4  # x batch / 256
    photo_transforms: tuple = ("crop", "rescale", "rotate", "jpeg", "jitter", "flip", "blur")

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(
            seeds=1,
            steps=12,
            teacher_steps=12,
            finetune_steps=4,
            batch=32,
            k=20,
            photo_transforms=("crop", "flip"),
        )


def _mean_std(xs):
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


class Demo:
    def __init__(
        self, out, device="cpu", settings: DemoSettings = DemoSettings(), log=print, progress=True
    ):
        self.progress = progress
        self.bar = None
        self.out = Path(out)
        self.device = str(device)
        self.s = settings
        self.log = log or (lambda *a: None)
        self.out.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    # ---- stages ----

    def dedup(self) -> dict:
        from ssld.dedup.pipeline import DedupConfig, run_dedup
        from ssld.photos import UNRELATED, make_photo_set, score

        t0 = time.time()
        photos = self.out / "data" / "photos"
        if photos.exists():
            shutil.rmtree(photos)
        info = make_photo_set(
            photos,
            copy_transforms=self.s.photo_transforms,
            unrelated=UNRELATED,
            unrelated_transforms=("orig",),
        )
        out = self.out / "dedup"
        if out.exists():
            shutil.rmtree(out)
        run_dedup(
            info["query"],
            info["reference"],
            out,
            DedupConfig(shortlist_k=2, pictures=1),
            workers=2,
            progress=False,
            log=None,
        )
        import csv

        with open(out / "duplicates.csv", newline="") as f:
            found = [(r["query"], r["reference"]) for r in csv.DictReader(f)]
        sc = score(found, info["truth"])
        self.timings["dedup"] = time.time() - t0
        self.log(
            f"[1/5] dedup: {len(info['truth'])} copies among {len(info['truth'])} + "
            f"{len(info['negatives'])} gallery photos: precision {sc['precision']:.2f}, "
            f"recall {sc['recall']:.2f} ({self.timings['dedup']:.0f} s)"
        )
        return sc

    def _digits(self):
        from ssld.data.digits import write_digits

        root = self.out / "data" / "digits"
        if root.exists():
            shutil.rmtree(root)
        info = write_digits(root, size=self.s.input_size, fractions=self.s.fractions)
        return info

    def _overrides(self, run_out, seed, widths, **extra):
        s = self.s
        o = {
            "data.input_size": s.input_size,
            "data.min_scale": 0.6,
            "data.hflip": False,
            "data.eval_crop_pct": 1.0,
            "data.workers": 0,
            "student.name": "ssld.models:tiny_resnet",
            "student.num_classes": 10,
            "student.kwargs": json.dumps({"widths": list(widths), "seed": seed}),
            "teacher.name": "ssld.models:tiny_resnet",
            "teacher.num_classes": 10,
            "teacher.kwargs": json.dumps({"widths": list(s.teacher_widths), "seed": seed}),
            "optim.base_lr": s.base_lr,
            "optim.weight_decay": s.weight_decay,
            "optim.warmup_epochs": 0.5,
            "run.batch_size": s.batch,
            "run.amp": "none",
            "run.channels_last": False,
            "run.log_every": 10,
            "run.ckpt_every": 100000,
            "run.eval_every": 0,
            "run.progress": False,
            "run.seed": seed,
            "run.device": self.device,
            "run.out": run_out,
        }
        o.update(extra)
        return [f"{k}={v}" for k, v in o.items()]

    def _train(self, name, seed, widths, mode="train", init=None, **extra):
        from ssld.config import load_config
        from ssld.train import Trainer

        run_out = self.out / "runs" / f"{name}-seed{seed}"
        if run_out.exists():
            shutil.rmtree(run_out)
        cfg = load_config(None, self._overrides(run_out, seed, widths, **extra))
        tr = Trainer(cfg, mode=mode, init=init, log=None)
        tr.fit()
        self._tick()
        evals = [r for r in tr.runlog.records() if r.get("kind") == "eval"]
        return evals[-1]["top1"], run_out

    def teacher(self, digits, seed):
        top1, run = self._train(
            "teacher",
            seed,
            self.s.teacher_widths,
            **{
                "data.train": digits["train"],
                "data.val": digits["val"],
                "loss.kd_weight": 0.0,
                "loss.ce_weight": 1.0,
                "optim.steps": self.s.teacher_steps,
            },
        )
        return top1, run / "student.pt"

    def select(self, digits, teacher_weights, seed, k=None) -> Path:
        from ssld.data import EvalTransform
        from ssld.models import tiny_resnet
        from ssld.select import SelectConfig, gallery_paths, run_select
        from ssld.train.checkpoint import student_state

        teacher = tiny_resnet(10, widths=self.s.teacher_widths)
        teacher.load_state_dict(student_state(teacher_weights))
        paths, root = gallery_paths(digits["unlabeled"])
        out = self.out / "select" / f"seed{seed}.csv"
        for old in out.parent.glob(f"{out.name}*"):
            old.unlink()
        cfg = SelectConfig(
            k=k or self.s.k, batch_size=256, transform=EvalTransform(self.s.input_size, 1.0)
        )
        run_select(teacher, paths, root, out, cfg, device=self.device, progress=False, log=None)
        return out

    def students(self, digits, teacher_weights, selected, seed) -> dict:
        s = self.s
        common = {
            "teacher.weights": teacher_weights,
            "data.val": digits["val"],
            "optim.steps": s.steps,
        }
        res = {}
        res["student_supervised_top1"], _ = self._train(
            "supervised",
            seed,
            s.student_widths,
            **common,
            **{"data.train": digits["train"], "loss.kd_weight": 0.0, "loss.ce_weight": 1.0},
        )
        res["student_ssld_labeled_top1"], _ = self._train(
            "ssld_labeled", seed, s.student_widths, **common, **{"data.train": digits["train"]}
        )
        res["student_ssld_top1"], run = self._train(
            "ssld",
            seed,
            s.student_widths,
            **common,
            **{
                "data.train": digits["train"],
                "data.unlabeled": selected,
                "data.unlabeled_root": digits["unlabeled"],
            },
        )
        res["student_ssld_finetune_top1"], _ = self._train(
            "ssld_finetune",
            seed,
            s.student_widths,
            mode="finetune",
            init=run / "student.pt",
            **{
                "teacher.weights": teacher_weights,
                "data.val": digits["val"],
                "data.train": digits["train"],
                "optim.steps": s.finetune_steps,
                "optim.base_lr": s.base_lr / 10,
                "optim.warmup_epochs": 0.0,
            },
        )
        return res

    def _say(self, msg: str) -> None:
        """A log line that does not tear the progress bar."""
        if self.bar is not None and self.log is print:
            self.bar.write(msg)
        else:
            self.log(msg)

    def _tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    # ---- the whole thing ----

    def run(self) -> dict:
        t_start = time.time()
        sc = self.dedup()
        digits = self._digits()
        c = digits["counts"]
        self.log(
            f"digits: T = {c['train']} labeled, gallery = {c['unlabeled']} unlabeled, "
            f"test = {c['val']} held out"
        )
        per_seed = []
        self.bar = progress_bar(self.s.seeds * 6, self.progress, "demo", "stage", leave=False)
        for seed in range(self.s.seeds):
            t0 = time.time()
            top1, weights = self.teacher(digits, seed)
            selected = self.select(digits, weights, seed)
            self._tick()
            n_sel = sum(1 for _ in open(selected)) - 1
            res = {"teacher_top1": top1, **self.students(digits, weights, selected, seed)}
            res["selected"] = n_sel
            per_seed.append(res)
            self._say(
                f"[seed {seed + 1}/{self.s.seeds}] teacher {top1:.1f}%, selected {n_sel}, "
                + ", ".join(f"{k.split('_', 1)[1][:-5]} {res[k]:.1f}%" for k in RESULT_KEYS[1:])
                + f" ({time.time() - t0:.0f} s)"
            )
        if self.bar is not None:
            self.bar.close()
        results = {"dedup_precision": sc["precision"], "dedup_recall": sc["recall"]}
        for key in RESULT_KEYS:
            m, sd = _mean_std(r[key] for r in per_seed)
            results[key], results[key + "_std"] = m, sd
        results["seeds"] = self.s.seeds
        results["per_seed"] = per_seed
        results["settings"] = json.loads(json.dumps(self.s.__dict__))
        results["seconds"] = time.time() - t_start
        results["device"] = self.device
        (self.out / "results.json").write_text(json.dumps(results, indent=1))
        self.report(results)
        self.log(table(results))
        return results

    def report(self, results: dict) -> None:
        pics = sorted((self.out / "dedup" / "matches").glob("*.png"))
        lines = [
            "# ssld demo",
            "",
            f"{results['seeds']} seed(s), {results['seconds']:.0f} s on {results['device']}.",
            "",
            table(results, markdown=True),
            "",
            f"Dedup: precision {results['dedup_precision']:.2f}, recall "
            f"{results['dedup_recall']:.2f} (see dedup/report.md).",
            "",
        ]
        if pics:
            shutil.copy(pics[0], self.out / "duplicate_pair.png")
            lines += ["A duplicate pair found by `ssld dedup`:", "", "![](duplicate_pair.png)", ""]
        if self._curves():
            lines += ["Training curves (seed 0):", "", "![](curves.png)", ""]
        (self.out / "report.md").write_text("\n".join(lines))

    def _curves(self) -> bool:
        plt = pyplot()
        if plt is None:
            return False
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name in ("supervised", "ssld_labeled", "ssld", "ssld_finetune"):
            path = self.out / "runs" / f"{name}-seed0" / "metrics.jsonl"
            if not path.exists():
                continue
            recs = [json.loads(x) for x in path.read_text().splitlines()]
            tr = [r for r in recs if r.get("kind") == "train"]
            ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("CE for supervised, JSD to the teacher otherwise", fontsize=9)
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out / "curves.png", dpi=100)
        plt.close(fig)
        return True


ABLATIONS = {
    "loss": {
        "what": "distillation loss on T ∪ U (paper 3.3.2: soft labels only, no temperature)",
        "claim": "JSD without labels or temperature is at least as good as KL, symmetric KL "
        "and CE + KD with a temperature",
        "values": ["jsd", "kl", "sym_kl", "ce+kd(T=4)"],
    },
    "weight_decay": {
        "what": "student weight decay (paper Table 5: 3e-5 -> 1e-5 improves MobileNetV3)",
        "claim": "the smallest weight decay is the best",
        "values": [1e-5, 1e-4, 5e-4, 2e-3],
    },
    "unlabeled": {
        "what": "selected unlabeled images per class, k (paper Table 6: 2M -> 4M still helps)",
        "claim": "more selected unlabeled images give a better student",
        "values": [0, 15, 30, 60, 117],
    },
    "steps": {
        "what": "training length in steps (paper Table 4: more epochs are better, up to 360)",
        "claim": "longer training gives a better student",
        "values": ["budget/3", "budget", "budget*3"],  # of DemoSettings.steps
    },
}


def _ablation_trend(name: str, means: list[float]) -> bool:
    if name == "loss":
        return means[0] >= max(means[1:]) - 1e-9
    if name == "weight_decay":
        return means[0] >= max(means) - 1e-9
    return all(b >= a - 1e-9 for a, b in zip(means, means[1:]))


def run_ablation(demo: Demo) -> dict:
    """The paper's ablations in miniature on the digits (student (c) settings), over seeds."""
    s = demo.s
    digits = demo._digits()
    results = {}
    teachers = {}
    runs = s.seeds * (1 + sum(len(spec["values"]) for spec in ABLATIONS.values()))
    demo.bar = progress_bar(runs, demo.progress, "ablation", "run", leave=False)
    for seed in range(s.seeds):
        _, weights = demo.teacher(digits, seed)
        teachers[seed] = weights
    selected = {}  # (seed, k) -> csv
    for name, spec in ABLATIONS.items():
        rows = []
        values = spec["values"]
        if name == "steps":
            values = [max(1, s.steps // 3), s.steps, 3 * s.steps]
        spec = {**spec, "values": values}
        for value in values:
            accs = []
            for seed in range(s.seeds):
                extra = {
                    "teacher.weights": teachers[seed],
                    "data.val": digits["val"],
                    "data.train": digits["train"],
                    "optim.steps": s.steps,
                }
                k = s.k
                if name == "loss":
                    if value == "ce+kd(T=4)":
                        extra.update({"loss.kind": "kl", "loss.temperature": 4.0})
                        extra["loss.ce_weight"] = 1.0
                    else:
                        extra["loss.kind"] = value
                elif name == "weight_decay":
                    extra["optim.weight_decay"] = value
                elif name == "unlabeled":
                    k = value
                elif name == "steps":
                    extra["optim.steps"] = value
                if k > 0:
                    key = (seed, k)
                    if key not in selected:
                        selected[key] = demo.select(digits, teachers[seed], f"{seed}-k{k}", k)
                    extra["data.unlabeled"] = selected[key]
                    extra["data.unlabeled_root"] = digits["unlabeled"]
                top1, _ = demo._train(f"ablation-{name}-{value}", seed, s.student_widths, **extra)
                accs.append(top1)
            m, sd = _mean_std(accs)
            rows.append({"value": value, "top1": m, "top1_std": sd, "per_seed": accs})
            demo._say(f"  ablation {name} = {value}: {m:.2f} ± {sd:.2f}")
        reproduced = _ablation_trend(name, [r["top1"] for r in rows])
        results[name] = {**spec, "rows": rows, "reproduced": reproduced}
    if demo.bar is not None:
        demo.bar.close()
    results["seeds"] = s.seeds
    (demo.out / "ablation.json").write_text(json.dumps(results, indent=1, default=str))
    _ablation_report(demo.out, results)
    return results


def _ablation_report(out: Path, results: dict) -> None:
    lines = ["# ssld demo --ablation", "", f"{results['seeds']} seed(s) per setting.", ""]
    plt = pyplot()
    for name in ABLATIONS:
        r = results[name]
        lines += [f"## {name}: {r['what']}", ""]
        lines += ["| setting | student top-1 |", "|---|---|"]
        lines += [f"| {x['value']} | {x['top1']:.2f} ± {x['top1_std']:.2f} |" for x in r["rows"]]
        verdict = "reproduced" if r["reproduced"] else "NOT reproduced at this scale"
        means = [x["top1"] for x in r["rows"]]
        spread, noise = max(means) - min(means), max(x["top1_std"] for x in r["rows"])
        caveat = (
            f" The means differ by {spread:.2f} points, less than the seed-to-seed std "
            f"({noise:.2f}): not significant at {results['seeds']} seeds."
            if spread < noise
            else ""
        )
        lines += ["", f"Paper's claim: {r['claim']}. Here: **{verdict}**.{caveat}", ""]
        if plt is not None:
            fig, ax = plt.subplots(figsize=(5, 3))
            xs = [str(x["value"]) for x in r["rows"]]
            ax.errorbar(
                xs, [x["top1"] for x in r["rows"]], yerr=[x["top1_std"] for x in r["rows"]],
                marker="o", capsize=3,
            )  # fmt: skip
            ax.set_xlabel(name)
            ax.set_ylabel("student top-1 (%)")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / f"ablation_{name}.png", dpi=100)
            plt.close(fig)
            lines += [f"![](ablation_{name}.png)", ""]
    (out / "ablation.md").write_text("\n".join(lines))


def table(results: dict, markdown: bool = False) -> str:
    rows = [("model", "digits top-1 (this demo)", "ImageNet top-1 (paper, R50-D)")]
    for key in RESULT_KEYS:
        paper = PAPER[key]
        rows.append(
            (
                LABELS[key],
                f"{results[key]:.1f} ± {results[key + '_std']:.1f}",
                f"{paper:.1f}" if paper is not None else "-",
            )
        )
    if markdown:
        out = [f"| {' | '.join(rows[0])} |", "|---|---|---|"]
        out += [f"| {' | '.join(r)} |" for r in rows[1:]]
        return "\n".join(out)
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def run_demo(out, device="cpu", seeds=None, quick=False, ablation=False, log=print) -> dict:
    s = DemoSettings.quick() if quick else DemoSettings()
    if seeds is not None:
        s = DemoSettings(**{**s.__dict__, "seeds": seeds})
    elif ablation and not quick:
        s = DemoSettings(**{**s.__dict__, "seeds": 3})
    demo = Demo(out, device, s, log)
    if ablation:
        return run_ablation(demo)
    return demo.run()
