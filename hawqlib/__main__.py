"""Command line: ``python -m hawqlib train ...`` for long runs in the background."""
from __future__ import annotations

import argparse
import sys

from . import profiles


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
    t.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    t.set_defaults(func=_train)
    from . import book

    b = sub.add_parser("book", help="execute the notebooks with papermill and build the Jupyter Book; "
                                    "prints the path of the built index.html")
    book.add_arguments(b)
    b.set_defaults(func=book.cli)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
