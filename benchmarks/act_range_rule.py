"""Activation range rules side by side: least squared error ("mse", hawqlib's default) against min/max.

Not a speed benchmark: the measurement behind the activation range rule chosen in :mod:`hawqlib.quant.observer`.
On one ResNet20 (the newest baseline checkpoint under ``data/artifacts``, read-only), in one process:

1. 4-bit activations (weights left at 8 bits), ranges calibrated on 4 training batches under each rule:
   the squared quantization error of all quantized activations of those batches, the fraction of them
   clipped, and the test top-1 right after calibration;
2. a short quantization-aware fine-tuning under each rule from the same weights: 2-bit weights (8-bit
   first and last layer), 4-bit activations, ``--epochs`` epochs on ``--train`` training images,
   lr 0.01 cosine, evaluated on ``--test`` test images.

    python benchmarks/act_range_rule.py [--epochs 2] [--train 10000] [--test 2000] [--threads 1]
"""
from __future__ import annotations

import time

import torch

from hawqlib.repro import data as D
from hawqlib.finetune import direct_finetune
from hawqlib.quant import BitConfig, QuantAct, calibrate_activations, quantize_model
from hawqlib.train import evaluate
from weight_scale_rule import benchmark_args, newest_baseline   # run from the repository root

RULES = ("mse", "minmax")


def _act_error(qmodel, batches) -> tuple[float, float, int]:
    """Squared error and clipped fraction of every enabled QuantAct's input over ``batches`` (eval mode)."""
    acts = [m for m in qmodel.modules() if isinstance(m, QuantAct)]
    tot = {"err": 0.0, "clipped": 0, "n": 0}

    def hook(m, args, out):
        x = args[0]
        tot["err"] += float((out - x).double().square().sum())
        hi = float(m.scale) * (m.quant_max - int(m.zero_point))
        tot["clipped"] += int((x > hi + 0.5 * float(m.scale)).sum())
        tot["n"] += x.numel()

    hooks = [a.register_forward_hook(hook) for a in acts]
    qmodel.eval()
    with torch.no_grad():
        for x, _ in batches:
            qmodel(x)
    for h in hooks:
        h.remove()
    return tot["err"], tot["clipped"] / tot["n"], tot["n"]


def main() -> None:
    args = benchmark_args(__doc__)
    model = newest_baseline()

    tr, te = D.cifar10_loaders(batch_size=128, train_subset=args.train, test_subset=args.test, seed=0)
    tr.set_epoch(0)
    calib = [b for _, b in zip(range(4), tr)]
    print(f"FP32 top-1 on {args.test} test images: {evaluate(model, te)['top1']:.2f}%")
    print("\n8-bit weights, 4-bit activations, ranges calibrated on 4 batches of 128:")
    print("rule   | squared error (sum) | clipped | top-1 after calibration")
    w8 = BitConfig.uniform(model, 8, act_bits=4, granularity="layer")
    for r in RULES:
        q = quantize_model(model, w8, act_rule=r)
        calibrate_activations(q, calib)
        err, clipped, n = _act_error(q, calib)
        print(f"{r:6s} | {err:19.1f} | {clipped:7.2%} | {evaluate(q, te)['top1']:.2f}%   ({n:,} activations)")

    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    first, last = layers[0], layers[-1]
    bc = BitConfig({n: (8 if n in (first, last) else 2) for n in layers}, act_bits=4, granularity="layer")
    print(f"\nfine-tuning: 2-bit weights (8-bit {first} and {last}), 4-bit activations, {args.epochs} epoch(s) "
          f"on {args.train} images")
    for r in RULES:
        t = time.perf_counter()
        _, hist = direct_finetune(model, bc, tr, te, epochs=args.epochs, lr=0.01, progress=False, seed=0,
                                  act_rule=r)
        before = hist["stages"][0]["before"]["val_top1"]
        after = [round(e["val_top1"], 2) for e in hist["epochs"]]
        print(f"  {r}: top-1 right after quantizing {before:.2f}%, after each epoch {after} "
              f"({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
