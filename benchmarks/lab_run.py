"""The lab profile's full run: every notebook executed at ``profile = "lab"``, each one's wall time and the load.

Not from the paper: the measurement behind the README's "For instructors" section. The notebooks run one after
another through the book runner (:func:`hawqlib.repro.book.execute`, papermill, as ``python -m hawqlib book
--profile lab --no-build`` does), their executed copies go to a temporary folder (``--out``), and the lab's
artifacts to ``data/scratch/lab``, which git ignores; the committed ``data/artifacts`` is only read. With
``--fresh`` (the default) the lab's scratch folder is emptied first, so every cheap step is computed, not
loaded from an earlier lab run. Printed: a Markdown table of each notebook's wall time and the 1-minute load
average before and after it, the total, and the machine.

    HAWQ_DATA=... HAWQ_CACHE=... OMP_NUM_THREADS=2 python benchmarks/lab_run.py [--out DIR] [--keep]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for the executed notebooks (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep data/scratch/lab (default: start from an empty one)")
    ap.add_argument("--only", nargs="+", default=None, help="these notebooks only")
    args = ap.parse_args()
    from hawqlib.repro import book
    from hawqlib.repro.paths import project_root

    scratch = Path(book.artifacts_for("lab"))
    if not args.keep and scratch.exists() and not os.environ.get("HAWQ_ARTIFACTS"):
        shutil.rmtree(scratch)
    out = Path(args.out or tempfile.mkdtemp(prefix="hawq-lab-run-"))
    names = args.only or book.available(project_root() / "notebooks")
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; store {scratch}; out {out}")
    rows, total = [], 0.0
    t_start = time.time()
    for name in names:
        before = os.getloadavg()[0]
        wall = book.execute(name, "lab", out_dir=out, progress=False)
        after = os.getloadavg()[0]
        total += wall
        rows.append((name, wall, before, after))
        print(f"{name}: {wall:.1f} s (load {before:.1f} -> {after:.1f})", flush=True)
    print(f"\nfinished {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, started "
          f"{time.strftime('%H:%M:%S', time.gmtime(t_start))} UTC\n")
    print("| notebook | wall (s) | load before | load after |\n|---|---|---|---|")
    for name, wall, before, after in rows:
        print(f"| {name} | {wall:.1f} | {before:.1f} | {after:.1f} |")
    print(f"| **total** | **{total:.1f}** ({total / 60:.1f} min) | | |")


if __name__ == "__main__":
    main()
