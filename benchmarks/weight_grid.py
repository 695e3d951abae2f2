"""Weight grids side by side: hawqlib's mid-rise grid (all 2**b codes) against the ternary-at-2-bits grid.

Not a speed benchmark: the measurement behind the weight grid chosen in :mod:`hawqlib.quant.grids`. The
reference is the symmetric grid with an exact zero ("restricted range", codes in
``[-(2**(b-1) - 1), 2**(b-1) - 1]``, ``2**b - 1`` levels; ternary at 2 bits), written out below with the
same least-squares scale search as hawqlib's. On one ResNet20 (the newest baseline checkpoint under
``data/artifacts``, read-only), in one process:

1. per bit width, the squared quantization error of all Conv2d/Linear weights under each grid;
2. top-1 on ``--test`` test images with the weights quantized (activations in FP32, no fine-tuning),
   at 2 bits everywhere but the first and last layer (8 bits), and at the bit configuration of the
   newest committed HAWQ fine-tuning artifact, if there is one.

    python benchmarks/weight_grid.py [--test 2000] [--threads 1]
"""
from __future__ import annotations

import copy
import glob
import os

import torch

from hawqlib.repro import data as D
from hawqlib.quant import MSE_ITERATIONS, BitConfig, quantize_tensor
from hawqlib.train import evaluate

from weight_scale_rule import benchmark_args, newest_baseline


def restricted_grid(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The reference: ``s * clamp(round(w / s), -qmax, qmax)`` per output channel, least-squares ``s``."""
    qmax = 2 ** (bits - 1) - 1
    x = w.detach().double().flatten(1)
    s = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / qmax
    for _ in range(MSE_ITERATIONS):
        k = torch.round(x / s).clamp(-qmax, qmax)
        den = (k * k).sum(1, keepdim=True)
        new = torch.where(den > 0, (x * k).sum(1, keepdim=True) / den.clamp_min(1), s)
        if torch.equal(new, s):
            break
        s = new
    s = s.float()
    return (torch.round(w / s.view(-1, *([1] * (w.dim() - 1)))).clamp(-qmax, qmax)
            * s.view(-1, *([1] * (w.dim() - 1))))


GRIDS = {"mid-rise (hawqlib)": lambda w, b: quantize_tensor(w, b), "restricted": restricted_grid}


def weights_quantized(model: torch.nn.Module, bits: dict, grid) -> torch.nn.Module:
    """A copy of ``model`` whose layers named in ``bits`` hold their quantized weights."""
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name, b in bits.items():
            mods[name].weight.copy_(grid(mods[name].weight, b))
    return m


def main() -> None:
    args = benchmark_args(__doc__)
    model = newest_baseline()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    names = list(GRIDS)
    print(f"\nbits | squared error: {' | '.join(names)} | ratio")
    for bits in (2, 3, 4, 8):
        err = {g: sum(float((GRIDS[g](m.weight.detach(), bits) - m.weight.detach()).double().pow(2).sum())
                      for _, m in layers) for g in names}
        print(f"{bits:4d} | {err[names[0]]:.4f} | {err[names[1]]:.4f} | {err[names[0]] / err[names[1]]:.3f}")

    _, te = D.cifar10_loaders(batch_size=500, test_subset=args.test, seed=0)
    configs = {"2 bits (8-bit first and last layer)":
               {n: (8 if i in (0, len(layers) - 1) else 2) for i, (n, _) in enumerate(layers)}}
    found = sorted(glob.glob("data/artifacts/finetune-*/bit_config.json"), key=os.path.getmtime)
    if found:
        configs[f"HAWQ's bits ({found[-1]})"] = BitConfig.load(found[-1]).weights
    print(f"\nFP32 top-1 on {args.test} test images: {evaluate(model, te)['top1']:.2f}%")
    print("top-1 with quantized weights, FP32 activations, no fine-tuning:")
    for label, bits in configs.items():
        res = {g: evaluate(weights_quantized(model, bits, GRIDS[g]).eval(), te)["top1"] for g in names}
        print(f"  {label}: " + ", ".join(f"{g} {v:.2f}%" for g, v in res.items()))


if __name__ == "__main__":
    main()
