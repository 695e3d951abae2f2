"""The named fine-tuning runs behind the ResNet20 table and the ablation (paper section 4).

Every row of the ResNet20 table and of the ablation is one call of :func:`hawqlib.pipeline.finetuned`
with a bit allocation, a fine-tuning order and the profile's ``finetune`` schedule. This module names
those runs once, so that the notebooks that show them and the command line that computes them in the
background (``python -m hawqlib finetune``) store and load the very same artifacts:

- ``"hawq"``: the HAWQ allocation (:func:`hawqlib.allocate.allocate_bits`, policy ``"hawq"``, at the
  profile's first allocation target), fine-tuned in stages in the Omega order (section 3.2);
- ``"W<w>A<a>"``: direct uniform quantization, every block at once, for the same number of epochs, one
  per entry of the profile's ``finetune.uniform`` (the context rows of the table);
- ``"alloc-<policy>"``: the allocation of another block order at the same budget (``reverse``,
  ``random``), fine-tuned in its own Omega order (the ablation of section 3.1);
- ``"order-<kind>"``: the HAWQ allocation fine-tuned in another order (``reverse``, ``random``; the
  ablation of section 3.2).

Random allocations and orders use the profile's ``ablation.seed``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import allocate, pipeline, quant

__all__ = ["RunSpec", "GROUPS", "run_names", "allocation", "run_specs", "run"]


@dataclass(frozen=True)
class RunSpec:
    """One named fine-tuning run: its bit config, its order (``None`` when direct) and a one-line description."""

    name: str
    description: str
    bit_config: quant.BitConfig
    order: tuple[str, ...] | None
    direct: bool = False


GROUPS = ("table", "ablation")
"""The groups of runs :func:`run_names` can select: the ResNet20 table's and the ablation's."""


def run_names(profile: dict, group: str | None = None) -> list[str]:
    """The names of the runs of ``profile`` in the order to compute them, without computing anything.

    ``group`` selects the ResNet20 table's runs (``"table"``: ``hawq`` and the direct rows) or the
    ablation's (``"ablation"``: ``hawq``, ``alloc-*`` and ``order-*``); ``None`` gives every run.
    """
    if group is not None and group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; valid: {', '.join(GROUPS)} or None (every run)")
    F, X = profile["finetune"], profile["ablation"]
    direct = [f"W{u['weight_bits']}A{u['act_bits']}" for u in F["uniform"]]
    ablation = ([f"alloc-{p}" for p in X["allocations"] if p != "hawq"]
                + [f"order-{k}" for k in X["orders"] if k != "omega"])
    return ["hawq"] + (direct if group != "ablation" else []) + (ablation if group != "table" else [])


def allocation(model: torch.nn.Module, spectra, profile: dict, policy: str) -> quant.BitConfig:
    """The bit allocation of ``policy`` at the profile's first target (its ``allocation`` section)."""
    A = profile["allocation"]
    target = next(iter(A["targets"].values()))
    return allocate.allocate_bits(model, spectra, target_compression=target, choices=tuple(A["choices"]),
                                  policy=policy, act_bits=A["act_bits"], granularity=A["granularity"],
                                  seed=profile["ablation"]["seed"])


def run_specs(model: torch.nn.Module, spectra, profile: dict,
              names: list[str] | None = None) -> dict[str, RunSpec]:
    """The runs ``names`` of ``profile`` (default: every one, see :func:`run_names`) by name, in that order.

    ``spectra`` are the baseline's block spectra at the profile's allocation granularity. Only the
    runs asked for are built (an allocation re-quantizes every block at every bit choice, so each
    costs seconds); an unknown name raises ``ValueError`` listing the valid ones.
    """
    A, F, X = profile["allocation"], profile["finetune"], profile["ablation"]
    valid = run_names(profile)
    names = valid if names is None else list(names)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown run(s) {', '.join(map(str, unknown))} for profile {profile['name']!r}; "
                         f"valid: {', '.join(valid)}")
    cache: dict[str, quant.BitConfig] = {}

    def bits(policy: str) -> quant.BitConfig:
        if policy not in cache:
            cache[policy] = allocation(model, spectra, profile, policy)
        return cache[policy]

    def staged(name, description, policy, kind="omega"):
        bc = bits(policy)
        return RunSpec(name, description, bc, tuple(pipeline.order_blocks(model, spectra, bc, kind, seed=X["seed"])))

    def direct(w, a):
        bc = quant.BitConfig.uniform(model, w, act_bits=a, granularity=A["granularity"])
        return RunSpec(f"W{w}A{a}", f"direct W{w}A{a}: every block at once", bc, None, direct=True)

    target_name = next(iter(A["targets"]))
    build = {"hawq": lambda: staged("hawq", f"HAWQ {target_name} / A{A['act_bits']}: S-order allocation, "
                                            "Omega order", "hawq")}
    for u in F["uniform"]:
        build[f"W{u['weight_bits']}A{u['act_bits']}"] = lambda u=u: direct(u["weight_bits"], u["act_bits"])
    for p in X["allocations"]:
        build[f"alloc-{p}"] = lambda p=p: staged(f"alloc-{p}", f"{p} allocation at the same size, Omega order", p)
    for k in X["orders"]:
        build[f"order-{k}"] = lambda k=k: staged(f"order-{k}", f"HAWQ allocation, {k} fine-tuning order", "hawq", k)
    return {n: build[n]() for n in names}


def run(model: torch.nn.Module, base: str, spec: RunSpec, profile: dict, *, progress: bool = False,
        force: bool | None = None, data_root=None) -> pipeline.FinetuneResult:
    """Fine-tune (or load) the run ``spec`` with the profile's ``finetune`` schedule; see :func:`hawqlib.pipeline.finetuned`."""
    return pipeline.finetuned(model, base, spec.bit_config, None if spec.direct else list(spec.order),
                              profile["finetune"], direct=spec.direct, progress=progress, force=force,
                              data_root=data_root)
