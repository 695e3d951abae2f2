"""Allocation and order at ResNet50 scale, and the front door's steps on a ResNet50 (no fine-tuning).

1. ``alloc``: :func:`hawqlib.allocate.allocate_bits` plus :func:`hawqlib.order.finetune_order` plus
   :func:`hawqlib.sensitivity.allocation_table` for torchvision's ResNet50 (random weights, ``torch.manual_seed(0)``;
   given synthetic spectra, log-uniform in [1e-2, 1e2] from ``random.Random(0)``), at ``--target`` (weights
   measure), as :func:`hawqlib.quantize` runs them, side by side in one process:

   - ``before``: the flow before the errors were shared: a budget check by ``allocate_bits`` with unit
     eigenvalues, then ``allocate_bits``, ``finetune_order`` and ``allocation_table``, each quantizing the blocks
     again, with the weight scale search as it was (a fresh tensor per step);
   - ``after``: the budget check from sizes alone (:func:`hawqlib.allocate.check_budget`), every block's error at
     every width once (:func:`hawqlib.sensitivity.error_table`), shared by the three.

   Both must give the same bits, the same order and the same Omegas (checked). ``--skip-before`` times only
   ``after``.
2. ``front``: :func:`hawqlib.quantize` with ``finetune=False`` on a ResNet50 (random weights), 16 random images
   of ``--size`` px for the Hessian, 4 calibration batches, the per-step seconds of ``report.timings``.

    python benchmarks/allocation_scale.py [--part alloc|front|both] [--threads 1] [--size 224] [--skip-before]
"""
from __future__ import annotations

import argparse
import random
import time
from collections import namedtuple

import torch

import hawqlib
from hawqlib.allocate import allocate_bits, check_budget
from hawqlib.blocks import quant_blocks
from hawqlib.models.imagenet import resnet50
from hawqlib.order import finetune_order
from hawqlib.quant import grids
from hawqlib.sensitivity import allocation_table, error_table

Spectrum = namedtuple("Spectrum", "name numel eigenvalue")
CHOICES = (2, 3, 4, 8)


def _old_mse_scale(w, per_channel, top):
    """The weight scale search as it was before the in-place buffers (same numbers, a fresh tensor per step)."""
    x = w.detach().double().reshape(w.shape[0] if per_channel and w.dim() > 0 else 1, -1)
    s = x.abs().amax(dim=1, keepdim=True).clamp_min(grids._MIN_RANGE) / top
    for _ in range(grids.MSE_ITERATIONS):
        k = grids._odd_codes(x / s, top)
        new = (x * k).sum(dim=1, keepdim=True) / (k * k).sum(dim=1, keepdim=True)
        new = torch.where(new > 0, new, s)
        if torch.equal(new, s):
            break
        s = new
    s = s.float().clamp_min(grids._MIN_RANGE)
    return s.reshape(-1) if per_channel and w.dim() > 0 else s.reshape(())


def before(model, spectra, target):
    new = grids._mse_scale
    grids._mse_scale = _old_mse_scale
    try:
        unit = [Spectrum(s.name, s.numel, 1.0) for s in spectra]
        allocate_bits(model, unit, target_compression=target, choices=CHOICES)
        cfg = allocate_bits(model, spectra, target_compression=target, choices=CHOICES)
        order = finetune_order(model, spectra, cfg)
        table = allocation_table(model, spectra, cfg)
    finally:
        grids._mse_scale = new
    return cfg, order, table


def after(model, spectra, target):
    check_budget(model, target_compression=target, choices=CHOICES)
    errors = error_table(quant_blocks(model, "layer"), CHOICES)
    cfg = allocate_bits(model, spectra, target_compression=target, choices=CHOICES, errors=errors)
    order = finetune_order(model, spectra, cfg, errors=errors)
    table = allocation_table(model, spectra, cfg, errors=errors)
    return cfg, order, table


def alloc_part(args) -> None:
    torch.manual_seed(0)
    model = resnet50()
    r = random.Random(0)
    spectra = [Spectrum(b.name, b.numel, 10 ** r.uniform(-2, 2)) for b in quant_blocks(model, "layer")]
    print(f"ResNet50: {len(spectra)} blocks, {sum(s.numel for s in spectra):,} weights, target {args.target}x")
    runs = [("after", after)] + ([] if args.skip_before else [("before", before)])
    got = {}
    for name, fn in runs:
        t0 = time.perf_counter()
        c0 = time.process_time()
        got[name] = fn(model, spectra, args.target)
        print(f"{name:>6}: {time.perf_counter() - t0:8.2f} s wall, {time.process_time() - c0:8.2f} s CPU")
        got[name + "_s"] = time.perf_counter() - t0
    if "before" in got:
        (c1, o1, t1), (c2, o2, t2) = got["before"], got["after"]
        same = c1 == c2 and [e.name for e in o1] == [e.name for e in o2]
        worst = max(abs(a.omega - b.omega) / max(abs(a.omega), 1e-300) for a, b in zip(o1, o2))
        worst_t = max(abs(a["quant_error"] - b["quant_error"]) / max(a["quant_error"], 1e-300) for a, b in zip(t1, t2))
        print(f"same bits and order: {same}; largest relative difference of Omega {worst:.3g}, "
              f"of the errors {worst_t:.3g}; after / before = {got['after_s'] / got['before_s']:.3f}")


def front_part(args) -> None:
    torch.manual_seed(0)
    model = resnet50()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, args.size, args.size, generator=g), torch.randint(0, 1000, (4,), generator=g))
            for _ in range(4)]
    t0 = time.perf_counter()
    _, rep = hawqlib.quantize(model, data, target_compression=8, finetune=False, progress=False, hessian_data=4,
                              hessian={"max_iter": args.max_iter})
    total = time.perf_counter() - t0
    print(f"quantize(ResNet50, finetune=False), {rep.hessian_samples} images of {args.size} px for the Hessian: "
          f"{total:.1f} s in all")
    for k, v in rep.timings.items():
        print(f"  {k:>12}: {v:8.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("alloc", "front", "both"), default="both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", type=float, default=8.0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--max-iter", type=int, default=20)
    ap.add_argument("--skip-before", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if args.part in ("alloc", "both"):
        alloc_part(args)
    if args.part in ("front", "both"):
        front_part(args)


if __name__ == "__main__":
    main()
