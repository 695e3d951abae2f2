"""The named fine-tuning runs behind the ResNet20 table and the ablation (paper section 4).

Every row of the ResNet20 table and of the ablation is one call of :func:`hawqlib.repro.pipeline.finetuned`
with a bit allocation, a fine-tuning order and the profile's ``finetune`` schedule. This module names
those runs once, so that the notebooks that show them and the command line that computes them in the
background (``python -m hawqlib finetune``) store and load the very same artifacts:

- ``"hawq"``: the headline row: the HAWQ allocation (:func:`hawqlib.allocate.allocate_bits`, policy
  ``"hawq"``) at the profile's first allocation target in the paper's measure (``allocation.measure``,
  ``"weights"``: the weights' mean bits, the paper's "weight size reduction"), fine-tuned in stages in
  the Omega order (section 3.2);
- ``"hawq-strict"``: the same at the same target counted over the whole model (``measure="model"``:
  codes, scales, folded BatchNorm, biases, activation parameters), a harsher budget than the paper's;
- ``"W<w>A<a>"``: direct uniform quantization, every block at once, for the same number of epochs, one
  per entry of the profile's ``finetune.uniform`` (the context rows of the table);
- ``"alloc-<policy>"``: the allocation of another block order at the headline budget (``reverse``,
  ``random``), fine-tuned in its own Omega order (the ablation of section 3.1);
- ``"order-<kind>"``: the HAWQ allocation fine-tuned in another order (``reverse``, ``random``; the
  ablation of section 3.2);
- the attempts at closing the headline row's accuracy gap (``finetune.attempts``, e.g. ``"hawq+final"``): the
  ``hawq`` run with some fine-tuning settings replaced (a final stage, a learned activation step,
  distillation: :func:`hawqlib.finetune.staged_finetune`). They are not the paper's recipe and have their own
  budget, so they form their own group;
- the allocations beyond the paper (``sensitivity.runs``, e.g. ``"alloc-v3"``; the chapter "Which sensitivity
  predicts the damage"): another allocation rule at the headline budget (:func:`hawqlib.repro.damage.allocation`:
  trace-sorted, HAWQ-V3's least perturbation, the measured-damage greedy) or HAWQ's at another allocation's
  achieved size, fine-tuned in its own Omega order. Their bits read stored traces and the measured damage, so
  :func:`run_specs` needs the baseline's key (``base``) for them.

Random allocations and orders use the profile's ``ablation.seed``. Each run is fine-tuned with one or
more seeds (``finetune.seeds``, by run name; default ``[finetune.seed]``): the seed changes the data order
and augmentation only, so the runs of one name share their baseline, spectrum and bits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import allocate, quant
from ..order import finetune_order
from . import pipeline

__all__ = ["RunSpec", "GROUPS", "describe_schedule", "run_names", "check_names", "seeds", "allocation", "run_specs",
           "epochs", "finetune_settings"]


@dataclass(frozen=True)
class RunSpec:
    """One named fine-tuning run: its bit config, its order (``None`` when direct) and a one-line description."""

    name: str
    description: str
    bit_config: quant.BitConfig
    order: tuple[str, ...] | None
    direct: bool = False
    #: Fine-tuning settings that replace the profile's ``finetune`` ones (the attempts'; empty otherwise).
    schedule: dict = field(default_factory=dict)


GROUPS = ("table", "ablation", "attempts", "longer", "sensitivity")
"""The groups of runs :func:`run_names` can select: the ResNet20 table's, the ablation's, the gap attempts', the
longer schedules' (``finetune.longer``) and the allocations beyond the paper (``sensitivity.runs``)."""


def _catalogue(profile: dict) -> list[tuple[str, str | None, tuple]]:
    """Every run of ``profile`` as ``(name, group, recipe)``, in the order to compute them; names are made here only.

    ``recipe`` is ``("staged", allocation policy, order kind, budget measure, schedule)`` or ``("direct", weight
    bits, act bits, None, {})``; ``schedule`` replaces fine-tuning settings (the attempts'). ``group`` is ``None``
    for ``hawq``, which the table and the ablation both show.
    """
    F, X = profile["finetune"], profile["ablation"]
    head = profile["allocation"]["measure"]
    runs = ([("hawq", None, ("staged", "hawq", "omega", head, {})),
             ("hawq-strict", "table", ("staged", "hawq", "omega", "model", {}))]
            + [(f"W{u['weight_bits']}A{u['act_bits']}", "table",
                ("direct", u["weight_bits"], u["act_bits"], None, {})) for u in F["uniform"]]
            + [(f"alloc-{p}", "ablation", ("staged", p, "omega", head, {})) for p in X["allocations"] if p != "hawq"]
            + [(f"order-{k}", "ablation", ("staged", "hawq", k, head, {})) for k in X["orders"] if k != "omega"]
            + [(name, "attempts", ("staged", "hawq", "omega", head, dict(schedule)))
               for name, schedule in F.get("attempts", {}).items()])
    # The longer schedules: a staged run of the table or the ablation again, its schedule replaced.
    recipes = {name: recipe for name, _, recipe in runs}
    for label, longer in F.get("longer", {}).items():
        for run in longer["runs"]:
            recipe = recipes.get(run)
            if recipe is None or recipe[0] != "staged" or recipe[4]:
                valid = [n for n, (kind, *_, sched) in recipes.items() if kind == "staged" and not sched]
                raise ValueError(f"finetune.longer[{label!r}] names run {run!r}, which is not a staged run of the "
                                 f"table or the ablation; valid: {', '.join(valid)}")
            runs.append((f"{run}@{label}", "longer", recipe[:4] + (dict(longer["schedule"]),)))
    # The allocations beyond the paper (hawqlib.repro.damage.allocation), each in its own Omega order.
    runs += [(name, "sensitivity", ("staged", kind, "omega", head, {}))
             for name, kind in profile.get("sensitivity", {}).get("runs", {}).items()]
    return runs


def run_names(profile: dict, group: str | None = None) -> list[str]:
    """The names of the runs of ``profile`` in the order to compute them, without computing anything.

    ``group`` selects the ResNet20 table's runs (``"table"``: ``hawq`` and the direct rows), the
    ablation's (``"ablation"``: ``hawq``, ``alloc-*`` and ``order-*``) or the gap attempts' (``"attempts"``:
    ``hawq`` and ``finetune.attempts``); ``None`` gives every run.
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


def seeds(profile: dict, name: str) -> list[int]:
    """The fine-tuning seeds of run ``name`` (``finetune.seeds[name]``, else ``[finetune.seed]``)."""
    F = profile["finetune"]
    out = list(F.get("seeds", {}).get(name, [F["seed"]]))
    if not out or any(isinstance(s, bool) or not isinstance(s, int) for s in out):
        raise ValueError(f"finetune.seeds[{name!r}] must be a non-empty list of integers, got {out!r}")
    return out


def allocation(model: torch.nn.Module, spectra, profile: dict, policy: str,
               measure: str | None = None) -> quant.BitConfig:
    """The bit allocation of ``policy`` at the profile's first target (its ``allocation`` section).

    ``measure`` is what the budget counts (default: the profile's ``allocation.measure``, the headline's).
    """
    A = profile["allocation"]
    target = next(iter(A["targets"].values()))
    return allocate.allocate_bits(model, spectra, target_compression=target, choices=tuple(A["choices"]),
                                  policy=policy, act_bits=A["act_bits"], granularity=A["granularity"],
                                  seed=profile["ablation"]["seed"], measure=measure or A["measure"])


def run_specs(model: torch.nn.Module, spectra, profile: dict,
              names: list[str] | None = None, *, base: str | None = None, data_root=None) -> dict[str, RunSpec]:
    """The runs ``names`` of ``profile`` (default: every one, see :func:`run_names`) by name, in that order.

    ``spectra`` are the baseline's block spectra at the profile's allocation granularity. Only the
    runs asked for are built (an allocation re-quantizes every block at every bit choice, so each
    costs seconds); an unknown name raises ``ValueError`` listing the valid ones. The ``sensitivity`` group's
    runs need ``base`` (the baseline's key: their bits read its stored traces and measured damage, on
    ``data_root``).
    """
    A, X = profile["allocation"], profile["ablation"]
    recipes = {name: recipe for name, _, recipe in _catalogue(profile)}
    for name, (*_, schedule) in recipes.items():
        _check_schedule(name, schedule, profile["finetune"])
    names = list(recipes) if names is None else list(names)
    check_names(profile, names)
    target_name = next(iter(A["targets"]))
    bits: dict[tuple, quant.BitConfig] = {}  # allocations by (policy, measure): order-* share the hawq one

    def build(name: str) -> RunSpec:
        kind, x, y, measure, schedule = recipes[name]
        if kind == "direct":
            bc = quant.BitConfig.uniform(model, x, act_bits=y, granularity=A["granularity"])
            return RunSpec(name, f"direct W{x}A{y}: every block at once", bc, None, direct=True)
        if (x, measure) not in bits and x not in allocate.POLICIES:  # beyond the paper: hawqlib.repro.damage
            if base is None:
                raise ValueError(f"run {name!r} ({x} allocation) reads the baseline's stored traces and measured "
                                 "damage: pass base= (the baseline's key) to run_specs")
            from . import damage

            bits[x, measure] = damage.allocation(model, spectra, profile, x, base, data_root=data_root)
        elif (x, measure) not in bits:
            bits[x, measure] = allocation(model, spectra, profile, x, measure)
        budget = ("weights only, the paper's measure" if measure == "weights" else "whole model, strict")
        description = (f"HAWQ {target_name} ({budget}) / A{A['act_bits']}: S-order allocation, Omega order"
                       + (f", with {describe_schedule(schedule)}" if schedule else "")
                       if x == "hawq" and y == "omega"
                       else (f"HAWQ allocation at the size the {x.split(':', 1)[1]} allocation reached, Omega order"
                             if x.startswith("hawq-size:") else
                             f"{x} allocation at the same budget, Omega order" if y == "omega"
                             else f"HAWQ allocation, {y} fine-tuning order")
                       + (f", with {describe_schedule(schedule)}" if schedule else ""))
        order = tuple(e.name for e in finetune_order(model, spectra, bits[x, measure], policy=y, seed=X["seed"]))
        return RunSpec(name, description, bits[x, measure], order, schedule=schedule)

    return {n: build(n) for n in names}


def _check_schedule(name: str, schedule: dict, finetune: dict) -> None:
    """Raise ``ValueError`` when attempt ``name`` replaces a setting that is not a fine-tuning setting (a misspelt
    key would otherwise be dropped, and the attempt would be the ``hawq`` run itself) or replaces none."""
    valid = sorted(set(pipeline.FINETUNE_SETTINGS) - {"seed", "batch_size", "train_subset", "test_subset"})
    unknown = sorted(set(schedule) - set(valid))
    if unknown:
        raise ValueError(f"finetune.attempts[{name!r}] sets {unknown}, which are not fine-tuning settings; "
                         f"valid: {', '.join(valid)}")
    if schedule and all(finetune.get(k, pipeline.FINETUNE_SETTINGS[k]) == v for k, v in schedule.items()):
        raise ValueError(f"finetune.attempts[{name!r}] changes nothing: {schedule} are the profile's own settings")


def describe_schedule(schedule: dict) -> str:
    """The attempt settings ``schedule`` in words, e.g. "a final stage of 8 epochs, a learned activation step"."""
    words = []
    if schedule.get("final_epochs"):
        k = schedule["final_epochs"]
        words.append(f"a final stage of {k} epoch{'s' if k != 1 else ''}")
    if schedule.get("act_step") == "learned":
        words.append("a learned activation step")
    if schedule.get("distill"):
        d = schedule["distill"]
        words.append(f"distillation from the FP32 baseline (alpha {d['alpha']:g}, T {d['temperature']:g})")
    if "stages" in schedule or "epochs_per_stage" in schedule:
        words.append(f"{schedule.get('stages', '?')} stages of {schedule.get('epochs_per_stage', '?')} epochs")
    other = sorted(set(schedule) - {"final_epochs", "act_step", "distill", "stages", "epochs_per_stage"})
    words += [f"{k} = {schedule[k]!r}" for k in other]
    return ", ".join(words)


def finetune_settings(profile: dict, spec: RunSpec, seed: int | None = None) -> dict:
    """The fine-tuning settings of run ``spec`` under ``profile``: the profile's ``finetune`` section with the run's
    own settings (an attempt's, a longer schedule's) applied and ``seed`` (default: the run's first,
    :func:`seeds`) in place of the schedule's."""
    cfg = dict(profile["finetune"], **spec.schedule)
    cfg["seed"] = seeds(profile, spec.name)[0] if seed is None else int(seed)
    return cfg


def epochs(profile: dict, spec: RunSpec) -> int:
    """Fine-tuning epochs of the run ``spec`` under ``profile`` (its own settings applied), all stages together."""
    return pipeline.finetune_epochs(finetune_settings(profile, spec))
