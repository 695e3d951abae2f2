"""The chapter "Which sensitivity predicts the damage" as cached steps: the measured damage and calibrated accuracies.

:func:`damage` measures, on held-out training images, the loss increase when one block alone is quantized
(:func:`hawqlib.predictors.single_block_damage`, weights only and with the profile's activation bits), and the
empirical Fisher trace of every block on the Hessian's sample (:func:`hawqlib.predictors.empirical_fisher_traces`),
with the wall time and passes of each. :func:`calibrated_top1` is the test accuracy of a bit allocation after
calibration only (no fine-tuning). Both are artifacts keyed by everything that determines them
(:mod:`hawqlib.repro.artifacts`); the per-image damage is stored as tensors, read back with
``hawqlib.files.load_weights_only`` after the artifact's digests are verified.
"""
from __future__ import annotations

import time

import torch

from .. import allocate, allocators, quant, size
from ..blocks import quant_blocks
from ..files import atomic_torch_save, atomic_write_json, load_weights_only
from ..predictors import empirical_fisher_traces, single_block_damage
from ..sensitivity import quant_errors
from ..train import evaluate
from . import data as hdata
from . import pipeline, sources
from .artifacts import cached, read_json

__all__ = ["DAMAGE_STEP_VERSION", "ALLOCATIONS", "heldout_batch", "damage", "calibrated_top1", "allocation"]

#: Bumped when a change here or in :mod:`hawqlib.predictors` changes the stored damage or accuracies.
DAMAGE_STEP_VERSION = 1


def heldout_batch(n: int, after: int, seed: int = 0, data_root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` CIFAR-10 training images (normalized, no augmentation) that follow the first ``after`` of the seeded
    permutation :func:`hawqlib.repro.pipeline.hessian_batch` draws from: disjoint from the Hessian's sample of
    ``after`` images with the same seed."""
    source = sources.resolve(data_root)
    if not isinstance(source, sources.CIFAR10Source):
        raise ValueError(f"held-out images are drawn from CIFAR-10's training split; got the data source {source!r}")
    split = hdata.cifar10("train", source.root)
    if not (isinstance(n, int) and n >= 1 and isinstance(after, int) and after >= 0 and n + after <= len(split)):
        raise ValueError(f"need 1 <= n and 0 <= after with n + after <= {len(split)}; got n={n!r}, after={after!r}")
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[after:after + n].sort().values
    return hdata.normalize(split.images[idx]), split.labels[idx]


def _settings(P: dict) -> dict:
    S, H, A = P["sensitivity"], P["hessian"], P["allocation"]
    return {"bits": sorted(set(S["bits"]) | set(A["choices"])), "act_bits": S["act_bits"],
            "act_widths": list(S["bits"]), "n_images": S["n_images"], "after": H["n_samples"],
            "seed": S["data_seed"], "fisher": {"n_samples": H["n_samples"], "data_seed": H["data_seed"]},
            "calibration_images": S["calibration_images"], "granularity": A["granularity"]}


def damage(model: torch.nn.Module, base: str, P: dict, *, force: bool | None = None, data_root=None):
    """The measured damage and the Fisher traces at profile ``P``'s settings, as an artifact: ``(result, folder)``.

    ``result``: ``blocks`` (names, module order), ``bits`` (weights-only widths: the predictors' and every
    allocation choice), ``act_widths``, ``weights`` (a ``(blocks, bits, images)`` tensor of per-image loss
    increases, weights only), ``act`` (the same with ``act_bits`` activations, at ``act_widths``), ``fisher``
    (per block), and the cost of each: ``*_s`` (seconds) and ``*_passes`` (forward or forward-and-backward
    passes over one image).
    """
    cfg = _settings(P)
    params = {"base": base, "code": {"step": DAMAGE_STEP_VERSION, "quant": quant.CODE_VERSION}, **cfg,
              "data": pipeline._sample_key(cfg["n_images"] + cfg["after"], cfg["seed"], data_root)}

    def compute(folder):
        blocks = quant_blocks(model, cfg["granularity"])
        held = heldout_batch(cfg["n_images"], cfg["after"], cfg["seed"], data_root)
        fisher_batch = pipeline.hessian_batch(cfg["fisher"]["n_samples"], cfg["fisher"]["data_seed"], data_root)
        calib = pipeline.hessian_batch(cfg["calibration_images"], cfg["fisher"]["data_seed"], data_root)[0]
        t = time.perf_counter()
        fisher = empirical_fisher_traces(model, blocks, fisher_batch)
        fisher_s = time.perf_counter() - t
        t = time.perf_counter()
        w = single_block_damage(model, cfg["bits"], held, granularity=cfg["granularity"])
        weights_s = time.perf_counter() - t
        t = time.perf_counter()
        a = single_block_damage(model, cfg["act_widths"], held, granularity=cfg["granularity"],
                                act_bits=cfg["act_bits"], calibration=calib,
                                # the rule the stored results used (before "union" became the default)
                                calibration_rule="moving_average")
        act_s = time.perf_counter() - t
        n, m = len(blocks), cfg["n_images"]
        return {"blocks": [b.name for b in blocks], "bits": cfg["bits"], "act_widths": cfg["act_widths"],
                "fisher": fisher, "fisher_s": fisher_s, "fisher_passes": len(fisher_batch[0]),
                "weights": w, "weights_s": weights_s, "weights_passes": (n * len(cfg["bits"]) + 1) * m,
                "act": a, "act_s": act_s, "act_passes": (n * len(cfg["act_widths"]) + len(cfg["act_widths"])) * m}

    def save(folder, r):
        atomic_torch_save(folder / "damage.pt", {"weights": r["weights"].float(), "act": r["act"].float()})
        atomic_write_json(folder / "damage.json", {k: v for k, v in r.items() if k not in ("weights", "act")})

    def load(folder):
        r = read_json(folder / "damage.json")
        t = load_weights_only(folder / "damage.pt")
        return {**r, "weights": t["weights"].double(), "act": t["act"].double()}

    return cached("damage", params, compute, save, load, force)


def calibrated_top1(model: torch.nn.Module, base: str, bit_config: quant.BitConfig, P: dict, *,
                    force: bool | None = None, data_root=None) -> tuple[float, object]:
    """Test top-1 (%) of ``bit_config`` after calibration only (activation ranges observed on the profile's
    ``sensitivity.calibration_images`` training images, FP32-trained weights quantized as they are), as an
    artifact: ``(top1, folder)``."""
    S, H = P["sensitivity"], P["hessian"]
    params = {"base": base, "bits": bit_config.to_dict(),
              "code": {"step": DAMAGE_STEP_VERSION, "quant": quant.CODE_VERSION},
              "calibration": pipeline._sample_key(S["calibration_images"], H["data_seed"], data_root),
              "test_subset": S["test_subset"]}

    def compute(folder):
        q = quant.quantize_model(model, bit_config)
        quant.calibrate_activations(q, [pipeline.hessian_batch(S["calibration_images"], H["data_seed"], data_root)],
                                    calibration="moving_average")  # the stored results' rule, kept with their keys
        _, test = sources.resolve(data_root).loaders(batch_size=256, seed=0, test_subset=S["test_subset"])
        return evaluate(q, test)["top1"]

    def save(folder, top1):
        atomic_write_json(folder / "top1.json", {"top1": top1})

    return cached("calibrated", params, compute, save, lambda f: float(read_json(f / "top1.json")["top1"]), force)


#: The allocations beyond the paper that :func:`allocation` makes (:mod:`hawqlib.allocators`), and
#: ``"hawq-size:<policy>"``: HAWQ's at the size another policy of :func:`hawqlib.allocate.allocate_bits` reached.
ALLOCATIONS = ("trace", "v3", "greedy")


def allocation(model: torch.nn.Module, spectra, P: dict, kind: str, base: str, *, target: float | None = None,
               data_root=None) -> quant.BitConfig:
    """The bit allocation ``kind`` at the profile's first target (or ``target``), the weights' bits alone:

    - ``"trace"``: HAWQ's monotone rule with HAWQ-V2's average trace ``tr(H_i)/n_i`` as the sensitivity and
      ``tr(H_i)/n_i ||Q_b(W_i) - W_i||^2`` as the perturbation (:func:`hawqlib.allocators.sorted_allocation`);
    - ``"v3"``: HAWQ-V3's least summed ``tr(H_i)/n_i ||Q_b(W_i) - W_i||^2``, exact
      (:func:`hawqlib.allocators.least_perturbation_allocation`);
    - ``"greedy"``: the measured-damage greedy on the mean weights-only damage of :func:`damage`
      (:func:`hawqlib.allocators.greedy_allocation`);
    - ``"hawq-size:<policy>"``: HAWQ's allocation (:func:`hawqlib.allocate.allocate_bits`) at the weight
      compression that ``<policy>``'s allocation reached at the target (a budget that is a ceiling lets two
      allocations differ in size; this one compares the order of the bits alone).

    The traces are the stored ones of :func:`hawqlib.repro.pipeline.block_traces` (the Hessian's sample).
    """
    A = P["allocation"]
    if A["measure"] != "weights":
        raise ValueError(f"allocation {kind!r} counts the weights' bits alone; the profile's measure is "
                         f"{A['measure']!r}")
    target = next(iter(A["targets"].values())) if target is None else target
    common = {"target_compression": target, "choices": tuple(A["choices"]), "act_bits": A["act_bits"],
              "granularity": A["granularity"]}
    if kind.startswith("hawq-size:"):
        policy = kind.split(":", 1)[1]
        other = allocate.allocate_bits(model, spectra, policy=policy, seed=P["ablation"]["seed"],
                                       measure="weights", **common)
        reached = float(size.weight_compression(model, other))
        return allocate.allocate_bits(model, spectra, policy="hawq", measure="weights",
                                      **{**common, "target_compression": reached})
    if kind not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {kind!r}; valid: {', '.join(ALLOCATIONS)} or 'hawq-size:<policy>' "
                         f"with a policy of {', '.join(allocate.POLICIES)}")
    blocks = quant_blocks(model, A["granularity"])
    if kind == "greedy":
        r, _ = damage(model, base, P, data_root=data_root)
        mean = r["weights"].mean(2)
        col = [r["bits"].index(b) for b in A["choices"]]
        return allocators.greedy_allocation(model, {n: [float(mean[i, j]) for j in col]
                                                    for i, n in enumerate(r["blocks"])}, **common)
    traces, _ = pipeline.block_traces(model, base, P["hessian"], A["granularity"], data_root=data_root)
    per = {t.name: t.trace / t.numel for t in traces}
    pert = {b.name: [max(per[b.name], 0.0) * e for e in quant_errors(b, common["choices"])] for b in blocks}
    if kind == "trace":
        return allocators.sorted_allocation(model, per, pert, **common)
    return allocators.least_perturbation_allocation(model, pert, **common)
