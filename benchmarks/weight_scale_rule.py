"""Weight scale rules side by side: least squared error ("mse", hawqlib's default) against max |w|.

Not a speed benchmark: the measurement behind the scale rule chosen in :mod:`hawqlib.quant.grids`.
On one ResNet20 (the newest baseline checkpoint under ``data/artifacts``, read-only), in one process:

1. per bit width, the squared quantization error of all Conv2d/Linear weights under each rule, and the
   fraction of weights the least-squares rule clips (beyond the grid's top level; the max rule clips none);
2. a short quantization-aware fine-tuning under each rule from the same weights: 2-bit weights (8-bit
   first and last layer), 4-bit activations, ``--epochs`` epochs on ``--train`` training images,
   lr 0.01 cosine, evaluated on ``--test`` test images.

    python benchmarks/weight_scale_rule.py [--epochs 2] [--train 10000] [--test 2000] [--threads 1]
"""
from __future__ import annotations

import argparse
import glob
import os
import time

import torch

from hawqlib.repro import data as D
from hawqlib.finetune import direct_finetune
from hawqlib.models import resnet20
from hawqlib.quant import BitConfig, quant_scale, quantize_tensor, weight_code_limit
from hawqlib.train import evaluate, load_weights

RULES = ("mse", "max")


def benchmark_args(doc: str) -> argparse.Namespace:
    """The options shared by the rule benchmarks (epochs, training/test images, threads); sets the threads."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train", type=int, default=10000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def newest_baseline() -> torch.nn.Module:
    """The newest baseline ResNet20 under ``data/artifacts`` (checkpoint or final model) in eval mode; prints it."""
    found = sorted(glob.glob("data/artifacts/baseline_resnet20-*/checkpoint.pt"), key=os.path.getmtime)
    found += sorted(glob.glob("data/artifacts/baseline_resnet20-*/model.pt"), key=os.path.getmtime)
    if not found:
        raise SystemExit("no baseline checkpoint under data/artifacts (run: python -m hawqlib train --profile cpu)")
    path = found[-1]
    model = resnet20()
    if path.endswith("model.pt"):  # a sealed artifact: its manifest vouches for the file (read-only)
        from hawqlib.repro import artifacts
        artifacts.verify(os.path.dirname(path))
        load_weights(model, path, require_digest=False)
    else:  # an unfinished run's checkpoint records its own digest
        load_weights(model, path)
    model.eval()
    ck = torch.load(path, map_location="cpu", weights_only=True)
    epoch = len(ck["history"]) if isinstance(ck, dict) and "history" in ck else "final"
    print(f"weights: {path} (epoch {epoch}); torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    return model


def main() -> None:
    args = benchmark_args(__doc__)
    model = newest_baseline()

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    print("\nbits | squared error mse / max | weights clipped by mse")
    for bits in (2, 3, 4, 8):
        err, clipped, count = {r: 0.0 for r in RULES}, 0, 0
        for _, m in layers:
            w = m.weight.detach()
            for r in RULES:
                q = quantize_tensor(w, bits, rule=r)
                err[r] += float((q - w).double().pow(2).sum())
            top = weight_code_limit(bits) * quant_scale(w, bits).view(-1, *([1] * (w.dim() - 1)))
            clipped += int((w.abs() > top).sum())
            count += w.numel()
        print(f"{bits:4d} | {err['mse'] / err['max']:23.3f} | {clipped / count:.2%}")

    tr, te = D.cifar10_loaders(batch_size=128, train_subset=args.train, test_subset=args.test, seed=0)
    first, last = layers[0][0], layers[-1][0]
    bc = BitConfig({n: (8 if n in (first, last) else 2) for n, _ in layers}, act_bits=4, granularity="layer")
    print(f"\nFP32 top-1 on {args.test} test images: {evaluate(model, te)['top1']:.2f}%")
    print(f"fine-tuning: 2-bit weights (8-bit {first} and {last}), 4-bit activations, {args.epochs} epoch(s) "
          f"on {args.train} images")
    for r in RULES:
        t = time.perf_counter()
        _, hist = direct_finetune(model, bc, tr, te, epochs=args.epochs, lr=0.01, progress=False, seed=0,
                                  weight_rule=r)
        before = hist["stages"][0]["before"]["val_top1"]
        after = [round(e["val_top1"], 2) for e in hist["epochs"]]
        print(f"  {r}: top-1 right after quantizing {before:.2f}%, after each epoch {after} "
              f"({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
