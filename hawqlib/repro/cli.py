"""Command line for long runs in the background and for the book.

``python -m hawqlib train``: the FP32 baseline; ``python -m hawqlib finetune``: the fine-tuning runs of
the ResNet20 table and the ablation (:mod:`hawqlib.repro.experiments`), through :class:`hawqlib.repro.study.Study`. Both
take ``--model`` and ``--data``: ResNet20 on CIFAR-10, or one of the paper's ImageNet models on an
ImageFolder tree (with ``--weights`` for published FP32 weights), and both run data-parallel under
``torchrun`` (:mod:`hawqlib.distributed`; rank 0 writes the artifacts). ``python -m hawqlib book``: execute
the notebooks and build the book (:mod:`hawqlib.repro.book`); ``python -m hawqlib seal``: record the file
digests of artifacts written before they were recorded (:func:`hawqlib.repro.artifacts.manifest.seal`). Every long run
checkpoints and resumes. A user error (bad option, missing or corrupt data or artifact, a run
already in progress) prints one line and exits with status 1.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import profiles


def _threads(text: str) -> int:
    """argparse type of ``--threads``: a whole number in 0..os.cpu_count() (0: torch's choice)."""
    top = os.cpu_count() or 1
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= top:
        raise argparse.ArgumentTypeError(f"must be a whole number in 0..{top} (this machine's CPUs; 0: torch's "
                                         f"choice), got {text!r}")
    return n


def _seed(text: str) -> int:
    """argparse type of ``--seeds``: a whole number >= 0."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return n


def _source_options(args: argparse.Namespace) -> dict:
    """The ImageFolder options given on the command line (``--image-size``, ``--workers``)."""
    return {k: v for k, v in (("image_size", args.image_size), ("workers", args.workers)) if v is not None}


def _study(args: argparse.Namespace):
    """The :class:`hawqlib.repro.study.Study` of the command's profile, model, data and weights."""
    from .study import Study

    return Study(args.profile, args.data, args.model, progress=True, weights=args.weights, **_source_options(args))


def _train(args: argparse.Namespace) -> int:
    from .. import distributed
    from . import paths, sources
    from .baseline import baseline

    paths.use_profile(args.profile)  # a non-published profile stores under data/scratch/<name>
    cfg = profiles.for_model(profiles.get(args.profile), args.model)["baseline"]
    for key in ("epochs", "batch_size", "lr", "weight_decay", "seed", "eval_every"):
        val = getattr(args, key)
        if val is not None:
            cfg[key] = val
    source = sources.for_model(args.model, args.data, **_source_options(args))
    _, log, folder = baseline(cfg, args.model, source, progress=True, weights=args.weights)
    last = log["epochs"][-1]
    if distributed.is_main():
        print(f"done: {folder} (test top-1 {last.get('val_top1', float('nan')):.2f}%)\n"
              f"  weights {folder / 'model.pt'}\n  epoch log {folder / 'log.json'}" +
              ("" if args.weights else f"\n  checkpoint {folder / 'checkpoint.pt'}"))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    import time

    from .. import distributed
    from . import experiments, paths

    paths.use_profile(args.profile)  # a non-published profile stores under data/scratch/<name>
    say = print if distributed.is_main() else (lambda *a, **k: None)
    try:  # checked before the (possibly hours-long) baseline and spectrum are loaded or computed
        experiments.check_names(profiles.get(args.profile), args.rows)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    study = _study(args)
    say(f"{study!r}: loading (or training) the FP32 baseline", flush=True)
    folder = study.folder
    say(f"baseline {folder}; loading (or computing) its spectrum", flush=True)
    specs = study.specs(args.rows or None)  # builds only the runs asked for
    # Every run's first seed before any second one, so that each row has a value early; the gap attempts
    # (extensions beyond the paper, hawqlib.repro.experiments) after every seed of the table's and the ablation's runs.
    jobs = sorted(((bool(specs[name].schedule), i, k, name, seed) for k, name in enumerate(specs)
                   for i, seed in enumerate(args.seeds or experiments.seeds(study.P, name))))
    for *_, name, seed in jobs:
        say(f"{name} (seed {seed}): {specs[name].description}; "
            f"{experiments.epochs(study.P, specs[name])} fine-tuning epochs", flush=True)
        t0 = time.perf_counter()
        r = study.run(name, seed)
        say(f"{name} (seed {seed}): test top-1 {r.top1:.2f}% (from the packed file {r.packed_top1:.2f}%), "
            f"packed {r.packed_bytes:,} bytes, fine-tuning {r.wall_s / 60:.1f} min in all "
            f"({time.perf_counter() - t0:.0f} s this call)\n  {r.folder}", flush=True)
    return 0


def _add_model_and_data(p: argparse.ArgumentParser) -> None:
    """The options ``train`` and ``finetune`` share: the model, its data and its FP32 weights."""
    from ..models import names

    p.add_argument("--profile", default=profiles.current(), choices=sorted(profiles.PROFILES))
    p.add_argument("--model", default="resnet20", choices=names(),
                   help="resnet20 (CIFAR-10) or one of the paper's ImageNet models (an ImageFolder tree as --data)")
    p.add_argument("--data", default=None, help="CIFAR-10's root (default: HAWQ_DATA, then data/) for resnet20; "
                                                "for an ImageNet model an ImageFolder root with train/ and val/")
    p.add_argument("--weights", default=None, help="an FP32 weights file taken as the baseline instead of training, "
                                                   "or 'pretrained': the published ImageNet weights, found and "
                                                   "checked by hash (README, 'Data')")
    p.add_argument("--image-size", type=int, default=None,
                   help="ImageFolder data: crop side in pixels (default: the model's, 224 or 299)")
    p.add_argument("--workers", type=int, default=None, help="ImageFolder data: decoding processes per loader")
    p.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's choice)")


# --- python -m hawqlib quantize: the front door (hawqlib.quantize) on a user's model ---------------------------

def _load_callable(spec: str, what: str):
    """The callable named by ``module:attr`` (``attr`` may be dotted); SystemExit with the reason otherwise."""
    import importlib

    mod, sep, attr = spec.partition(":")
    if not (sep and mod and attr):
        raise SystemExit(f"{what} must be 'module:callable' (e.g. mypkg.nets:build), got {spec!r}")
    try:
        obj = importlib.import_module(mod)
    except ImportError as exc:
        raise SystemExit(f"{what}: cannot import {mod!r} ({exc}); is its folder on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"{what}: {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SystemExit(f"{what}: {spec!r} is not callable")
    return obj


def _act_bits(text: str) -> int | None:
    """argparse type of ``--act-bits``: 1..8, or 'none' (FP32 activations)."""
    if text.lower() == "none":
        return None
    if not (text.isdigit() and 1 <= int(text) <= 8):
        raise argparse.ArgumentTypeError(f"must be a whole number in 1..8 or 'none', got {text!r}")
    return int(text)


def _quantize(args: argparse.Namespace) -> int:
    import json
    import shutil
    from pathlib import Path

    from ..files import atomic_write
    from .. import workflow
    from ..models import load_weights_file

    build = _load_callable(args.model, "model")
    data = _load_callable(args.data, "--data")
    model = build()
    if args.weights:
        load_weights_file(model, args.weights)
    made = data()
    first = made[0] if isinstance(made, tuple) and len(made) == 2 else None
    pair = first is not None and not hasattr(first, "shape") and not (  # not an (x, y) batch, nor a batch list
        isinstance(first, (tuple, list)) and len(first) == 2 and hasattr(first[0], "shape"))
    train_data, val_data = made if pair else (made, None)
    schedule = False if args.no_finetune else {k: v for k, v in (
        ("stages", args.stages), ("epochs_per_stage", args.epochs_per_stage), ("lr", args.lr)) if v is not None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if schedule is not False:
        schedule["checkpoint_dir"] = str(out / "run")
    try:
        _, report = workflow.quantize(
            model, train_data, target_compression=args.target_compression, target_size_mb=args.target_size_mb,
            measure=args.measure, act_bits=args.act_bits, choices=tuple(args.choices), finetune=schedule,
            val_data=val_data, device=args.device, seed=args.seed, packed_path=out / "model.hawq",
            progress=not args.quiet)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"quantize: {exc}") from None
    report.bit_config.save(out / "bit_config.json")
    atomic_write(out / "report.json", lambda f: f.write(json.dumps(report.to_dict(), indent=1) + "\n"), mode="w")
    if schedule is not False:  # the resume state served its purpose once the results are written
        shutil.rmtree(out / "run", ignore_errors=True)
    print(report.summary())
    print(f"written: {out / 'model.hawq'} (restore: hawqlib.load_packed(path, {args.model.split(':')[1]}())), "
          f"{out / 'bit_config.json'}, {out / 'report.json'}")
    return 0


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="HAWQ on your own model (hawqlib.quantize): Hessian spectra, bits under a "
                                        "budget, staged fine-tuning; writes the packed model and a report")
    q.add_argument("model", metavar="MODULE:FACTORY", help="a callable returning the FP32 nn.Module")
    q.add_argument("--weights", help="its weights (a state_dict file, or a checkpoint written by hawqlib)")
    q.add_argument("--data", required=True, metavar="MODULE:FACTORY",
                   help="a callable returning train_data or a tuple (train_data, val_data), each a re-iterable "
                        "of (x, y) batches with len(); e.g. hawqlib.repro.data:cifar10_loaders")
    budget = q.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-compression", type=float, help="FP32 size / quantized size, at least")
    budget.add_argument("--target-size-mb", type=float, help="quantized size in MB (2**20 bytes), at most")
    q.add_argument("--measure", default="weights", choices=["weights", "model"],
                   help="what the budget counts: the weights' bits alone (the paper's) or the whole model")
    q.add_argument("--act-bits", type=_act_bits, default=4,
                   help="activation bits, or 'none' for FP32 activations (default 4)")
    q.add_argument("--choices", type=int, nargs="+", default=[2, 3, 4, 8], help="bit widths a block may get")
    q.add_argument("--no-finetune", action="store_true", help="quantize and calibrate only")
    q.add_argument("--stages", type=int, help="fine-tuning stages (default: 4, at most one per block)")
    q.add_argument("--epochs-per-stage", type=int, help="epochs after each stage (default 8)")
    q.add_argument("--lr", type=float, help="SGD learning rate, cosine within each stage (default 0.01)")
    q.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: where the model is)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="folder for model.hawq, bit_config.json and report.json; while "
                                                "fine-tuning, its run/ folder holds the checkpoints that an "
                                                "interrupted command resumes from (removed on success)")
    q.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's choice)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_quantize)


def _seal(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import artifacts

    if bool(args.folders) == bool(args.all):
        raise ValueError("name the artifact folders to seal, or pass --all (every folder under "
                         f"{artifacts.artifacts_root()} whose manifest records no digests), not both")
    folders = artifacts.seal_all(args.root) if args.all else [Path(f) for f in args.folders]
    for f in ([] if args.all else folders):
        artifacts.seal(f)
    for f in folders:
        print(f"sealed: {f}")
    if not folders:
        print("nothing to seal: every manifest records its file digests")
    return 0


def _user_errors() -> tuple:
    """Exceptions that report a user's or a file's problem: one line at the command line, no traceback."""
    from .data import DataNotFoundError
    from .artifacts import ArtifactError, FolderBusyError
    from ..train import CheckpointError, NonFiniteLossError

    return (ValueError, DataNotFoundError, FileNotFoundError, ArtifactError, FolderBusyError, CheckpointError,
            NonFiniteLossError)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command."""
    p = argparse.ArgumentParser(prog="python -m hawqlib", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume, or take from --weights) the FP32 baseline of a profile; "
                                     "prints where its weights and epoch log are")
    _add_model_and_data(t)
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--eval-every", type=int)
    t.set_defaults(func=_train)
    f = sub.add_parser("finetune", help="fine-tune (or resume, or load) the runs of the ResNet20 table and "
                                        "the ablation; prints each run's accuracy, size and folder")
    f.add_argument("rows", nargs="*", metavar="RUN",
                   help="runs to compute (default: all; e.g. hawq hawq-strict W2A4 alloc-reverse); every run's "
                        "first seed comes before any second one")
    _add_model_and_data(f)
    f.add_argument("--seeds", type=_seed, nargs="+", default=None, metavar="SEED",
                   help="fine-tuning seeds of every run named (default: each run's seeds in the profile)")
    f.set_defaults(func=_finetune)
    _add_quantize(sub)
    from . import book

    b = sub.add_parser("book", help="execute the notebooks with papermill and build the Jupyter Book; "
                                    "prints the path of the built index.html")
    book.add_arguments(b)
    b.set_defaults(func=book.cli)
    s = sub.add_parser("seal", help="record the SHA-256 of every file of complete artifacts whose manifest "
                                    "has none (written before hawqlib recorded them); keys are unchanged")
    s.add_argument("folders", nargs="*", metavar="FOLDER", help="artifact folders (data/artifacts/<kind>-<key>)")
    s.add_argument("--all", action="store_true", help="every artifact folder under the artifacts root")
    s.add_argument("--root", default=None, help="artifacts root for --all (default: HAWQ_ARTIFACTS, then "
                                                "data/artifacts)")
    s.set_defaults(func=_seal)
    args = p.parse_args(argv)
    from .. import distributed

    if distributed.launched() and args.command not in ("train", "finetune"):
        print(f"error: python -m hawqlib {args.command} runs as one process; under torchrun (WORLD_SIZE > 1) only "
              "train and finetune run, data-parallel (README, 'Many GPUs or machines')", file=sys.stderr)
        return 1
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    distributed.setup()  # joins torchrun's process group; nothing without torchrun
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
