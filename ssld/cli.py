"""The ``ssld`` command line.

Each pipeline stage is a sub-command reading and writing plain files. Every expected failure
is one line naming the problem, never a traceback: bad arguments (and configuration keys,
inputs that cannot be used) exit with code 2, failures while running (out of memory, a CUDA
error, a damaged checkpoint, a full disk...) with code 1, an interrupt (Ctrl-C) with 130.
``--debug`` (before or after the sub-command; or ``SSLD_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

from ssld import __version__, _runtime


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _cmd_info(args) -> int:
    from ssld_kernels._backends import describe

    print(f"ssld {__version__}")
    print(describe())
    return 0


class UsageError(Exception):
    """A bad argument found after parsing: reported in one line with exit code 2."""


def _number(kind, ok, expected: str):
    """An argparse type: ``kind(text)`` that must satisfy ``ok``, else "expected ..."."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_ratio = _number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
_positive_float = _number(float, lambda v: v > 0, "a positive number")


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n such as 0/4, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n, got {text!r}")
    return i, n


def _existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"not a folder: {text}")
    return text


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return text


def resolve_device(text: str, local_rank: int = 0):
    """:func:`ssld._runtime.resolve_device`, a bad value reported as ``argument --device``."""
    try:
        return _runtime.resolve_device(text, local_rank)
    except _runtime.DeviceError as e:
        raise UsageError(f"argument --device: {e}") from None


_DEVICE_HELP = "auto, cpu, cuda or cuda:i"


def _add_device(group, default="auto", help=_DEVICE_HELP) -> None:
    group.add_argument("--device", default=default, help=help)


def _add_shard(group) -> None:
    """--shard i/n of the stages that split their inputs (dedup, select); torchrun sets it."""
    group.add_argument("--shard", type=_shard, default=None, help="i/n: this process's share")


def _add_config(p, help="YAML recipe") -> None:
    """--config and the KEY=VALUE overrides of the stages that read a TrainConfig."""
    p.add_argument("--config", type=_existing_file, help=help)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


@dataclass(frozen=True)
class _Launch:
    """How this process was started: torchrun (WORLD_SIZE > 1, no --shard) or alone."""

    distributed: bool
    world: int
    rank: int
    shard: tuple[int, int]
    device: object


def _launch(args) -> _Launch:
    env = _runtime.process_env()
    distributed = env.world > 1 and args.shard is None
    shard = (env.rank, env.world) if distributed else (args.shard or (0, 1))
    device = resolve_device(args.device, env.local_rank if distributed else 0)
    return _Launch(distributed, env.world, env.rank, shard, device)


def _rank0_after_all(launch: _Launch, summary: dict, write) -> None:
    """Under torchrun: wait for every rank, let rank 0 ``write()`` the merged outputs (its
    counts go into ``summary``), wait again so no rank exits before the outputs exist."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        dist.barrier()
        if launch.rank == 0:
            summary.update(write())
            summary["written"] = True
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _add_dedup(sub) -> None:
    p = sub.add_parser(
        "dedup",
        help="flag query images that near-duplicate reference images (SIFT + verification)",
        description=(
            "Flag every query (gallery) image that is a near-duplicate of a reference "
            "(validation) image: SIFT features, a VLAD shortlist, exact descriptor matching "
            "with the ratio test, geometric verification. Writes OUT/duplicates.csv, "
            "OUT/keep.txt, OUT/failed.txt, OUT/report.md and OUT/matches/*.png. Resumable: "
            "run the same command again to continue. Several processes: --shard i/n each "
            "(the last to finish writes the outputs) or torchrun --nproc-per-node N."
        ),
    )
    g = p.add_argument_group("data")
    g.add_argument("--query", required=True, type=_existing_dir, help="gallery image folder")
    g.add_argument("--reference", required=True, type=_existing_dir, help="validation folder")
    g.add_argument("--out", required=True, help="output folder (created; holds all state)")
    g = p.add_argument_group("extraction")
    g.add_argument("--max-side", type=_positive_int, default=640, help="resize longest side")
    g.add_argument("--max-keypoints", type=_positive_int, default=512, help="strongest K")
    g.add_argument("--root-sift", action="store_true", help="RootSIFT descriptors")
    g.add_argument("--no-flip", action="store_true", help="do not also match mirrored query images")
    g.add_argument("--shard-size", type=_positive_int, default=1000, help="images per shard")
    g.add_argument(
        "--workers", type=_nonneg_int, default=None, help="SIFT processes (default: CPU count)"
    )
    g = p.add_argument_group("shortlist")
    g.add_argument("--exhaustive", action="store_true", help="verify all pairs (small sets only)")
    g.add_argument(
        "--shortlist-k",
        type=_positive_int,
        default=5,
        help="reference images verified per query entry",
    )
    g.add_argument("--clusters", type=_positive_int, default=64, help="VLAD codebook size")
    g.add_argument(
        "--vlad-dim", type=_nonneg_int, default=256, help="PCA dimension of VLAD (0: none)"
    )
    g.add_argument(
        "--query-embeddings",
        type=_existing_file,
        help=".npy, one row per query image in sorted path order (replaces VLAD)",
    )
    g.add_argument(
        "--reference-embeddings", type=_existing_file, help=".npy for the reference images"
    )
    g = p.add_argument_group("verification")
    g.add_argument("--ratio", type=_ratio, default=0.8, help="Lowe's ratio test threshold")
    g.add_argument("--mutual", action="store_true", help="also require mutual nearest neighbours")
    g.add_argument("--min-matches", type=_positive_int, default=12, help="before geometry")
    g.add_argument("--min-inliers", type=_positive_int, default=12, help="to flag a pair")
    g.add_argument("--geometry", choices=("similarity", "homography", "none"), default="similarity")
    g.add_argument("--reproj-px", type=_positive_float, default=6.0, help="RANSAC tolerance")
    g = p.add_argument_group("execution")
    _add_shard(g)
    _add_device(g)
    g.add_argument("--backend", default=None, help="ssld_kernels backend (default: auto)")
    g.add_argument("--pictures", type=_nonneg_int, default=8, help="strongest pairs to draw")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_dedup)


def _cmd_dedup(args) -> int:
    from ssld.dedup.extract import ExtractConfig
    from ssld.dedup.pipeline import DedupConfig, run_dedup, write_outputs
    from ssld.dedup.verify import VerifyConfig

    if (args.query_embeddings is None) != (args.reference_embeddings is None):
        raise UsageError("argument --query-embeddings/--reference-embeddings: give both or neither")
    if args.exhaustive and args.query_embeddings:
        raise UsageError("argument --exhaustive: not allowed with --query-embeddings")
    shortlist = (
        "exhaustive" if args.exhaustive else "embeddings" if args.query_embeddings else "vlad"
    )
    cfg = DedupConfig(
        extract=ExtractConfig(
            max_side=args.max_side,
            max_keypoints=args.max_keypoints,
            root_sift=args.root_sift,
            shard_size=args.shard_size,
        ),
        flip=not args.no_flip,
        shortlist=shortlist,
        shortlist_k=args.shortlist_k,
        clusters=args.clusters,
        vlad_dim=args.vlad_dim,
        verify=VerifyConfig(
            ratio=args.ratio,
            mutual=args.mutual,
            min_matches=args.min_matches,
            min_inliers=args.min_inliers,
            geometry=args.geometry,
            reproj_px=args.reproj_px,
        ),
        pictures=args.pictures,
    )
    launch = _launch(args)
    distributed, shard, device = launch.distributed, launch.shard, launch.device
    if args.backend is not None:
        from ssld_kernels._backends import BACKENDS

        if args.backend not in ("auto",) + BACKENDS:
            raise UsageError(f"argument --backend: expected one of {BACKENDS}, got {args.backend}")
    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    if distributed:
        workers = max(1, workers // launch.world)
    embeddings = (
        (args.query_embeddings, args.reference_embeddings) if args.query_embeddings else None
    )
    common = dict(device=device, backend=args.backend)
    summary = run_dedup(
        args.query,
        args.reference,
        args.out,
        cfg,
        shard=shard,
        workers=workers,
        progress=not args.quiet,
        embeddings=embeddings,
        write_report=not distributed,
        **common,
    )
    if distributed:
        _rank0_after_all(
            launch,
            summary,
            lambda: write_outputs(args.query, args.reference, args.out, cfg, **common),
        )
    if summary.get("written"):
        print(
            f"{summary['flagged_images']} of {summary['query_images']} query images flagged "
            f"({summary['duplicate_pairs']} pairs); kept {summary['kept_images']}: "
            f"{os.path.join(args.out, 'keep.txt')}, report: {os.path.join(args.out, 'report.md')}"
        )
    return 0


def _three_floats(text: str) -> tuple:
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return vals


def _add_select(sub) -> None:
    p = sub.add_parser(
        "select",
        help="per teacher class, keep the K gallery images the teacher is surest of",
        description=(
            "Classify every gallery image with the frozen teacher (class = argmax, score = "
            "its softmax probability) and write FILE (path,class,score): per class the K "
            "highest scores, ties to the lexicographically smaller path. Streaming, "
            "resumable (rerun the same command after a kill), shardable (--shard i/n, or "
            "torchrun; --merge combines finished parts)."
        ),
    )
    g = p.add_argument_group("data")
    g.add_argument("--gallery", required=True, help="image folder, or a text file of paths")
    g.add_argument("--root", type=_existing_dir, help="folder the paths of a list are relative to")
    g.add_argument("--k", required=True, type=_positive_int, help="images kept per class")
    g.add_argument("--out", required=True, help="output CSV FILE (siblings FILE.*)")
    g.add_argument(
        "--exclude",
        action="append",
        default=[],
        type=_existing_file,
        help="dedup duplicates.csv or keep.txt, or a list of paths to drop (repeatable)",
    )
    g.add_argument(
        "--keep", action="append", default=[], type=_existing_file, help="list of paths to keep"
    )
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", help="timm name, TorchScript file or module:callable")
    g.add_argument("--teacher-weights", type=_existing_file, help="local weights file")
    g.add_argument("--num-classes", type=_positive_int, help="classes of a timm teacher")
    g.add_argument("--input-size", type=_positive_int, default=224)
    g.add_argument("--crop-pct", type=_ratio, default=0.875, help="resize = size / crop-pct")
    g.add_argument(
        "--interpolation", choices=("bilinear", "bicubic", "area", "nearest"), default="bilinear"
    )
    g.add_argument("--mean", type=_three_floats, default=(0.485, 0.456, 0.406))
    g.add_argument("--std", type=_three_floats, default=(0.229, 0.224, 0.225))
    g = p.add_argument_group("execution")
    g.add_argument("--batch-size", type=_positive_int, default=256)
    g.add_argument("--workers", type=_nonneg_int, default=None, help="decoding processes")
    _add_device(g)
    g.add_argument("--no-amp", action="store_true", help="fp32 instead of bf16 autocast on GPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the teacher")
    g.add_argument("--topm", type=_nonneg_int, default=0, help="save top-m probabilities")
    g.add_argument("--checkpoint-seconds", type=_positive_float, default=300.0)
    g.add_argument("--max-batches", type=_positive_int, help="stop after N batches (resumable)")
    _add_shard(g)
    g.add_argument("--merge", action="store_true", help="only merge finished shard parts")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_select)


def _cmd_select(args) -> int:
    from ssld import select as sel
    from ssld.data import EvalTransform
    from ssld.teacher import TeacherError, load_model

    paths, root = sel.gallery_paths(args.gallery, args.root)
    paths, dropped = sel.apply_exclusions(paths, args.exclude, args.keep)
    if not paths:
        raise UsageError(f"argument --gallery: no images left in {args.gallery}")
    if args.merge:
        n = sel.find_shard_count(args.out)
        counts = sel.merge(args.out, n, paths)
        print(f"merged {n} parts: {counts['selected']} images selected -> {args.out}")
        return 0
    if not args.teacher:
        raise UsageError("argument --teacher: required (unless --merge)")
    try:
        kwargs = {"num_classes": args.num_classes} if args.num_classes else {}
        teacher = load_model(args.teacher, args.teacher_weights, **kwargs)
    except TeacherError as e:
        raise UsageError(f"argument --teacher: {e}") from None
    try:
        transform = EvalTransform(args.input_size, args.crop_pct, args.interpolation)
        cfg = sel.SelectConfig(
            k=args.k,
            batch_size=args.batch_size,
            topm=args.topm,
            transform=transform,
            mean=args.mean,
            std=args.std,
            amp=not args.no_amp,
            compile=args.compile,
            checkpoint_seconds=args.checkpoint_seconds,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    launch = _launch(args)
    distributed, shard, device = launch.distributed, launch.shard, launch.device
    workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    teacher_id = args.teacher + (
        f"@{os.path.abspath(args.teacher_weights)}" if args.teacher_weights else ""
    )
    if dropped:
        print(f"{dropped} gallery images excluded; {len(paths)} remain")
    summary = sel.run_select(
        teacher,
        paths,
        root,
        args.out,
        cfg,
        teacher_id=teacher_id,
        shard=shard,
        device=device,
        workers=workers,
        progress=not args.quiet,
        write_output=not distributed,
        max_batches=args.max_batches,
    )
    if distributed:
        _rank0_after_all(launch, summary, lambda: sel.merge(args.out, launch.world, paths))
    if summary.get("written"):
        print(
            f"{summary['selected']} images selected over {summary['classes']} classes "
            f"({summary['classes_full']} with the full {args.k}; {summary['failed']} unreadable)"
            f" -> {args.out}"
        )
    return 0


def _add_train(sub) -> None:
    for name, help_text in (
        ("train", "distil the student from the teacher on T ∪ U (a YAML recipe)"),
        ("finetune", "finetune the distilled student on T only"),
    ):
        p = sub.add_parser(
            name,
            help=help_text,
            description=(
                f"{help_text}. Settings come from --config (see configs/) and key=value "
                "overrides such as optim.lr=0.05 run.out=runs/x. Rerun with --resume to "
                "continue an interrupted run at its last checkpoint; torchrun for many GPUs."
            ),
        )
        _add_config(p)
        p.add_argument("--resume", action="store_true", help="continue OUT/last.pt")
        p.add_argument(
            "--init",
            type=_existing_file,
            help="student weights to start from (finetune: default OUT/student.pt of training)",
        )
        p.set_defaults(func=_cmd_train, mode=name)
    p = sub.add_parser(
        "eval",
        help="top-1/top-5 of a student checkpoint on a validation folder",
        description=(
            "Top-1/top-5 of the student of --config (with key=value overrides) holding the "
            "weights of --checkpoint (OUT/student.pt, or a training checkpoint OUT/last.pt: its "
            "EMA weights when kept) on a folder with one subfolder per class: --val, else "
            "data.val, else the data.val of the run that wrote the checkpoint (its folder's "
            "config.json). Needs only the student and the images: no teacher, no training "
            "data, no augmentation library. Prints the result, as JSON on its last line."
        ),
    )
    _add_config(p, help="YAML recipe (student and data)")
    p.add_argument("--checkpoint", required=True, type=_existing_file, help="student weights")
    p.add_argument("--val", type=_existing_dir, help="folder with class subfolders")
    p.add_argument("--out", help="also write the result to this JSON file")
    _add_device(p, default=None, help=f"{_DEVICE_HELP} (default: run.device)")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument(
        "--workers",
        type=_nonneg_int,
        default=None,
        help="decoding processes (default: data.workers)",
    )
    p.set_defaults(func=_cmd_eval)


def _load_train_config(args, extra=(), stage="train"):
    from ssld.config import ConfigError, load_config

    try:
        return load_config(args.config, list(args.overrides) + list(extra), stage=stage)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def _cmd_train(args) -> int:
    from ssld.config import ConfigError, finetune_config
    from ssld.train import Trainer

    cfg = _load_train_config(args, stage=args.mode)
    init = args.init
    try:
        if args.mode == "finetune":
            if init is None:
                default = os.path.join(cfg.run.out, "student.pt")
                if not os.path.isfile(default):
                    raise UsageError(
                        f"argument --init: no student weights given and {default} does not exist"
                    )
                init = default
            cfg = finetune_config(cfg)
        trainer = Trainer(cfg, mode=args.mode, init=init, resume=args.resume)
        result = trainer.fit()
    except ConfigError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(result))
    return 0


def _cmd_eval(args) -> int:
    from ssld._io import atomic_write_json
    from ssld.config import ConfigError, replace
    from ssld.train.evaluate import evaluate_checkpoint, run_val_folder

    extra = [f"data.val={args.val}"] if args.val else []
    cfg = _load_train_config(args, extra, stage="eval")
    if cfg.data.val is None:
        val = run_val_folder(args.checkpoint)
        if val is None or not os.path.isdir(val):
            raise UsageError(
                "argument --val: no validation folder (give --val or data.val; the checkpoint's "
                "run folder names none)"
            )
        print(f"validation folder of the run that wrote {args.checkpoint}: {val}", file=sys.stderr)
        cfg = replace(cfg, **{"data.val": val})
    device = resolve_device(args.device or cfg.run.device)
    try:
        res = evaluate_checkpoint(
            cfg, args.checkpoint, device=device, batch_size=args.batch_size, workers=args.workers
        )
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_json(args.out, res)
    print(
        f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  ({res['images']} images of "
        f"{res['val']})"
    )
    print(json.dumps(res))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole SSLD pipeline in miniature on shipped real data (minutes on a CPU)",
        description=(
            "Dedup on scikit-image photos, a teacher trained on a few labeled handwritten "
            "digits, `ssld select` on the unlabeled rest, and a student trained four ways "
            "(labels; SSLD on T; SSLD on T + U; + finetune), over several seeds. Writes "
            "OUT/results.json and OUT/report.md. --ablation runs the paper's ablations."
        ),
    )
    p.add_argument("--out", default="ssld-demo", help="output folder (default: ssld-demo)")
    _add_device(p, default="cpu", help="cpu, cuda or cuda:i")
    p.add_argument("--seeds", type=_positive_int, default=None, help="default 5 (ablation 3)")
    p.add_argument("--ablation", action="store_true", help="the paper's ablations instead")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from ssld.demo import run_demo

    device = resolve_device(args.device)
    for mod, pkg in (("sklearn", "scikit-learn"), ("skimage", "scikit-image"), ("cv2", "opencv")):
        try:
            __import__(mod)
        except ImportError:
            raise UsageError(f"the demo needs {pkg}: pip install {pkg}") from None
    run_demo(args.out, str(device), args.seeds, args.quick, args.ablation)
    report = "ablation.md" if args.ablation else "report.md"
    print(f"results: {os.path.join(args.out, report)}")
    return 0


_DEBUG_HELP = "show the traceback of a failure instead of a one-line error"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ssld",
        description=(
            "SSLD: distil an image backbone from a frozen teacher's softmax (JSD, no labels) "
            "on labeled + teacher-selected unlabeled images."
        ),
    )
    parser.add_argument("--version", action="version", version=f"ssld {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    info = sub.add_parser("info", help="versions and available kernel backends")
    info.set_defaults(func=_cmd_info)
    _add_dedup(sub)
    _add_select(sub)
    _add_train(sub)
    _add_demo(sub)
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    for p in sub.choices.values():  # also after the sub-command; SUPPRESS keeps the above
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


_INTERRUPT_HINTS = {
    "train": "; rerun with --resume to continue from the last checkpoint",
    "finetune": "; rerun with --resume to continue from the last checkpoint",
    "dedup": "; rerun the same command to resume",
    "select": "; rerun the same command to resume",
}


def _one_line(e: BaseException, limit: int = 500) -> str:
    """The exception's message on one line (whitespace collapsed, at most ``limit`` chars);
    the type name in front when it is not one of ssld's own errors."""
    msg = " ".join(str(e).split()) or "(no message)"
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    if not type(e).__module__.startswith("ssld"):
        msg = f"{type(e).__name__}: {msg}"
    if isinstance(e, MemoryError) or "out of memory" in msg.lower():
        msg += " (a smaller batch size may fit)"
    return msg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("SSLD_DEBUG", "") not in ("", "0")
    prog = f"ssld {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        parser.exit(130, f"{prog}: interrupted{_INTERRUPT_HINTS.get(args.command, '')}\n")
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        # bad arguments, configuration keys and inputs (ConfigError and TeacherError are
        # ValueErrors; the pipeline's own checks of its inputs raise ValueError)
        if debug:
            raise
        parser.exit(2, f"{prog}: error: {' '.join(str(e).split())}\n")
    except Exception as e:  # noqa: BLE001 - a failure while running: one line, exit 1
        if debug:
            raise
        parser.exit(1, f"{prog}: error: {_one_line(e)} (--debug shows the traceback)\n")


if __name__ == "__main__":
    sys.exit(main())
