"""Benchmark: per-layer top Hessian eigenvalues of ResNet20 on 512 CIFAR-10 training images.

PyHessian (the authors' library, ``pip install pyhessian``, the ``bench`` extra; never a runtime
dependency) one layer at a time with its defaults (power iteration, relative tolerance 1e-3 on the
change of the estimate, at most 100 iterations), against ``hawqlib.hessian.top_eigenvalues`` with its
defaults (method "auto" -> exact Gauss-Newton route, Lanczos, Ritz residual 1e-4), in one process.
The reference is ours at tol 1e-7. Prints, per layer: both eigenvalues, their relative errors to the
reference, iterations (PyHessian: Hessian-vector products counted by wrapping its product function);
then total wall times, their ratio and the peak memory of each phase.

Memory (what is measured): the resident set size (RSS, from /proc/self/statm) sampled every 10 ms by a
thread during each phase; we print the peak RSS and the peak above the RSS at the start of the phase.
Between phases ``gc.collect()`` and glibc's ``malloc_trim(0)`` hand freed memory back to the OS so a
later phase does not hide inside memory an earlier phase left mapped.

Weights: the newest ``data/artifacts/baseline_resnet20-*/checkpoint.pt`` (read-only; its epoch is
printed: it may be a partially trained baseline), else a ResNet20 trained here for ``--epochs``.

Usage: python benchmarks/hessian_speed.py [--n 512] [--layers conv1,fc] [--threads N] [--skip-pyhessian]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import os
import platform
import threading
import time

import torch
from torch import nn

from hawqlib import data as D
from hawqlib import hessian as H
from hawqlib.blocks import quant_blocks
from hawqlib.models import resnet20
from hawqlib.train import load_checkpoint, load_weights

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Context manager sampling RSS in a thread; ``.start`` and ``.peak`` in bytes."""

    def __init__(self, every: float = 0.01):
        self.every, self.peak, self.start = every, 0, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.every)

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.peak = rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())


def get_model(epochs: int):
    model = resnet20()
    found = sorted(glob.glob("data/artifacts/baseline_resnet20-*/checkpoint.pt"), key=os.path.getmtime)
    if found:
        path = found[-1]
        ckpt = load_checkpoint(path, model)  # read-only
        load_weights(model, path)
        return model, f"{path} (epoch {ckpt.get('epoch')} of a baseline run, read-only)"
    from hawqlib.train import train

    tr, _ = D.cifar10_loaders(batch_size=128, train_subset=10000, seed=0)
    train(model, tr, epochs=epochs, progress=True)
    return model, f"ResNet20 trained here for {epochs} epochs on 10,000 images (no baseline checkpoint yet)"


def run_pyhessian(model, x, y, blocks):
    """PyHessian one layer at a time (only that layer's weight requiring grad), its defaults."""
    import sys

    import pyhessian  # noqa: F401  (its __init__ shadows the submodule name with the class)
    ph = sys.modules["pyhessian.hessian"]

    calls = {"n": 0}
    orig = ph.hessian_vector_product

    def counted(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    ph.hessian_vector_product = counted
    flags = [p.requires_grad for p in model.parameters()]
    out = []
    try:
        for b in blocks:
            for p in model.parameters():
                p.requires_grad_(False)
            b.params[0].requires_grad_(True)
            torch.manual_seed(0)
            calls["n"] = 0
            t = time.perf_counter()
            hc = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            ev, _ = hc.eigenvalues()
            out.append((ev[0], calls["n"], time.perf_counter() - t))
            del hc
            model.zero_grad(set_to_none=True)
            print(f"  pyhessian {b.name:16s} {ev[0]:.6f} ({calls['n']} it, {out[-1][2]:.1f} s)", flush=True)
    finally:
        ph.hessian_vector_product = orig
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512, help="training images (default 512)")
    ap.add_argument("--layers", default="", help="comma-separated layer names (default: all 20)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs to train when there is no baseline checkpoint")
    ap.add_argument("--skip-pyhessian", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()}", flush=True)
    model, what = get_model(args.epochs)
    print("weights:", what)
    x, y = D.sample_batch(D.cifar10("train"), args.n, seed=0)
    print(f"data: {args.n} CIFAR-10 training images (sample_batch seed 0), BatchNorm in eval mode")
    names = [s for s in args.layers.split(",") if s] or None
    blocks = quant_blocks(model, names) if names else quant_blocks(model, "layer")
    ce = nn.CrossEntropyLoss()

    with PeakRSS() as mem_ours:
        t = time.perf_counter()
        ours = H.top_eigenvalues(model, ce, (x, y), blocks, progress=False)
        t_ours = time.perf_counter() - t
    print(f"ours: {t_ours:.1f} s", flush=True)

    if not args.skip_pyhessian:
        with PeakRSS() as mem_ph:
            t = time.perf_counter()
            ph = run_pyhessian(model, x, y, blocks)
            t_ph = time.perf_counter() - t
        print(f"pyhessian: {t_ph:.1f} s", flush=True)

    t = time.perf_counter()
    ref = H.top_eigenvalues(model, ce, (x, y), blocks, tol=1e-7, max_iter=300, progress=False)
    t_ref = time.perf_counter() - t
    print(f"reference (ours, tol 1e-7): {t_ref:.1f} s; all converged: {all(r.converged for r in ref)}\n")

    hdr = f"{'layer':16s} {'reference':>11s} {'ours':>11s} {'rel.err':>9s} {'it':>3s} {'method':>12s}"
    if not args.skip_pyhessian:
        hdr += f" {'pyhessian':>11s} {'rel.err':>9s} {'it':>3s}"
    print(hdr)
    worst_ours = worst_ph = 0.0
    for i, (b, o, r) in enumerate(zip(blocks, ours, ref)):
        e_o = abs(o.eigenvalue - r.eigenvalue) / abs(r.eigenvalue)
        worst_ours = max(worst_ours, e_o)
        line = f"{b.name:16s} {r.eigenvalue:11.6f} {o.eigenvalue:11.6f} {e_o:9.2e} {o.iterations:3d} {o.method:>12s}"
        if not args.skip_pyhessian:
            e_p = abs(ph[i][0] - r.eigenvalue) / abs(r.eigenvalue)
            worst_ph = max(worst_ph, e_p)
            line += f" {ph[i][0]:11.6f} {e_p:9.2e} {ph[i][1]:3d}"
        print(line)
    gib = 1 << 30
    print(f"\nours:      {t_ours:8.1f} s, peak RSS {mem_ours.peak / gib:.2f} GiB "
          f"(+{(mem_ours.peak - mem_ours.start) / gib:.2f} GiB over the phase start), "
          f"worst rel. error {worst_ours:.2e}")
    if not args.skip_pyhessian:
        print(f"pyhessian: {t_ph:8.1f} s, peak RSS {mem_ph.peak / gib:.2f} GiB "
              f"(+{(mem_ph.peak - mem_ph.start) / gib:.2f} GiB over the phase start), "
              f"worst rel. error {worst_ph:.2e}")
        print(f"speed-up (pyhessian / ours): {t_ph / t_ours:.1f}x")
    print(f"target: >= 10x faster and every layer within 1e-3 of the reference -> "
          f"{'met' if (args.skip_pyhessian or t_ph / t_ours >= 10) and worst_ours <= 1e-3 else 'NOT met'}")
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
