"""The paper's pipeline as cached steps: each returns a stored artifact when one matches, else computes it.

This is the layer the notebooks and the command line call. Every step keys its artifact
by its parameters, the code version of the modules it runs and the digest of its data
(:mod:`hawqlib.repro.artifacts`); ``FORCE=1`` recomputes. The load-or-compute protocol is
:func:`hawqlib.repro.artifacts.step.cached`; the steps are the paper's: the FP32 baseline, the Hessian spectrum
and traces of section 3.1, the loss landscape behind it, and the staged fine-tuning of section 3.2.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import artifacts
from .. import distributed as hdist
from . import sources
from ..files import atomic_torch_save, atomic_write_json, load_weights_only
from .artifacts import cached as _cached, read_json as _read_json
from ..blocks import quant_blocks
from ..surface import loss_surface

# =============================================================================== notebook steps
# The steps below serve the notebooks (notebooks/*.ipynb): each wraps one library call so that its
# result is an artifact keyed by everything that determines it. ``base`` is the key of the weights a
# step starts from: the baseline's artifact folder name (``folder.name`` from :func:`baseline`), or
# any string naming other weights (e.g. ``"resnet50-torchvision"``); it already carries the data digest.

#: Bumped when a change here or in :mod:`hawqlib.hessian` changes stored spectra, traces or landscapes.
HESSIAN_STEP_VERSION = 2
#: The ``"hessian"`` entry of those artifacts' keys: ``None`` since the first spectra were stored (read then
#: as an absent ``hessian.CODE_VERSION``). Kept so that every stored key stays valid; :data:`HESSIAN_STEP_VERSION`
#: versions :mod:`hawqlib.hessian` as well, so bump that one, never this.
HESSIAN_CODE_VERSION = None
#: Bumped when a change here, in :mod:`hawqlib.quant`, :mod:`hawqlib.finetune` or :mod:`hawqlib.export`
#: changes stored fine-tuned models.
FINETUNE_STEP_VERSION = 1

__all__ = ["HESSIAN_STEP_VERSION", "HESSIAN_CODE_VERSION", "FINETUNE_STEP_VERSION", "FINETUNE_SETTINGS", "hessian_batch", "spectrum",
            "spectrum_stability", "block_traces", "landscape", "finetuned", "FinetuneResult"]


def hessian_batch(n_samples: int, data_seed: int = 0, data_root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded sample of ``n_samples`` training images (normalized, no augmentation) for the Hessian.

    Our choice: the Hessian of the *training* loss (paper section 3.1), on a sample drawn without
    augmentation, so that the spectrum is a pure function of the weights and ``(n_samples, data_seed)``.
    ``data_root``: a :class:`hawqlib.repro.data.DataSource`, or CIFAR-10's root.
    """
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    return sources.resolve(data_root).sample(n_samples, data_seed)


def _sample_key(n_samples: int, data_seed: int, data_root) -> dict:
    """The key of :func:`hessian_batch`'s sample: CIFAR-10's as it always was (the baseline's key already names
    the data), any other source's with its own digest."""
    source = sources.resolve(data_root)
    if isinstance(source, sources.CIFAR10Source):
        return {"cifar10_train": n_samples, "seed": data_seed}
    return {f"{source.name}_train": n_samples, "seed": data_seed, "source": source.key()}


_SPECTRUM_KEYS = ("method", "solver", "tol", "max_iter", "seed")


def _hessian_code() -> dict:
    """The code versions in the key of a spectrum, traces or landscape artifact."""
    return {"step": HESSIAN_STEP_VERSION, "hessian": HESSIAN_CODE_VERSION}


def _finetune_code() -> dict:
    """The code versions in the key of a fine-tuning artifact (read directly: a missing one is an error)."""
    from .. import export, finetune, quant

    return {"step": FINETUNE_STEP_VERSION, "finetune": finetune.FINETUNE_FORMAT, "quant": quant.CODE_VERSION,
            "export": export.CODE_VERSION}


def spectrum(model: torch.nn.Module, base: str, cfg: dict, granularity="layer", *, data=None, data_key=None,
             vectors: bool = False, progress: bool = False, force: bool | None = None, data_root=None,
             **overrides):
    """Top Hessian eigenvalue of every block (paper section 3.1), stored as an artifact; ``(results, folder)``.

    ``cfg`` is a profile's ``hessian`` section (``n_samples``, ``data_seed``, ``method``, ``solver``, ``tol``,
    ``max_iter``, ``seed``); keyword ``overrides`` replace any of them. Without ``data`` the Hessian is that of
    the mean loss over :func:`hessian_batch`; with ``data`` (an ``(inputs, targets)`` pair) a JSON-able
    ``data_key`` naming it is required. ``vectors=True`` also stores each block's top eigenvector.
    Results are :func:`hawqlib.hessian.top_eigenvalues`'s (``.name``, ``.numel``, ``.eigenvalue``, ...).
    """
    from .. import hessian

    cfg = {**cfg, **overrides}
    needed = _SPECTRUM_KEYS + (("n_samples", "data_seed") if data is None else ())
    missing = [k for k in needed if k not in cfg]
    if missing:
        raise ValueError(f"hessian settings miss {missing}; pass a profile's 'hessian' section")
    if data is not None and data_key is None:
        raise ValueError("spectrum(data=...) needs data_key= (a JSON-able name of that data) for the artifact key")
    gran = granularity if isinstance(granularity, str) else list(granularity)
    params = {"base": base, "granularity": gran, "vectors": bool(vectors), "code": _hessian_code(),
              "data": data_key if data is not None else _sample_key(cfg["n_samples"], cfg["data_seed"], data_root),
              **{k: cfg[k] for k in _SPECTRUM_KEYS}}

    def compute(folder):
        batch = data if data is not None else hessian_batch(cfg["n_samples"], cfg["data_seed"], data_root)
        blocks = quant_blocks(model, gran)
        with hdist.computing_on(model):
            results = hessian.top_eigenvalues(model, torch.nn.CrossEntropyLoss(), batch, blocks,
                                              method=cfg["method"], solver=cfg["solver"], tol=cfg["tol"],
                                              max_iter=cfg["max_iter"], seed=cfg["seed"], return_vectors=vectors,
                                              # the stored spectra's verification (one autograd product),
                                              # kept with their keys after the method's default moved
                                              verify="autograd", progress=progress)
        for r in results:  # stored and returned on the CPU
            v = getattr(r, "vector", None)
            if isinstance(v, (list, tuple)):
                r.vector = type(v)(t.cpu() for t in v)
            elif v is not None:
                r.vector = v.cpu()
        return results

    def save(folder, results):
        hessian.save_spectra(folder / "spectrum.json", results)
        if vectors:
            atomic_torch_save(folder / "vectors.pt", {r.name: r.vector for r in results})

    def load(folder):
        results = hessian.load_spectra(folder / "spectrum.json")
        if vectors:
            vecs = load_weights_only(folder / "vectors.pt")
            for r in results:
                r.vector = vecs[r.name]
        return results

    return _cached("spectrum", params, compute, save, load, force, legacy_warnings=_unconverged_warnings)


def _unconverged_warnings(results) -> list[dict]:
    """What a spectrum stored before artifacts recorded their warnings says on load: one warning per block
    that did not converge, as its computation warned (:mod:`hawqlib.hessian.orchestrate`)."""
    return [{"category": "RuntimeWarning",
             "message": f"block {r.name!r}: residual {r.residual:.2e} exceeds tol {r.tol:g}; reported as not "
                        "converged (stored result)"} for r in results if not r.converged]


def spectrum_stability(model: torch.nn.Module, base: str, cfg: dict, granularity="layer", *,
                       progress: bool = False, force: bool | None = None, data_root=None) -> list[dict]:
    """lambda_i from several seeded samples of several sizes (``cfg["stability"]``): one row per (size, seed, block).

    Each (size, seed) is one :func:`spectrum` artifact, with that seed for both the data sample and the
    solver's start vector; rows hold ``n_samples``, ``seed``, ``block``, ``eigenvalue``, ``converged``.
    """
    st = cfg.get("stability")
    if not st or not st.get("n_samples") or not st.get("seeds"):
        raise ValueError("cfg['stability'] must give non-empty 'n_samples' and 'seeds' lists")
    rows = []
    for n in st["n_samples"]:
        for seed in st["seeds"]:
            res, _ = spectrum(model, base, cfg, granularity, n_samples=int(n), data_seed=int(seed), seed=int(seed),
                              progress=progress, force=force, data_root=data_root)
            rows += [{"n_samples": int(n), "seed": int(seed), "block": r.name, "eigenvalue": float(r.eigenvalue),
                      "converged": bool(r.converged)} for r in res]
    return rows


def block_traces(model: torch.nn.Module, base: str, cfg: dict, granularity="layer", *, progress: bool = False,
                 force: bool | None = None, data_root=None, **trace_kwargs):
    """Per-block Hessian traces (:func:`hawqlib.hessian.traces`) on the spectrum's data, as an artifact.

    ``cfg`` is the profile's ``hessian`` section; ``trace_kwargs`` pass on to ``hessian.traces`` and join
    the key. Returns ``(results, folder)``; the results are ``hessian.traces``'s, stored as JSON.
    """
    from .. import hessian

    gran = granularity if isinstance(granularity, str) else list(granularity)
    params = {"base": base, "granularity": gran, "code": _hessian_code(), "kind": "trace",
              "data": _sample_key(cfg["n_samples"], cfg["data_seed"], data_root), "seed": cfg["seed"],
              "kwargs": trace_kwargs}

    def compute(folder):
        batch = hessian_batch(cfg["n_samples"], cfg["data_seed"], data_root)
        return hessian.traces(model, torch.nn.CrossEntropyLoss(), batch, quant_blocks(model, gran),
                              seed=cfg["seed"], progress=progress, **trace_kwargs)

    def save(folder, results):
        hessian.save_spectra(folder / "traces.json", results)

    return _cached("traces", params, compute, save, lambda f: hessian.load_spectra(f / "traces.json"), force)


def landscape(model: torch.nn.Module, base: str, cfg: dict, block_name: str, directions, coords, *,
              directions_key, granularity="layer", force: bool | None = None, data_root=None) -> tuple:
    """:func:`hawqlib.surface.loss_surface` on the profile's Hessian sample, as an artifact; ``(losses, folder)``.

    ``cfg`` is the profile's ``landscape`` section (``n_samples``, ``data_seed``); ``directions_key`` a
    JSON-able name of the directions (e.g. the spectrum folder and the random seed) for the key.
    """
    coords = torch.as_tensor(coords, dtype=torch.float64)
    gran = granularity if isinstance(granularity, str) else list(granularity)
    blocks = {b.name: b for b in quant_blocks(model, gran)}
    if block_name not in blocks:
        raise ValueError(f"no block {block_name!r} at granularity {gran!r}; blocks: {list(blocks)}")
    params = {"base": base, "block": block_name, "granularity": gran, "directions": directions_key,
              "coords": coords.tolist(), "code": _hessian_code(),
              "data": _sample_key(cfg["n_samples"], cfg["data_seed"], data_root)}

    def compute(folder):
        batch = hessian_batch(cfg["n_samples"], cfg["data_seed"], data_root)
        return loss_surface(model, blocks[block_name], directions, coords, batch)

    def save(folder, losses):
        atomic_write_json(folder / "losses.json", {"coords": coords.tolist(), "loss": losses.tolist()})

    def load(folder):
        return torch.tensor(_read_json(folder / "losses.json")["loss"], dtype=torch.float64)

    return _cached("landscape", params, compute, save, load, force)


_FT_KEYS = ("stages", "epochs_per_stage", "final_epochs", "lr", "momentum", "nesterov", "weight_decay",
            "batch_size", "seed", "train_subset", "test_subset", "calibration_batches")
#: Optional fine-tuning settings (extensions to the paper's recipe, hawqlib.finetune): part of the key only when
#: set to something other than their default, so that the keys of runs without them are as before.
_FT_OPTIONAL = {"act_step": "fitted", "distill": None}
#: Every fine-tuning setting ``finetuned`` reads from its ``cfg``, with the default of the optional ones (None
#: for the required ones).
FINETUNE_SETTINGS = {**dict.fromkeys(_FT_KEYS), **_FT_OPTIONAL}


def finetune_epochs(ft: dict) -> int:
    """Fine-tuning epochs in all of the schedule ``ft`` (a profile's ``finetune`` settings): one stage per group
    of blocks, then the final stage with every block quantized; a direct run trains that many epochs at once."""
    return int(ft["stages"]) * int(ft["epochs_per_stage"]) + int(ft.get("final_epochs", 0))


@dataclass
class FinetuneResult:
    """A fine-tuned mixed-precision model and what the notebooks report about it.

    ``top1``/``top5``: test accuracy (%) of the fake-quantized model; ``packed_top1``: that of the model
    restored from the packed file (equal, up to float rounding of the packed scales); ``size_bytes``: the
    weight size by :func:`hawqlib.size.model_size_bytes`'s accounting; ``packed_bytes``: the size of the
    packed file on disk; ``wall_s``: the fine-tuning time summed over its epochs and evaluations, across
    every session that resumed it (a stage shared from another run counts that run's time).
    """

    qmodel: torch.nn.Module = field(repr=False)
    history: dict = field(repr=False)
    bit_config: object
    order: list | None
    top1: float
    top5: float
    packed_top1: float
    size_bytes: int
    packed_bytes: int
    wall_s: float
    folder: Path


def _stage_sharing_runs(params: dict) -> list[Path]:
    """The artifact folders of the fine-tuning runs that train the stages quantizing a group as the run of
    ``params`` does: the same key but for :data:`hawqlib.finetune.FINAL_STAGE_SETTINGS` (no distillation, no
    final stage, or neither). Listed whether or not they exist; ``staged_finetune`` takes what it finds. A run's
    stage files go once its artifact completes (``run/`` is deleted), so what is shared is the finished stages
    of a run still in progress or interrupted: two ``python -m hawqlib finetune`` processes side by side."""
    ft = params["finetune"]
    others = []
    for drop_distill in (False, True):
        for final in (ft["final_epochs"], 0):
            other = {k: v for k, v in ft.items() if not (drop_distill and k == "distill")}
            other["final_epochs"] = final
            if other != ft and other not in others and not ("distill" in other and not final):
                others.append(other)
    return [artifacts.artifact_dir("finetune", dict(params, finetune=o)) for o in others]


def finetuned(model: torch.nn.Module, base: str, bit_config, order, cfg: dict, *, direct: bool = False,
              progress: bool = False, force: bool | None = None, data_root=None,
              provenance: dict | None = None, load_only: bool = False) -> FinetuneResult | None:
    """Fine-tune ``model`` to ``bit_config`` (paper section 3.2), stored as an artifact with its packed file.

    ``order``: block names, first quantized first (e.g. the names of :func:`hawqlib.order.finetune_order`); ``cfg``: a profile's
    ``finetune`` section. ``direct=True`` is the direct baseline (every block at once, for the same total
    number of epochs, :func:`hawqlib.finetune.direct_finetune`; ``order`` is then ignored). The run
    checkpoints every epoch inside the artifact folder (``run/``) and resumes after an interruption; once the
    artifact is complete, ``run/`` is deleted (the fine-tuned model, its packed file, the bit config and the
    history stay). ``provenance`` (JSON-able, e.g. the keys of the baseline and of the spectrum that fed the
    allocation) is recorded in the manifest of a newly computed artifact, outside the key. ``load_only=True``
    returns ``None`` instead of computing when no complete artifact matches. ``cfg`` may also set the optional
    ``act_step`` and ``distill`` of :func:`hawqlib.finetune.staged_finetune` (staged runs only).
    """
    from .. import export, finetune, quant, size
    from ..train import evaluate

    missing = [k for k in _FT_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"finetune settings miss {missing}; pass a profile's 'finetune' section")
    if not isinstance(bit_config, quant.BitConfig):
        raise TypeError(f"bit_config must be a hawqlib.quant.BitConfig, got {type(bit_config).__name__}")
    bit_config.validate(model)
    order = None if direct else [getattr(o, "name", o) for o in order]
    ft = {k: cfg[k] for k in _FT_KEYS}
    ft.update({k: cfg[k] for k, default in _FT_OPTIONAL.items() if cfg.get(k, default) != default})
    if direct and len(ft) > len(_FT_KEYS):
        raise ValueError(f"direct fine-tuning takes none of {sorted(_FT_OPTIONAL)}; got {sorted(set(ft) - set(_FT_KEYS))}")
    params = {"base": base, "bit_config": bit_config.to_dict(), "order": order, "direct": bool(direct),
              "finetune": ft, "code": _finetune_code()}
    if load_only and hdist.on_main(artifacts.find, "finetune", params) is None:  # a published copy counts
        return None
    tr, te = sources.resolve(data_root).loaders(batch_size=ft["batch_size"], seed=ft["seed"],
                                                train_subset=ft["train_subset"], test_subset=ft["test_subset"])
    common = dict(lr=ft["lr"], checkpoint_dir=None, resume=True, progress=progress, seed=ft["seed"],
                  weight_decay=ft["weight_decay"], momentum=ft["momentum"], nesterov=ft["nesterov"],
                  calibration_batches=ft["calibration_batches"],
                  calibration="moving_average")  # the rule the stored runs used (not in their key; book/choices.md)
    staged_options = {k: ft[k] for k in _FT_OPTIONAL if k in ft}

    def compute(folder):
        kw = dict(common, checkpoint_dir=folder / "run", resume=not artifacts.force_recompute() if force is None
                  else not force)
        dev = hdist.device()
        tr_d, te_d = hdist.on_device(tr, dev), hdist.on_device(te, dev)
        with hdist.computing_on(model):
            if direct:
                qmodel, history = finetune.direct_finetune(model, bit_config, tr_d, te_d, epochs=finetune_epochs(ft),
                                                           **kw)
            else:
                if kw["resume"]:  # runs whose group stages are this one's (hawqlib.finetune, "Shared stages")
                    kw["share_from"] = {d.name: d / "run" for d in _stage_sharing_runs(params)}
                qmodel, history = finetune.staged_finetune(model, bit_config, order, tr_d, te_d,
                                                           stages=ft["stages"], epochs_per_stage=ft["epochs_per_stage"],
                                                           final_epochs=ft["final_epochs"], **staged_options, **kw)
        te_eval = hdist.shard(te_d)  # under a process group each rank evaluates its slices
        ev = evaluate(qmodel.to(dev), te_eval)
        qmodel.cpu()
        packed = folder / "model.hawq"

        def write_packed():  # rank 0 writes; every rank evaluates the model read back from the file
            export.save_packed(qmodel, packed, arch=export.arch_of(model))
            return packed.stat().st_size, export.load_packed(packed, model)

        packed_bytes, restored = hdist.on_main(write_packed)
        pev = evaluate(restored.to(dev), te_eval)
        wall = sum(r.get("wall_s", 0.0) + r.get("eval_s", 0.0) for r in history["epochs"])
        return {"qmodel": qmodel.eval(), "history": history, "top1": ev["top1"], "top5": ev["top5"],
                "packed_top1": pev["top1"], "size_bytes": int(size.model_size_bytes(model, bit_config)),
                "packed_bytes": packed_bytes, "wall_s": wall}

    def save(folder, r):  # rank 0 alone under a process group (hawqlib.repro.artifacts.cached)
        atomic_torch_save(folder / "qmodel.pt", r["qmodel"].state_dict())
        atomic_write_json(folder / "history.json", r["history"])
        bit_config.save(folder / "bit_config.json")
        return {"wall_s": r["wall_s"], "provenance": provenance,
                **{k: r[k] for k in ("top1", "top5", "packed_top1", "size_bytes", "packed_bytes")}}

    def load(folder):
        m = artifacts.read_manifest(folder)
        qmodel = quant.quantize_model(model, bit_config)
        qmodel.load_state_dict(load_weights_only(folder / "qmodel.pt"))
        qmodel.eval()
        return {"qmodel": qmodel, "history": _read_json(folder / "history.json"),
                "wall_s": m["wall_s"], **{k: m[k] for k in ("top1", "top5", "packed_top1", "size_bytes",
                                                              "packed_bytes")}}

    r, folder = _cached("finetune", params, compute, save, load, force)
    if (hdist.is_main() and folder.parent == artifacts.artifacts_root() and artifacts.is_complete(folder, params)
            and (folder / "run").exists()):  # never in a published copy (read-only)
        # The resume state (per-epoch checkpoints with optimizer state, one model per stage: several times
        # the model's size) is dead weight once the artifact is complete; what the notebooks read stays.
        shutil.rmtree(folder / "run")
    return FinetuneResult(bit_config=bit_config, order=order, folder=folder, **r)
