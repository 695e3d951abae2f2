"""Command line for long runs in the background and for the book.

``python -m hawqlib train``: the FP32 baseline; ``python -m hawqlib finetune``: the fine-tuning runs of
the ResNet20 table and the ablation (:mod:`hawqlib.experiments`); ``python -m hawqlib book``: execute
the notebooks and build the book (:mod:`hawqlib.book`); ``python -m hawqlib seal``: record the file
digests of artifacts written before they were recorded (:func:`hawqlib.runs.seal`). Every long run
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


def _train(args: argparse.Namespace) -> int:
    from . import pipeline

    cfg = profiles.get(args.profile)["baseline"]
    for key in ("epochs", "batch_size", "lr", "weight_decay", "seed", "eval_every"):
        val = getattr(args, key)
        if val is not None:
            cfg[key] = val
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    _, log, folder = pipeline.baseline(cfg, args.model, args.data, progress=True)
    last = log["epochs"][-1]
    print(f"done: {folder} (test top-1 {last.get('val_top1', float('nan')):.2f}%)\n"
          f"  weights {folder / 'model.pt'}\n  epoch log {folder / 'log.json'}\n"
          f"  checkpoint {folder / 'checkpoint.pt'}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    import time

    from . import experiments, pipeline

    P = profiles.get(args.profile)
    try:  # checked before the (possibly hours-long) baseline and spectrum are loaded or computed
        experiments.check_names(P, args.rows)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"profile {P['name']!r}: loading (or training) the FP32 baseline", flush=True)
    model, _, folder = pipeline.baseline(P["baseline"], data_root=args.data, progress=True)
    print(f"baseline {folder}; loading (or computing) its spectrum", flush=True)
    spectra, sfolder = pipeline.spectrum(model, folder.name, P["hessian"], P["allocation"]["granularity"],
                                         vectors=True, data_root=args.data, progress=True)
    specs = experiments.run_specs(model, spectra, P, args.rows or None)  # builds only the runs asked for
    # Every run's first seed before any second one, so that each row has a value early.
    jobs = sorted(((i, k, name, seed) for k, name in enumerate(specs)
                   for i, seed in enumerate(args.seeds or experiments.seeds(P, name))))
    for _, _, name, seed in jobs:
        spec = specs[name]
        print(f"{name} (seed {seed}): {spec.description}", flush=True)
        t0 = time.perf_counter()
        r = experiments.run(model, folder.name, spec, P, seed=seed, spectrum_key=sfolder.name, progress=True,
                            data_root=args.data)
        print(f"{name} (seed {seed}): test top-1 {r.top1:.2f}% (from the packed file {r.packed_top1:.2f}%), "
              f"packed {r.packed_bytes:,} bytes, fine-tuning {r.wall_s / 60:.1f} min in all "
              f"({time.perf_counter() - t0:.0f} s this call)\n  {r.folder}", flush=True)
    return 0


def _seal(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import runs

    if bool(args.folders) == bool(args.all):
        raise ValueError("name the artifact folders to seal, or pass --all (every folder under "
                         f"{runs.artifacts_root()} whose manifest records no digests), not both")
    folders = runs.seal_all(args.root) if args.all else [Path(f) for f in args.folders]
    for f in ([] if args.all else folders):
        runs.seal(f)
    for f in folders:
        print(f"sealed: {f}")
    if not folders:
        print("nothing to seal: every manifest records its file digests")
    return 0


def _user_errors() -> tuple:
    """Exceptions that report a user's or a file's problem: one line at the command line, no traceback."""
    from .data import DataNotFoundError
    from .runs import ArtifactError
    from .storage import FolderBusyError
    from .train import CheckpointError, NonFiniteLossError

    return (ValueError, DataNotFoundError, FileNotFoundError, ArtifactError, FolderBusyError, CheckpointError,
            NonFiniteLossError)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command."""
    p = argparse.ArgumentParser(prog="python -m hawqlib", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) the FP32 baseline of a profile; prints where "
                                     "checkpoints and the epoch log go")
    t.add_argument("--profile", default=profiles.current(), choices=sorted(profiles.PROFILES))
    t.add_argument("--model", default="resnet20", choices=["resnet20"])
    t.add_argument("--data", default=None, help="CIFAR-10 root (default: HAWQ_DATA, then data/)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--eval-every", type=int)
    t.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's choice)")
    t.set_defaults(func=_train)
    f = sub.add_parser("finetune", help="fine-tune (or resume, or load) the runs of the ResNet20 table and "
                                        "the ablation; prints each run's accuracy, size and folder")
    f.add_argument("rows", nargs="*", metavar="RUN",
                   help="runs to compute (default: all; e.g. hawq hawq-strict W2A4 alloc-reverse); every run's "
                        "first seed comes before any second one")
    f.add_argument("--profile", default=profiles.current(), choices=sorted(profiles.PROFILES))
    f.add_argument("--data", default=None, help="CIFAR-10 root (default: HAWQ_DATA, then data/)")
    f.add_argument("--seeds", type=_seed, nargs="+", default=None, metavar="SEED",
                   help="fine-tuning seeds of every run named (default: each run's seeds in the profile)")
    f.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's choice)")
    f.set_defaults(func=_finetune)
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
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
