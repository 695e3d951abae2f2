"""The front door as a cached step: :func:`hawqlib.quantize` on a stored CIFAR-10 baseline, kept as an artifact.

:func:`quantized` runs HAWQ end to end (sections 3.1-3.3: the top Hessian eigenvalue of every block, the
bits under a size budget in the order of S_i = lambda_i / n_i, fine-tuning in stages in the Omega order)
through the same public call a user makes, and stores what it returns, so that a page that shows the result
loads it instead of recomputing it. The artifact is keyed by the baseline's key (which carries the data
digest), the settings and the code versions (:func:`code_versions`); it holds

- ``qmodel.pt``: the quantized model's state_dict (weights, quantizer ranges and switches);
- ``model.hawq``: the bit-packed file (:mod:`hawqlib.export`);
- ``report.json``: :meth:`hawqlib.workflow.QuantizeReport.to_dict` (spectra, allocation table, Omega order,
  sizes, fine-tuning history, accuracies), the packed file named relative to the folder;
- ``bit_config.json``: the allocation;
- ``post_training.json``: top-1 without fine-tuning (weights quantized once, activation ranges calibrated) of
  the HAWQ allocation and of uniform bit widths, a cheap reference beside the fine-tuned result.

The fine-tuning checkpoints every epoch inside the folder (``run/``), so an interrupted computation resumes
there (the Hessian, a pure function of the weights and the seeded sample, is recomputed); ``run/`` is deleted
once the artifact is complete. Loading verifies every file against the manifest's SHA-256
(:mod:`hawqlib.repro.artifacts`).

Our choice, stated here once: the Hessian sample is the project's (:func:`hawqlib.repro.pipeline.hessian_batch`: a
seeded sample of training images without augmentation), not the front door's default of the first batches of
the augmented training loader, so that the spectrum is a function of the weights and the seed alone.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data as hdata
from .. import export, quant
from . import pipeline
from ..bitconfig import BitConfig
from ..train import evaluate
from ..workflow import FinetuneSchedule, quantize

# The artifact machinery (hawqlib.repro.artifacts), imported in this one place.
from . import artifacts
from ..files import atomic_torch_save, atomic_write_json, load_weights_only
from .artifacts import cached, read_json

__all__ = ["STEP_VERSION", "KIND", "SETTINGS_KEYS", "QuantizedRun", "code_versions", "quantized"]

#: Bumped when a change here or in :mod:`hawqlib.workflow` (or what it calls and no other version covers:
#: allocation, Omega order) changes stored results.
STEP_VERSION = 1
#: The artifact kind: folders are ``data/artifacts/quantize-<key>``.
KIND = "quantize"
#: The settings a run needs (a profile's ``own_network.quantize`` section).
SETTINGS_KEYS = ("target_compression", "measure", "act_bits", "choices", "granularity", "seed", "hessian",
                 "finetune", "uniform_bits")
_HESSIAN_KEYS = ("n_samples", "data_seed", "method", "solver", "tol", "max_iter")
_FINETUNE_KEYS = ("stages", "epochs_per_stage", "final_epochs", "lr", "momentum", "nesterov", "weight_decay",
                  "calibration_batches", "batch_size", "train_subset", "test_subset")


@dataclass
class QuantizedRun:
    """A stored (or just computed) front-door result.

    ``report``: the JSON form of :class:`hawqlib.workflow.QuantizeReport` (identical whether computed or
    loaded); ``packed_top1``: top-1 (%) of the model restored from the packed file; ``post_training``: top-1 (%)
    without fine-tuning, by configuration name (``"hawq"``, ``"uniform W<b>"``), each with its bit config;
    ``wall_s``: the whole step; ``finetune_s``: the fine-tuning epochs and their evaluations (summed over
    every session that resumed them); ``hessian_s``: the rest of the call (the Hessian, the allocation, the
    calibration and the final evaluations), None when the fine-tuning resumed an earlier session's epochs.
    """

    qmodel: torch.nn.Module = field(repr=False)
    report: dict = field(repr=False)
    bit_config: BitConfig
    packed_top1: float
    post_training: dict
    wall_s: float
    finetune_s: float
    hessian_s: float | None
    folder: Path


def code_versions() -> dict:
    """The code versions in the artifact's key (read directly: a missing one is an error)."""
    return {"step": STEP_VERSION, "hessian": pipeline.HESSIAN_STEP_VERSION, "finetune": pipeline.FINETUNE_STEP_VERSION,
            "quant": quant.CODE_VERSION, "export": export.CODE_VERSION}


def _check_settings(settings: dict) -> None:
    missing = [k for k in SETTINGS_KEYS if k not in settings]
    missing += [f"hessian.{k}" for k in _HESSIAN_KEYS if k not in settings.get("hessian", {})]
    missing += [f"finetune.{k}" for k in _FINETUNE_KEYS if k not in settings.get("finetune", {})]
    if missing:
        raise ValueError(f"quantize settings miss {missing}; pass a profile's 'own_network.quantize' section")


def _as_stored(obj):
    """``obj`` in the form a JSON file of the artifact gives it back (:func:`hawqlib.files.atomic_write_json`
    sorts keys), so that a computed result and a loaded one are equal down to the order of their keys."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _post_training(model, configs: dict, train, test, batches: int) -> dict:
    """Top-1 of each bit config with weights quantized once and activation ranges calibrated, no training."""
    out = {}
    for name, cfg in configs.items():
        qm = quant.quantize_model(model, cfg)
        if cfg.act_bits is not None:
            train.set_epoch(0)
            quant.calibrate_activations(qm, train, num_batches=batches, calibration="moving_average")
        out[name] = {"top1": evaluate(qm, test)["top1"], "bit_config": cfg.to_dict()}
    return out


def quantized(model: torch.nn.Module, base: str, settings: dict, *, data_root=None, progress: bool = False,
              force: bool | None = None, load_only: bool = False) -> QuantizedRun | None:
    """:func:`hawqlib.quantize` on the FP32 ``model`` (CIFAR-10), stored as an artifact; a :class:`QuantizedRun`.

    ``base``: the key of ``model``'s weights (the baseline's folder name, :func:`hawqlib.repro.baseline.baseline`).
    ``settings``: :data:`SETTINGS_KEYS` (a profile's ``own_network.quantize`` section). ``force=None`` reads
    ``FORCE``. ``load_only=True`` returns None instead of computing when no complete artifact matches.
    """
    _check_settings(settings)
    s = {k: settings[k] for k in SETTINGS_KEYS}
    h, ft = {k: s["hessian"][k] for k in _HESSIAN_KEYS}, {k: s["finetune"][k] for k in _FINETUNE_KEYS}
    params = {"base": base, "settings": {**s, "hessian": h, "finetune": ft}, "code": code_versions()}
    if load_only and artifacts.find(KIND, params) is None:  # a published copy counts
        return None

    def compute(folder: Path) -> dict:
        t0 = time.perf_counter()
        tr, te = hdata.cifar10_loaders(data_root, batch_size=ft["batch_size"], seed=s["seed"],
                                       train_subset=ft["train_subset"], test_subset=ft["test_subset"])
        resumed = (folder / "run").exists()  # epochs of an earlier session: this session's time is not the call's
        hbatch = pipeline.hessian_batch(h["n_samples"], h["data_seed"], data_root)
        schedule = FinetuneSchedule(**{k: ft[k] for k in ("stages", "epochs_per_stage", "final_epochs", "lr",
                                                         "momentum", "nesterov", "weight_decay",
                                                         "calibration_batches")},
                                    checkpoint_dir=str(folder / "run"))
        qmodel, rep = quantize(model, tr, target_compression=s["target_compression"], measure=s["measure"],
                               act_bits=s["act_bits"], choices=tuple(s["choices"]), finetune=schedule,
                               hessian_data=hbatch, hessian={**{k: h[k] for k in ("method", "solver", "tol", "max_iter")},
                                        "verify": "autograd"},  # the stored results' verification
                               granularity=s["granularity"], val_data=te, packed_path=folder / "model.hawq",
                               device="cpu", seed=s["seed"], progress=progress,
                               calibration="moving_average")  # the stored results' rule (book/choices.md)
        wall = time.perf_counter() - t0
        report = _as_stored(rep.to_dict())
        report["packed_path"] = "model.hawq"  # relative to the artifact folder, wherever it is
        restored = export.load_packed(folder / "model.hawq", model)
        configs = {"hawq": rep.bit_config,
                   **{f"uniform W{b}": BitConfig.uniform(model, b, s["act_bits"], s["granularity"])
                      for b in s["uniform_bits"]}}
        finetune_s = sum(r.get("wall_s", 0.0) + r.get("eval_s", 0.0) for r in report["history"]["epochs"])
        return {"qmodel": qmodel, "report": report, "bit_config": rep.bit_config,
                "packed_top1": evaluate(restored, te)["top1"],
                "post_training": _as_stored(_post_training(model, configs, tr, te, ft["calibration_batches"])),
                "finetune_s": finetune_s, "hessian_s": None if resumed else wall - finetune_s}

    def save(folder: Path, r: dict) -> dict:
        atomic_torch_save(folder / "qmodel.pt", r["qmodel"].state_dict())
        atomic_write_json(folder / "report.json", r["report"])
        atomic_write_json(folder / "post_training.json", r["post_training"])
        r["bit_config"].save(folder / "bit_config.json")
        return {"packed_top1": r["packed_top1"], "finetune_s": r["finetune_s"], "hessian_s": r["hessian_s"]}

    def load(folder: Path) -> dict:
        m = artifacts.read_manifest(folder)
        bit_config = BitConfig.load(folder / "bit_config.json")
        qmodel = quant.quantize_model(model, bit_config)
        qmodel.load_state_dict(load_weights_only(folder / "qmodel.pt"))
        return {"qmodel": qmodel.eval(), "report": read_json(folder / "report.json"), "bit_config": bit_config,
                "post_training": read_json(folder / "post_training.json"),
                **{k: m[k] for k in ("packed_top1", "finetune_s", "hessian_s")}}

    r, folder = cached(KIND, params, compute, save, load, force)
    if folder.parent == artifacts.artifacts_root() and artifacts.is_complete(folder, params) and (folder / "run").exists():
        shutil.rmtree(folder / "run")  # the resume state is dead weight once the artifact is complete
    return QuantizedRun(wall_s=float(artifacts.read_manifest(folder)["wall_s"]), folder=folder, **r)
