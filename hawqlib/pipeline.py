"""The paper's pipeline as cached steps: each returns a stored artifact when one matches, else computes it.

This is the layer the notebooks and the command line call. Every step keys its artifact
by its parameters, the code version of the modules it runs and the digest of its data
(:mod:`hawqlib.runs`); ``FORCE=1`` recomputes.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import data as hdata
from . import models as hmodels
from . import runs
from .train import TrainConfig, load_weights, train

__all__ = ["TRAIN_CODE_VERSION", "baseline_params", "baseline"]

#: Bumped when a change to :mod:`hawqlib.train` or :mod:`hawqlib.data` changes trained weights.
TRAIN_CODE_VERSION = 1


def baseline_params(cfg: dict, model: str = "resnet20", data_root=None) -> dict:
    """Parameters that determine a baseline run (profile's ``baseline`` table, model, data digest)."""
    train_split = hdata.cifar10("train", data_root)
    test_split = hdata.cifar10("test", data_root)
    return {"model": model, "train": dict(cfg), "code": TRAIN_CODE_VERSION,
            "data": {"train": train_split.digest, "test": test_split.digest}}


def baseline(cfg: dict, model: str = "resnet20", data_root=None, *, progress: bool = True,
             force: bool | None = None) -> tuple[torch.nn.Module, dict, Path]:
    """Train (or load) the FP32 baseline described by ``cfg``; return (model, log, artifact folder)."""
    params = baseline_params(cfg, model, data_root)
    folder = runs.artifact_dir(f"baseline_{model}", params)
    net = getattr(hmodels, model)()
    force = runs.force_recompute() if force is None else force
    if runs.is_complete(folder, params) and not force:
        import json

        return load_weights(net, folder / "model.pt"), json.loads((folder / "log.json").read_text()), folder
    tr, te = hdata.cifar10_loaders(data_root, batch_size=cfg["batch_size"], seed=cfg["seed"],
                                   train_subset=cfg.get("train_subset"), test_subset=cfg.get("test_subset"))
    tcfg = TrainConfig(epochs=cfg["epochs"], lr=cfg["lr"], schedule=cfg["schedule"],
                       momentum=cfg["momentum"], nesterov=cfg["nesterov"], weight_decay=cfg["weight_decay"],
                       seed=cfg["seed"], eval_every=cfg["eval_every"])
    if progress:
        print(f"baseline {model}: checkpoints and log in {folder}")
    t0 = time.perf_counter()
    log = train(net, tr, te, config=tcfg, checkpoint_dir=folder, resume=not force, progress=progress)
    wall = time.perf_counter() - t0
    total_wall = sum(r["wall_s"] + r.get("eval_s", 0.0) for r in log["epochs"])
    runs.write_manifest(folder, params, wall_s=total_wall, final=log["epochs"][-1], this_session_s=wall)
    return net, log, folder
