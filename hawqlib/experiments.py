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

__all__ = ["RunSpec", "run_names", "allocation", "run_specs", "run"]


@dataclass(frozen=True)
class RunSpec:
    """One named fine-tuning run: its bit config, its order (``None`` when direct) and a one-line description."""

    name: str
    description: str
    bit_config: quant.BitConfig
    order: tuple[str, ...] | None
    direct: bool = False


def run_names(profile: dict) -> list[str]:
    """The names :func:`run_specs` returns for ``profile``, in its order, without computing anything."""
    F, X = profile["finetune"], profile["ablation"]
    return (["hawq"] + [f"W{u['weight_bits']}A{u['act_bits']}" for u in F["uniform"]]
            + [f"alloc-{p}" for p in X["allocations"] if p != "hawq"]
            + [f"order-{k}" for k in X["orders"] if k != "omega"])


def allocation(model: torch.nn.Module, spectra, profile: dict, policy: str) -> quant.BitConfig:
    """The bit allocation of ``policy`` at the profile's first target (its ``allocation`` section)."""
    A = profile["allocation"]
    target = next(iter(A["targets"].values()))
    return allocate.allocate_bits(model, spectra, target_compression=target, choices=tuple(A["choices"]),
                                  policy=policy, act_bits=A["act_bits"], granularity=A["granularity"],
                                  seed=profile["ablation"]["seed"])


def run_specs(model: torch.nn.Module, spectra, profile: dict) -> dict[str, RunSpec]:
    """Every run of the ResNet20 table and the ablation for ``profile``, by name, in the order to compute them.

    ``spectra`` are the baseline's block spectra at the profile's allocation granularity. The HAWQ run
    comes first (the headline row), then the direct rows, then the ablation's allocations and orders.
    """
    A, F, X = profile["allocation"], profile["finetune"], profile["ablation"]
    target_name = next(iter(A["targets"]))
    hawq = allocation(model, spectra, profile, "hawq")

    def staged(name, description, bc, kind="omega"):
        order = tuple(pipeline.order_blocks(model, spectra, bc, kind, seed=X["seed"]))
        return RunSpec(name, description, bc, order)

    specs = [staged("hawq", f"HAWQ {target_name} / A{A['act_bits']}: S-order allocation, Omega order", hawq)]
    for u in F["uniform"]:
        w, a = u["weight_bits"], u["act_bits"]
        bc = quant.BitConfig.uniform(model, w, act_bits=a, granularity=A["granularity"])
        specs.append(RunSpec(f"W{w}A{a}", f"direct W{w}A{a}: every block at once", bc, None, direct=True))
    for policy in X["allocations"]:
        if policy != "hawq":
            specs.append(staged(f"alloc-{policy}", f"{policy} allocation at the same size, Omega order",
                                allocation(model, spectra, profile, policy)))
    for kind in X["orders"]:
        if kind != "omega":
            specs.append(staged(f"order-{kind}", f"HAWQ allocation, {kind} fine-tuning order", hawq, kind))
    return {s.name: s for s in specs}


def run(model: torch.nn.Module, base: str, spec: RunSpec, profile: dict, *, progress: bool = False,
        force: bool | None = None, data_root=None) -> pipeline.FinetuneResult:
    """Fine-tune (or load) the run ``spec`` with the profile's ``finetune`` schedule; see :func:`hawqlib.pipeline.finetuned`."""
    return pipeline.finetuned(model, base, spec.bit_config, None if spec.direct else list(spec.order),
                              profile["finetune"], direct=spec.direct, progress=progress, force=force,
                              data_root=data_root)
