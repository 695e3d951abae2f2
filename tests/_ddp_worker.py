"""Worker of tests/test_distributed.py: run under ``torchrun`` (every rank) or imported (one process).

``python tests/_ddp_worker.py OUT first``: (a) a few training steps, (b) a Hessian spectrum, (c) an
uninterrupted 2-epoch run with checkpoints and one stopped after its first epoch's checkpoint, (d) a
two-stage quantized fine-tuning, uninterrupted and stopped after its first stage; ``... OUT resume``:
the stopped runs restarted, and the run killed by the test (``... OUT hang`` waits to be killed
after its first epoch's checkpoint) restarted.
Each rank saves what it got to ``OUT/<step>.rank<r>.pt``.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from hawqlib import distributed as hdist
from hawqlib.repro.data import TensorLoader
from hawqlib.train import train

N_TRAIN, BATCH = 41, 16   # the last global batch (9) splits unevenly (4 + 5) over two ranks


class Tiny(nn.Module):
    """A conv and a linear layer, no BatchNorm (on the CPU each rank would normalize its own slice)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))


def model() -> nn.Module:
    torch.manual_seed(0)
    return Tiny()


def loaders():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (N_TRAIN, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 3, (N_TRAIN,), generator=g)
    tr = TensorLoader(x, y, BATCH, shuffle=True, augment=True, seed=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    te = TensorLoader(x[:20], y[:20], 8, mean=(0.5,) * 3, std=(0.25,) * 3)
    return tr, te


def run_train(epochs: int, ckdir=None, stop_after: int | None = None, hang_after: Path | None = None):
    net = model()
    tr, te = loaders()
    cb = (lambda rec: rec["epoch"] >= stop_after) if stop_after else None
    if hang_after is not None:  # after the first epoch's checkpoint: say so, then wait to be killed
        def hang(rec):
            if rec["epoch"] == 1:
                hang_after.write_text(str(os.getpid()))  # epoch 1 checkpointed: the test kills this pid
                time.sleep(300)
        cb = hang
    log = train(net, tr, te, epochs=epochs, lr=0.05, checkpoint_dir=ckdir, progress=False, callback=cb)
    return {"state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
            "metrics": [{k: v for k, v in r.items() if k not in ("wall_s", "images_per_s", "eval_s")}
                        for r in log["epochs"]]}


def run_hessian():
    from hawqlib.hessian import top_eigenvalues

    net = model()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 3, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    res = top_eigenvalues(net, nn.CrossEntropyLoss(), (x, y), chunk_size=3, tol=1e-6, max_iter=40,
                          progress=False)
    return {"eig": [r.eigenvalue for r in res], "method": [r.method for r in res]}


#: The gap attempts' fine-tuning options: a learned activation step (its gradient averaged over ranks by
#: hawqlib.train) and distillation in a final stage.
LEARNED = {"act_step": "learned", "final_epochs": 1, "distill": {"alpha": 0.5, "temperature": 2.0}}


def run_finetune(root, stop_after: int | None = None, **options):
    from hawqlib.bitconfig import BitConfig
    from hawqlib.finetune import staged_finetune

    net = model()
    tr, te = loaders()
    cfg = BitConfig(weights={"conv": 4, "fc": 4}, act_bits=8)
    cb = (lambda rec: rec["global_epoch"] >= stop_after) if stop_after else None
    q, hist = staged_finetune(net, cfg, ["fc", "conv"], tr, te, stages=2, epochs_per_stage=1, lr=0.01,
                              checkpoint_dir=root, progress=False, calibration_batches=2, callback=cb, **options)
    return {"state": {k: v.detach().cpu().clone() for k, v in q.state_dict().items()},
            "val": [r["val_top1"] for r in hist["epochs"]], "complete": hist["complete"],
            "shared": [st.get("shared_from") for st in hist["stages"]]}


def main(out: Path, what: str) -> None:
    hdist.setup()
    torch.set_num_threads(1)
    r = hdist.rank()
    try:
        if what == "first":
            steps = {"a": lambda: run_train(1),
                     "b": run_hessian,
                     "c_full": lambda: run_train(2, out / "ck_full"),
                     "c_stop": lambda: run_train(2, out / "ck_resume", stop_after=1),
                     "d": lambda: run_finetune(out / "ft"),
                     "d_stop": lambda: run_finetune(out / "ft_resume", stop_after=1),
                     "e": lambda: run_finetune(out / "ft_lsq", **LEARNED),
                     "e_plain": lambda: run_finetune(out / "ft_plain", **{**LEARNED, "distill": None})}
        elif what == "hang":
            steps = {"c_hang": lambda: run_train(2, out / "ck_kill", hang_after=out / f"hang.rank{r}")}
        else:
            steps = {"c_killed_resume": lambda: run_train(2, out / "ck_kill"),
                     "c_resume": lambda: run_train(2, out / "ck_resume"),
                     "d_resume": lambda: run_finetune(out / "ft_resume"),
                     # the distilled run, its stages before the final one taken from the run without distillation
                     "e_shared": lambda: run_finetune(out / "ft_shared", share_from={"plain": out / "ft_plain"},
                                                      **LEARNED)}
        for name, fn in steps.items():
            torch.save(fn(), out / f"{name}.rank{r}.pt")
    finally:
        hdist.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
