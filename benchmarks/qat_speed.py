"""Speed of one quantization-aware training step: hawqlib.quant vs FP32 vs torch.ao QAT.

What is measured: one SGD training step (forward, cross-entropy loss, backward, SGD step with
momentum 0.9 and weight decay 5e-4) of ResNet20 on a batch of 128 random 32x32 images, CPU,
channels_last tensors, for four variants built from the same initial weights:

- ``fp32``: the plain model;
- ``hawqlib``: ``hawqlib.quant.quantize_model`` with mixed weight bits (2, 3, 4 and 8 across the
  20 layers, 8 for the first and last layer) and 4-bit activations (a ``QuantAct`` on the input
  of every quantized layer but the first);
- ``torch.ao``: ``torch.ao.quantization.prepare_qat`` with, per layer, a ``FakeQuantize`` with a
  per-channel symmetric moving-average min/max observer for the weight at the same bits
  (``quant_min/quant_max = -(2**(b-1)-1), 2**(b-1)-1``) and a 4-bit per-tensor affine
  ``FakeQuantize`` for the layer's output (one activation quantizer per layer, as ours);
- ``torch.ao fused``: the same with ``FusedMovingAvgObsFakeQuantize`` (torch.ao's default QAT
  fake-quant class) for weights and activations.

The CPU may be shared with other work (on the project machine a long training run goes on in the
background), so the variants are measured interleaved: each repetition times ``--steps`` steps of
every variant in turn (order rotated per repetition), and the reported figure is the median over
repetitions of the per-step time, and of the per-repetition ratios to the FP32 step. Slow-downs
from the other load then hit all variants alike within a repetition.

Run: ``python benchmarks/qat_speed.py [--reps 7 --steps 5 --threads N]``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
import warnings

from hawqlib.blocks import quant_blocks
from hawqlib.models import resnet20
from hawqlib.quant import BitConfig, quantize_model

ACT_BITS = 4
MIX = (2, 3, 4, 8)


def mixed_config(model: nn.Module) -> BitConfig:
    """8 bits for the first and last layer, 2/3/4/8 cycling over the others."""
    names = [b.name for b in quant_blocks(model)]
    bits = {n: MIX[i % len(MIX)] for i, n in enumerate(names)}
    bits[names[0]] = bits[names[-1]] = 8
    return BitConfig(bits, ACT_BITS)


def torch_ao_model(model: nn.Module, cfg: BitConfig, fused: bool) -> nn.Module:
    """torch.ao eager-mode QAT at the same per-layer weight bits and 4-bit activations."""
    from torch.ao.quantization import (FakeQuantize, FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver, QConfig, prepare_qat)
    fq = FusedMovingAvgObsFakeQuantize if fused else FakeQuantize
    m = copy.deepcopy(model)
    act = fq.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2 ** ACT_BITS - 1,
                       dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    for name, mod in m.named_modules():
        if name in cfg.weights:
            b = cfg.weights[name]
            wq = fq.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-(2 ** (b - 1) - 1),
                              quant_max=2 ** (b - 1) - 1, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                              ch_axis=0)
            mod.qconfig = QConfig(activation=act, weight=wq)
    m.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager-mode deprecation notice
        return prepare_qat(m, inplace=False)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """A closure running one SGD training step of ``model`` on (x, y)."""
    model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def main(argv=None) -> dict:
    """Run the interleaved measurement; print and return medians and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per repetition")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = resnet20()
    cfg = mixed_config(base)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    variants = {
        "fp32": make_step(copy.deepcopy(base), x, y),
        "hawqlib": make_step(quantize_model(base, cfg), x, y),
        "torch.ao": make_step(torch_ao_model(base, cfg, fused=False), x, y),
        "torch.ao fused": make_step(torch_ao_model(base, cfg, fused=True), x, y),
    }
    for step in variants.values():
        for _ in range(args.warmup):
            step()
    names = list(variants)
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {c: {n: [] for n in names} for c in clocks}
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = {c: f() for c, f in clocks.items()}
            for _ in range(args.steps):
                variants[n]()
            for c, f in clocks.items():
                times[c][n].append((f() - t0[c]) / args.steps)
    print(f"ResNet20, batch {args.batch}, CPU ({torch.get_num_threads()} threads), channels_last; "
          f"{args.reps} interleaved repetitions x {args.steps} steps; weight bits "
          f"{sorted(set(cfg.weights.values()))} (mean {cfg.mean_bits(base):.2f}), activations {ACT_BITS} bits")
    out = {}
    for c in clocks:
        t = times[c]
        med = {n: statistics.median(v) for n, v in t.items()}
        ratio = {n: statistics.median(a / b for a, b in zip(t[n], t["fp32"])) for n in names}
        vs_ao = {k: statistics.median(a / b for a, b in zip(t["hawqlib"], t[k]))
                 for k in ("torch.ao", "torch.ao fused")}
        print(f"{c} clock ({'elapsed time' if c == 'wall' else 'CPU time of this process, all threads'}):")
        for n in names:
            print(f"  {n:15s} median step {1000 * med[n]:7.1f} ms   x{ratio[n]:.3f} of fp32 "
                  f"(min {1000 * min(t[n]):.1f}, max {1000 * max(t[n]):.1f} ms)")
        for k, v in vs_ao.items():
            print(f"  hawqlib / {k}: x{v:.3f}")
        ok = ratio["hawqlib"] <= 1.3 and all(v <= 1.0 for v in vs_ao.values())
        print(f"  target (hawqlib <= 1.3x fp32 and no slower than torch.ao): {'met' if ok else 'NOT met'}")
        out[c] = {"median_s": med, "ratio_to_fp32": ratio, "hawqlib_vs_torch_ao": vs_ao, "target_met": ok}
    return out


if __name__ == "__main__":
    main()
