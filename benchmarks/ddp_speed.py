"""Data parallel on one 2-core machine: 2 ranks x 1 thread (torchrun, gloo) against 1 process x 2 threads.

What is measured, side by side in one run (issue 16):

- ``finetune epoch``: one epoch of quantization-aware training of ResNet20 at the cpu profile's settings
  (the published baseline, its HAWQ bits, all blocks quantized, 4-bit activations, batch 128, SGD with
  Nesterov momentum), over ``--steps`` batches of CIFAR-10 training images, through
  :func:`hawqlib.train.train` (data-parallel with DDP under torchrun);
- ``spectrum``: the top Hessian eigenvalue of the first ``--blocks`` layers of the baseline on ``--samples``
  training images (:func:`hawqlib.hessian.top_eigenvalues`, autograd route in both, as the distributed
  Hessian uses; Lanczos to the cpu profile's tolerance or ``--max-iter`` iterations), each rank taking its
  share of the chunks of 32 samples.

Each measurement is a fresh process (or a fresh torchrun job) that times its own work after setup
(loading, quantizing and calibrating are not timed); the two layouts alternate over ``--reps``
repetitions and the figures are medians, the ratio the median of per-repetition ratios. Run with nothing
else on the machine: ``python benchmarks/ddp_speed.py [--reps 2 --steps 40 --blocks 3 --samples 128 --max-iter 20]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(what: str, steps: int, blocks: int, samples: int, max_iter: int) -> None:
    import torch

    from hawqlib import distributed, hessian, quant
    from hawqlib.blocks import quant_blocks
    from hawqlib.repro.data import cifar10_loaders
    from hawqlib.repro.study import Study
    from hawqlib.train import train

    distributed.setup()
    study = Study("cpu")
    model = study.model
    P = study.P
    if what == "finetune":
        bc = study.specs(["hawq"])["hawq"].bit_config
        F = P["finetune"]
        tr, _ = cifar10_loaders(batch_size=F["batch_size"], seed=0, train_subset=steps * F["batch_size"])
        q = quant.quantize_model(model, bc)
        quant.calibrate_activations(q, [next(iter(tr))])
        t0 = time.perf_counter()
        train(q, tr, None, epochs=1, lr=F["lr"], momentum=F["momentum"], nesterov=F["nesterov"],
              weight_decay=F["weight_decay"], progress=False)
    else:
        H = P["hessian"]
        from hawqlib.repro.pipeline import hessian_batch

        batch = hessian_batch(samples, H["data_seed"])
        chosen = quant_blocks(model, "layer")[:blocks]
        t0 = time.perf_counter()
        res = hessian.top_eigenvalues(model.eval(), torch.nn.CrossEntropyLoss(), batch, chosen, method="autograd",
                                      solver=H["solver"], tol=H["tol"], max_iter=max_iter, seed=H["seed"])
    wall = time.perf_counter() - t0
    if distributed.is_main():
        out = {"wall_s": wall}
        if what == "spectrum":
            out["eigenvalues"] = [float(r.eigenvalue) for r in res]
        print("RESULT " + json.dumps(out), flush=True)
    distributed.teardown()


def _run(layout: str, what: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1" if layout == "2x1" else "2")
    tail = [str(Path(__file__).resolve()), "--worker", what, "--steps", str(args.steps), "--blocks",
            str(args.blocks), "--samples", str(args.samples), "--max-iter", str(args.max_iter)]
    if layout == "2x1":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *tail]
    else:
        cmd = [sys.executable, *tail]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"{layout} {what} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=["finetune", "spectrum"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="batches of 128 in the timed epoch")
    p.add_argument("--blocks", type=int, default=3, help="layers in the timed spectrum")
    p.add_argument("--samples", type=int, default=128, help="Hessian sample size")
    p.add_argument("--max-iter", type=int, default=20, help="Lanczos iterations at most per layer")
    p.add_argument("--only", choices=["finetune", "spectrum"], default=None, help="one of the two measurements")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        _worker(args.worker, args.steps, args.blocks, args.samples, args.max_iter)
        return
    rows = {}
    for what in [args.only] if args.only else ("finetune", "spectrum"):
        walls = {"1x2": [], "2x1": []}
        ratios, results = [], {}
        for rep in range(args.reps):
            order = ("1x2", "2x1") if rep % 2 == 0 else ("2x1", "1x2")
            got = {layout: _run(layout, what, args) for layout in order}
            for layout, r in got.items():
                walls[layout].append(r["wall_s"])
                results[layout] = r
            ratios.append(got["1x2"]["wall_s"] / got["2x1"]["wall_s"])
        row = {"1 process x 2 threads (s)": statistics.median(walls["1x2"]),
               "2 ranks x 1 thread (s)": statistics.median(walls["2x1"]),
               "speed-up of 2 ranks (x)": statistics.median(ratios), "reps": args.reps}
        if what == "spectrum":
            a, b = results["1x2"]["eigenvalues"], results["2x1"]["eigenvalues"]
            row["max relative difference of eigenvalues"] = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        rows[what] = row
        print(what, json.dumps(row, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
