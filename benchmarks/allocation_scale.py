"""Allocation and order at ResNet50 scale, and the front door's steps on a ResNet50 (no fine-tuning).

1. ``alloc``: :func:`hawqlib.allocate.allocate_bits` plus :func:`hawqlib.order.finetune_order` plus
   :func:`hawqlib.sensitivity.allocation_table` for torchvision's ResNet50 (random weights, ``torch.manual_seed(0)``;
   given synthetic spectra, log-uniform in [1e-2, 1e2] from ``random.Random(0)``), at ``--target`` (weights
   measure), as :func:`hawqlib.quantize` runs them, side by side in one process:

   - ``before``: the flow before the errors were shared: a budget check by ``allocate_bits`` with unit
     eigenvalues, then ``allocate_bits``, ``finetune_order`` and ``allocation_table``, each quantizing the blocks
     again, with the weight scale search as it was (a fresh tensor per step);
   - ``whole``: the budget check from sizes alone (:func:`hawqlib.allocate.check_budget`), every block's error at
     every width once (:func:`hawqlib.sensitivity.error_table`), shared by the three, with the scale search run
     on each whole weight tensor at once (as before the search went slab by slab);
   - ``after``: the same, with the scale search as :func:`hawqlib.quantize` runs it now (slab by slab, the
     rows of a slab in the processor's cache).

   All must give the same bits, the same order, the same Omegas and the same errors (checked, to the bit).
   ``--skip-before`` leaves out ``before`` (the slowest), ``--only-after`` times ``after`` alone.
2. ``front``: :func:`hawqlib.quantize` with ``finetune=False`` on a ResNet50 (random weights), 16 random images
   of ``--size`` px for the Hessian, 4 calibration batches, the per-step seconds of ``report.timings``.

    python benchmarks/allocation_scale.py [--part alloc|front|both] [--threads 1] [--size 224] [--skip-before]
                                          [--only-after]
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


def whole(model, spectra, target):
    slab = grids._SLAB_ELEMENTS
    grids._SLAB_ELEMENTS = 1 << 62  # one slab holds every row of a tensor: the search as it was
    try:
        return after(model, spectra, target)
    finally:
        grids._SLAB_ELEMENTS = slab


def alloc_part(args) -> None:
    torch.manual_seed(0)
    model = resnet50()
    r = random.Random(0)
    spectra = [Spectrum(b.name, b.numel, 10 ** r.uniform(-2, 2)) for b in quant_blocks(model, "layer")]
    print(f"ResNet50: {len(spectra)} blocks, {sum(s.numel for s in spectra):,} weights, target {args.target}x")
    runs = [("after", after)]
    if not args.only_after:
        runs += [("whole", whole)] + ([] if args.skip_before else [("before", before)])
    got, cpu = {}, {}
    for name, fn in runs:
        t0 = time.perf_counter()
        c0 = time.process_time()
        got[name] = fn(model, spectra, args.target)
        cpu[name] = time.process_time() - c0
        print(f"{name:>6}: {time.perf_counter() - t0:8.2f} s wall, {cpu[name]:8.2f} s CPU", flush=True)
    c2, o2, t2 = got["after"]
    for name in got:
        if name == "after":
            continue
        c1, o1, t1 = got[name]
        same = c1 == c2 and [e.name for e in o1] == [e.name for e in o2]
        worst = max(abs(a.omega - b.omega) / max(abs(a.omega), 1e-300) for a, b in zip(o1, o2))
        worst_t = max(abs(a["quant_error"] - b["quant_error"]) / max(a["quant_error"], 1e-300) for a, b in zip(t1, t2))
        print(f"{name} vs after: same bits and order: {same}; largest relative difference of Omega {worst:.3g}, "
              f"of the errors {worst_t:.3g}; after / {name} = {cpu['after'] / cpu[name]:.3f} in CPU time")


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
    ap.add_argument("--only-after", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if args.part in ("alloc", "both"):
        alloc_part(args)
    if args.part in ("front", "both"):
        front_part(args)


if __name__ == "__main__":
    main()
