"""Benchmark: per-layer top Hessian eigenvalues of ResNet20 on 512 CIFAR-10 training images, alone and
beside a competing process.

PyHessian (the authors' library, ``pip install pyhessian``, the ``bench`` extra; never a runtime
dependency) one layer at a time with its defaults (power iteration, relative tolerance 1e-3 on the
change of the estimate, at most 100 iterations), against ``hawqlib.hessian.top_eigenvalues`` with its
defaults (method "auto" -> exact Gauss-Newton route with the identity checked on every sample and
proved on a spread sample, Lanczos, Ritz residual 1e-4, every eigenpair verified by one float64 product
of that route), in one process; beside it ours with ``verify="autograd"`` (the independent check: one
double backward per layer) and ``verify=False``. The reference is ours at tol 1e-7. Prints, per layer:
the eigenvalues, their relative errors to the reference, iterations (PyHessian: Hessian-vector products
counted by wrapping its product function); then total wall and CPU times, their ratios and the peak
memory of each phase.

Contention (issue 20): for every torch thread count in ``--threads`` the two timed phases (ours,
PyHessian) run twice, first as the machine is, then beside a competing process that this script
starts itself: ``--compete`` busy threads of float32 matrix products (default: one per CPU, as a
training run would use), bounded (it exits by itself after ``--compete-limit`` seconds and is
terminated when its phase ends). Printed per condition: both times, their ratio, and each side's
slow-down under the competitor, on two clocks: wall time and this process's CPU time (on an
oversubscribed machine the CPU-time ratio is the steadier estimate of the quiet-machine ratio). Ours
includes the exact verification of every returned eigenpair.

Memory (what is measured): the resident set size (RSS, from /proc/self/statm) sampled every 10 ms by a
thread during each phase; we print the peak RSS and the peak above the RSS at the start of the phase.
Between phases ``gc.collect()`` and glibc's ``malloc_trim(0)`` hand freed memory back to the OS so a
later phase does not hide inside memory an earlier phase left mapped.

Weights: the newest ``data/artifacts/baseline_resnet20-*/model.pt`` (or ``checkpoint.pt``; read-only),
else a ResNet20 trained here for ``--epochs``.

Usage: python benchmarks/hessian_speed.py [--n 512] [--layers conv1,fc] [--threads 1,2] [--skip-pyhessian]
       [--no-contention] [--compete N] [--compete-limit S] [--no-variants]
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import glob
import os
import platform
import subprocess
import sys
import threading
import time
import warnings

import torch
from torch import nn

from hawqlib.repro import data as D
from hawqlib import hessian as H
from hawqlib.blocks import quant_blocks
from hawqlib.models import resnet20
from hawqlib.train import load_weights

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
    found = sorted(glob.glob("data/artifacts/baseline_resnet20-*/model.pt")
                   + glob.glob("data/artifacts/baseline_resnet20-*/checkpoint.pt"), key=os.path.getmtime)
    if found:
        path = found[-1]
        if path.endswith("model.pt"):  # a sealed artifact: its manifest vouches for the file (read-only)
            from hawqlib.repro import artifacts
            artifacts.verify(os.path.dirname(path))
            load_weights(model, path, require_digest=False)
        else:  # an unfinished run's checkpoint records its own digest
            load_weights(model, path)
        return model, f"{path} (a baseline run's weights, read-only)"
    from hawqlib.train import train

    tr, _ = D.cifar10_loaders(batch_size=128, train_subset=10000, seed=0)
    train(model, tr, epochs=epochs, progress=True)
    return model, f"ResNet20 trained here for {epochs} epochs on 10,000 images (no baseline checkpoint yet)"


_BUSY = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(384, 384)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    a = torch.tanh(a @ a)
"""


class Competitor:
    """A bounded competing process: ``threads`` busy torch threads for at most ``limit`` seconds."""

    def __init__(self, threads: int, limit: float):
        self.threads, self.limit, self.proc = threads, limit, None

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _BUSY, str(self.threads), str(self.limit)])
        time.sleep(1.0)  # let it start before the timed phase
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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


def timed(fn):
    """``fn()``, its wall time, its CPU time (this process, all threads) and its peak memory."""
    with PeakRSS() as mem:
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    mem.cpu = cpu
    return out, wall, mem


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512, help="training images (default 512)")
    ap.add_argument("--layers", default="", help="comma-separated layer names (default: all 20)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs to train when there is no baseline checkpoint")
    ap.add_argument("--skip-pyhessian", action="store_true")
    ap.add_argument("--threads", default="1", help="comma-separated torch thread counts (default 1)")
    ap.add_argument("--no-contention", action="store_true", help="skip the runs beside a competing process")
    ap.add_argument("--no-variants", action="store_true",
                    help="skip ours with verify='autograd' and verify=False (timed beside the default otherwise)")
    ap.add_argument("--compete", type=int, default=os.cpu_count() or 1, help="busy threads of the competitor")
    ap.add_argument("--compete-limit", type=float, default=1800.0, help="seconds after which the competitor exits")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t]

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"load average {os.getloadavg()}", flush=True)
    model, what = get_model(args.epochs)
    print("weights:", what)
    x, y = D.sample_batch(D.cifar10("train"), args.n, seed=0)
    print(f"data: {args.n} CIFAR-10 training images (sample_batch seed 0), BatchNorm in eval mode")
    names = [s for s in args.layers.split(",") if s] or None
    blocks = quant_blocks(model, names) if names else quant_blocks(model, "layer")
    ce = nn.CrossEntropyLoss()

    with warnings.catch_warnings():  # untimed warm-up: one-time costs of a process (first kernels, lazy imports)
        warnings.simplefilter("ignore")
        for opt in (True, "autograd"):
            H.top_eigenvalues(model, ce, (x[:16], y[:16]), blocks[:1], progress=False, verify=opt)
    rows = []  # (threads, condition, t_ours, t_ph, mem_ours, mem_ph)
    ours = ph = None
    variants = {}  # verify option -> (results, wall, mem) of the last condition
    for nt in threads:
        torch.set_num_threads(nt)
        for cond in ("alone", "competitor") if not args.no_contention else ("alone",):
            ctx = Competitor(args.compete, args.compete_limit) if cond == "competitor" else contextlib.nullcontext()
            with ctx:
                print(f"-- {nt} thread(s), {cond}; load average {os.getloadavg()}", flush=True)
                ours, t_ours, mem_ours = timed(lambda: H.top_eigenvalues(model, ce, (x, y), blocks, progress=False))
                print(f"ours: {t_ours:.1f} s (CPU {mem_ours.cpu:.1f} s)", flush=True)
                for opt in () if args.no_variants else ("autograd", False):
                    res, t_v, mem_v = timed(lambda: H.top_eigenvalues(model, ce, (x, y), blocks, progress=False,
                                                                     verify=opt))
                    variants[opt] = (res, t_v, mem_v)
                    print(f"ours, verify={opt!r}: {t_v:.1f} s (CPU {mem_v.cpu:.1f} s), "
                          f"{mem_v.cpu / mem_ours.cpu:.2f}x the default's CPU time", flush=True)
                t_ph, mem_ph = None, None
                if not args.skip_pyhessian:
                    ph, t_ph, mem_ph = timed(lambda: run_pyhessian(model, x, y, blocks))
                    print(f"pyhessian: {t_ph:.1f} s (CPU {mem_ph.cpu:.1f} s)", flush=True)
            rows.append((nt, cond, t_ours, t_ph, mem_ours, mem_ph))

    torch.set_num_threads(threads[0])
    t = time.perf_counter()
    with warnings.catch_warnings():  # float32 products cannot verify a residual of 1e-7: said once below
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = H.top_eigenvalues(model, ce, (x, y), blocks, tol=1e-7, max_iter=300, progress=False)
    t_ref = time.perf_counter() - t
    print(f"reference (ours, tol 1e-7 on the solver's own residual): {t_ref:.1f} s; largest verified residual "
          f"{max(r.residual for r in ref):.1e} (float32 products)\n")

    hdr = f"{'layer':16s} {'reference':>11s} {'ours':>11s} {'rel.err':>9s} {'it':>3s} {'residual':>9s} {'method':>12s}"
    if ph is not None:
        hdr += f" {'pyhessian':>11s} {'rel.err':>9s} {'it':>3s}"
    print(hdr)
    worst_ours = worst_ph = 0.0
    worst_var = {opt: 0.0 for opt in variants}
    for i, (b, o, r) in enumerate(zip(blocks, ours, ref)):
        e_o = abs(o.eigenvalue - r.eigenvalue) / abs(r.eigenvalue)
        worst_ours = max(worst_ours, e_o)
        for opt, (res, _, _) in variants.items():
            worst_var[opt] = max(worst_var[opt], abs(res[i].eigenvalue - r.eigenvalue) / abs(r.eigenvalue))
        line = (f"{b.name:16s} {r.eigenvalue:11.6f} {o.eigenvalue:11.6f} {e_o:9.2e} {o.iterations:3d} "
                f"{o.residual:9.2e} {o.method:>12s}")
        if ph is not None:
            e_p = abs(ph[i][0] - r.eigenvalue) / abs(r.eigenvalue)
            worst_ph = max(worst_ph, e_p)
            line += f" {ph[i][0]:11.6f} {e_p:9.2e} {ph[i][1]:3d}"
        print(line)
    gib = 1 << 30
    print(f"\nworst rel. error: ours {worst_ours:.2e}" + (f", pyhessian {worst_ph:.2e}" if ph is not None else "")
          + "".join(f", ours verify={opt!r} {e:.2e}" for opt, e in worst_var.items())
          + f"; all ours converged (verified residual <= tol): {all(o.converged for o in ours)}"
          + "".join(f", verify={opt!r}: {all(r.converged for r in res)}" for opt, (res, _, _) in variants.items()))
    if ph is not None and rows:
        ph_cpu = rows[-1][5].cpu
        print("CPU time on the last condition: pyhessian " + f"{ph_cpu:.1f} s; ours (default) {rows[-1][4].cpu:.1f} s "
              f"= {ph_cpu / rows[-1][4].cpu:.1f}x faster" + "".join(
                  f"; verify={opt!r} {m.cpu:.1f} s = {ph_cpu / m.cpu:.1f}x" for opt, (_, _, m) in variants.items()))
    print(f"\n{'threads':>7s} {'condition':>10s} {'ours':>9s} {'pyhessian':>10s} {'ratio':>7s} "
          f"{'ours slow-down':>15s} {'pyh. slow-down':>15s} {'CPU ratio':>10s} {'peak RSS ours/pyh. (GiB)':>25s}")
    alone = {nt: (to, tp) for nt, c, to, tp, _, _ in rows if c == "alone"}
    for nt, cond, to, tp, mo, mp in rows:
        ratio = f"{tp / to:6.1f}x" if tp else "-"
        so = f"{to / alone[nt][0]:14.1f}x"
        sp = f"{tp / alone[nt][1]:14.1f}x" if tp else "-"
        mem = f"{mo.peak / gib:.2f}" + (f" / {mp.peak / gib:.2f}" if mp else "")
        cr = f"{mp.cpu / mo.cpu:9.1f}x" if mp else "-"
        print(f"{nt:7d} {cond:>10s} {to:8.1f}s {(f'{tp:9.1f}s' if tp else '-'):>10s} {ratio:>7s} {so:>15s} {sp:>15s} "
              f"{cr:>10s} {mem:>25s}")
    print(f"targets (issue 36): alone >= 15x in CPU time (stretch 20x), beside the competitor >= 8x, every layer "
          f"within 1e-6 of the reference (ours: {'met' if worst_ours <= 1e-6 else 'NOT met'})")
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
