"""The FP32 baseline as a cached step (paper section 4: every quantized row starts from it).

:func:`baseline` trains a model of :mod:`hawqlib.models` on its data source (:mod:`hawqlib.repro.sources`:
CIFAR-10, or an ImageFolder tree for the ImageNet models), or takes a supplied weights file (the paper's
ImageNet rows start from published weights), and stores it as an artifact keyed by everything that
determines it (:mod:`hawqlib.repro.artifacts`). Under ``torchrun`` it trains data-parallel (:mod:`hawqlib.distributed`).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import artifacts
from .. import distributed as hdist
from .. import models as hmodels
from . import sources
from ..files import atomic_write_json, file_sha256
from .artifacts import cached as _cached, read_json as _read_json
from ..train import TrainConfig, load_weights, save_model_file, train

__all__ = ["TRAIN_CODE_VERSION", "baseline_params", "initial_model", "baseline"]

#: Bumped when a change to :mod:`hawqlib.train` or :mod:`hawqlib.repro.data` changes trained weights.
TRAIN_CODE_VERSION = 1


def baseline_params(cfg: dict | None, model: str = "resnet20", data_root=None, weights=None) -> dict:
    """Parameters that determine a baseline (profile's ``baseline`` table, model, data digest).

    ``data_root``: a :class:`hawqlib.repro.data.DataSource`, or the root of the data ``model`` trains on
    (:func:`hawqlib.repro.sources.for_model`). ``weights``: a weights file supplied instead of training (its
    SHA-256 and the evaluation subset replace the training settings in the key).
    """
    source = sources.for_model(model, data_root)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no weights file at {path}")
        return {"model": model, "weights": {"sha256": file_sha256(path)}, "code": TRAIN_CODE_VERSION,
                "data": source.key(), "eval": {"test_subset": (cfg or {}).get("test_subset")}}
    return {"model": model, "train": dict(cfg), "code": TRAIN_CODE_VERSION, "data": source.key()}


def initial_model(model: str, seed: int, num_classes: int | None = None) -> torch.nn.Module:
    """The untrained ``model`` (a name in :mod:`hawqlib.models`) built under ``torch.manual_seed(seed)``.

    The baseline's initial weights are then a function of its artifact key (the seed is in it), the same in
    every process. ``num_classes`` defaults to the model's (10 for CIFAR-10, 1000 for ImageNet).
    """
    torch.manual_seed(seed)
    if num_classes is None or num_classes == hmodels.default_classes(model):
        return getattr(hmodels, model)()
    return hmodels.get(model, num_classes=num_classes)


def baseline(cfg: dict | None, model: str = "resnet20", data_root=None, *, progress: bool = True,
             force: bool | None = None, weights=None) -> tuple[torch.nn.Module, dict, Path]:
    """Train (or load) the FP32 baseline described by ``cfg``; return (model, log, artifact folder).

    ``data_root``: a :class:`hawqlib.repro.data.DataSource` or the root of ``model``'s data (CIFAR-10 for the
    CIFAR models, an ImageFolder tree for the ImageNet ones). ``weights``: a weights file
    (:func:`hawqlib.models.load_weights_file`), or ``"pretrained"`` for the published ImageNet weights found
    and checked by hash (:func:`hawqlib.models.find_pretrained`), taken as the baseline instead of
    training; it is evaluated on the test split and stored like a trained one. Training runs on
    :func:`hawqlib.distributed.device` (the GPU when there is one), data-parallel under ``torchrun``; the
    model returned is on the CPU.
    """
    source = sources.for_model(model, data_root)
    published = weights == "pretrained"  # the published file, found and checked by hash (hawqlib.models)
    if published:
        weights = hmodels.find_pretrained(model)
    params = baseline_params(cfg, model, source, weights)
    dev = hdist.device()
    seed = 0 if weights is not None else cfg["seed"]

    def compute(folder):
        net = initial_model(model, seed, source.num_classes)
        batch = cfg["batch_size"] if cfg else 1
        tr, te = source.loaders(batch_size=batch, seed=seed, train_subset=cfg.get("train_subset") if cfg else None,
                                test_subset=cfg.get("test_subset") if cfg else None)
        if weights is not None:
            from ..models import load_weights_file
            from ..train import evaluate

            if published:
                net = hmodels.get(model, weights="pretrained")
            else:
                load_weights_file(net, weights)
            t0 = time.perf_counter()
            ev = evaluate(net.to(dev), hdist.on_device(hdist.shard(te), dev))
            log = {"weights": str(weights), "epochs": [{"epoch": 0, "val_top1": ev["top1"], "val_top5": ev["top5"],
                                                        "val_loss": ev["loss"], "eval_s": time.perf_counter() - t0}]}
            return net.cpu(), log, 0.0
        tcfg = TrainConfig(epochs=cfg["epochs"], lr=cfg["lr"], schedule=cfg["schedule"],
                           momentum=cfg["momentum"], nesterov=cfg["nesterov"], weight_decay=cfg["weight_decay"],
                           seed=cfg["seed"], eval_every=cfg["eval_every"])
        if progress and hdist.is_main():
            print(f"baseline {model}: checkpoints and log in {folder}")
        t0 = time.perf_counter()
        log = train(net.to(dev), hdist.on_device(tr, dev), hdist.on_device(te, dev), config=tcfg, checkpoint_dir=folder,
                    resume=not (artifacts.force_recompute() if force is None else force), progress=progress)
        return net.cpu(), log, time.perf_counter() - t0

    def save(folder, value):
        net, log, session = value
        if weights is not None:  # a trained baseline's model.pt and log.json are written by train()
            save_model_file(net, folder / "model.pt", {"weights": str(weights)}, log["epochs"])
            atomic_write_json(folder / "log.json", log)
        total_wall = sum(r.get("wall_s", 0.0) + r.get("eval_s", 0.0) for r in log["epochs"])
        return {"wall_s": total_wall, "final": log["epochs"][-1], "this_session_s": session,
                **({"weights": str(weights)} if weights is not None else {"init_seed": cfg["seed"]})}

    def load(folder):
        net = initial_model(model, seed, source.num_classes)
        # verified by the artifact's manifest before load runs (committed model.pt files predate checkpoint digests)
        return load_weights(net, folder / "model.pt", require_digest=False), _read_json(folder / "log.json"), 0.0

    (net, log, _), folder = _cached(f"baseline_{model}", params, compute, save, load, force)
    return net, log, folder
