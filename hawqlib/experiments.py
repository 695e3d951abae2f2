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

__all__ = ["RunSpec", "GROUPS", "run_names", "check_names", "allocation", "run_specs", "run"]


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


def _catalogue(profile: dict) -> list[tuple[str, str | None, tuple]]:
    """Every run of ``profile`` as ``(name, group, recipe)``, in the order to compute them; names are made here only.

    ``recipe`` is ``("staged", allocation policy, order kind)`` or ``("direct", weight bits, act bits)``;
    ``group`` is ``None`` for ``hawq``, which both groups show.
    """
    F, X = profile["finetune"], profile["ablation"]
    return ([("hawq", None, ("staged", "hawq", "omega"))]
            + [(f"W{u['weight_bits']}A{u['act_bits']}", "table", ("direct", u["weight_bits"], u["act_bits"]))
               for u in F["uniform"]]
            + [(f"alloc-{p}", "ablation", ("staged", p, "omega")) for p in X["allocations"] if p != "hawq"]
            + [(f"order-{k}", "ablation", ("staged", "hawq", k)) for k in X["orders"] if k != "omega"])


def run_names(profile: dict, group: str | None = None) -> list[str]:
    """The names of the runs of ``profile`` in the order to compute them, without computing anything.

    ``group`` selects the ResNet20 table's runs (``"table"``: ``hawq`` and the direct rows) or the
    ablation's (``"ablation"``: ``hawq``, ``alloc-*`` and ``order-*``); ``None`` gives every run.
    """
    if group is not None and group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; valid: {', '.join(GROUPS)} or None (every run)")
    return [name for name, g, _ in _catalogue(profile) if group is None or g in (None, group)]


def check_names(profile: dict, names) -> None:
    """Raise ``ValueError`` naming every entry of ``names`` that is not a run of ``profile``, and the valid ones."""
    valid = run_names(profile)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown run(s) {', '.join(map(str, unknown))} for profile {profile['name']!r}; "
                         f"valid: {', '.join(valid)}")


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
    A, X = profile["allocation"], profile["ablation"]
    recipes = {name: recipe for name, _, recipe in _catalogue(profile)}
    names = list(recipes) if names is None else list(names)
    check_names(profile, names)
    target_name = next(iter(A["targets"]))
    bits: dict[str, quant.BitConfig] = {}  # allocations by policy: order-* runs share the hawq one

    def build(name: str) -> RunSpec:
        kind, x, y = recipes[name]
        if kind == "direct":
            bc = quant.BitConfig.uniform(model, x, act_bits=y, granularity=A["granularity"])
            return RunSpec(name, f"direct W{x}A{y}: every block at once", bc, None, direct=True)
        if x not in bits:
            bits[x] = allocation(model, spectra, profile, x)
        description = (f"HAWQ {target_name} / A{A['act_bits']}: S-order allocation, Omega order" if name == "hawq"
                       else f"{x} allocation at the same size, Omega order" if y == "omega"
                       else f"HAWQ allocation, {y} fine-tuning order")
        order = tuple(pipeline.order_blocks(model, spectra, bits[x], y, seed=X["seed"]))
        return RunSpec(name, description, bits[x], order)

    return {n: build(n) for n in names}


def run(model: torch.nn.Module, base: str, spec: RunSpec, profile: dict, *, progress: bool = False,
        force: bool | None = None, data_root=None) -> pipeline.FinetuneResult:
    """Fine-tune (or load) the run ``spec`` with the profile's ``finetune`` schedule; see :func:`hawqlib.pipeline.finetuned`."""
    return pipeline.finetuned(model, base, spec.bit_config, None if spec.direct else list(spec.order),
                              profile["finetune"], direct=spec.direct, progress=progress, force=force,
                              data_root=data_root)
