"""A study: the recipes the notebooks and the command line share, for one profile, model and data source.

Every chapter starts the same way: a profile (:mod:`hawqlib.repro.profiles`), the FP32 baseline it trains
(:func:`hawqlib.repro.baseline.baseline`), the baseline's Hessian spectrum (paper section 3.1,
:func:`hawqlib.repro.pipeline.spectrum`), and from there the HAWQ allocation at the profile's target, the
fine-tuning orders (section 3.2) and the named fine-tuning runs of the tables (:mod:`hawqlib.repro.experiments`).
:class:`Study` holds those recipes once, so that a notebook and ``python -m hawqlib finetune`` given the same
profile, model and data load the very same artifacts. It delegates every step; nothing is computed here that
the pipeline would not compute, and every result stays an artifact keyed as before.

The data source is the model's (:func:`hawqlib.repro.sources.for_model`): CIFAR-10 for ResNet20 (``data``: its
root, else :func:`hawqlib.repro.data.find_cifar10`'s search), an ImageFolder tree for the ImageNet models
(``data``: its root, with ``train/`` and ``val/``), or any :class:`hawqlib.repro.data.DataSource`. For an
ImageNet model the profile is applied at that model's paper target (:func:`hawqlib.repro.profiles.for_model`), and
``weights`` (a weights file, e.g. torchvision's published ones) may stand for the FP32 baseline.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..bitconfig import BitConfig
from ..order import ORDERS, finetune_order
from . import experiments, paths, pipeline, profiles, sources
from .artifacts import force_recompute
from . import baseline as baseline_step

__all__ = ["Study"]


class Study:
    """The recipes of one ``profile`` (a name, default ``HAWQ_PROFILE`` else ``"cpu"``, or a profile table),
    ``model`` and ``data``. The profile is declared process-wide (:func:`hawqlib.repro.paths.use_profile`): a
    non-published one stores under ``data/scratch/<name>``, and the latest Study decides for later steps.

    Each step runs (or loads) on first use and is kept: ``study.model`` trains or loads the baseline once,
    ``study.spectrum()`` computes or loads one spectrum per set of settings. ``progress`` is passed to the
    baseline, spectrum and fine-tuning steps.
    """

    def __init__(self, profile: str | dict | None = None, data=None, model: str = "resnet20", *,
                 progress: bool = False, weights=None, **source_options):
        P = profiles.get(profile) if profile is None or isinstance(profile, str) else profile
        paths.use_profile(P.get("name"))  # a non-published profile stores under data/scratch/<name>
        self.P = profiles.for_model(P, model)
        self.data = data
        self.source = sources.for_model(model, data, **source_options)
        self.weights = weights
        self.model_name = model
        self.progress = progress
        self._baseline: tuple[torch.nn.Module, dict, Path] | None = None
        self._spectra: dict = {}
        self._specs: dict[str, experiments.RunSpec] = {}

    def __repr__(self) -> str:
        return f"Study(profile={self.P['name']!r}, data={self.data!r}, model={self.model_name!r})"

    # ------------------------------------------------------------------ baseline

    def baseline(self) -> tuple[torch.nn.Module, dict, Path]:
        """The FP32 baseline at the profile's ``baseline`` settings: ``(model, log, folder)``, trained or loaded once."""
        if self._baseline is None:
            self._baseline = baseline_step.baseline(self.P["baseline"], self.model_name, self.source,
                                               progress=self.progress, weights=self.weights)
        return self._baseline

    @property
    def model(self) -> torch.nn.Module:
        """The baseline's model."""
        return self.baseline()[0]

    @property
    def log(self) -> dict:
        """The baseline's training log."""
        return self.baseline()[1]

    @property
    def folder(self) -> Path:
        """The baseline's artifact folder."""
        return self.baseline()[2]

    @property
    def base(self) -> str:
        """The key of the baseline's weights (its folder's name), which keys every later step."""
        return self.folder.name

    def preamble(self) -> tuple[dict, torch.nn.Module, str]:
        """A notebook's first three names in one call: ``(P, model, base)`` (profile, baseline, its key)."""
        return self.P, self.model, self.base

    # ------------------------------------------------------------------ Hessian

    def spectrum(self, granularity=None, *, vectors: bool = True, **overrides):
        """The baseline's spectrum at the profile's ``hessian`` settings (section 3.1): ``(results, folder)``.

        ``granularity`` defaults to the allocation's (``allocation.granularity``); ``vectors=True`` (the default,
        as the notebooks and the command line store it) keeps each block's top eigenvector; ``overrides``
        replace hessian settings (e.g. ``solver=``), see :func:`hawqlib.repro.pipeline.spectrum`.
        """
        gran = self.P["allocation"]["granularity"] if granularity is None else granularity
        key = (repr(gran), bool(vectors), repr(sorted(overrides.items())))
        if key not in self._spectra:
            self._spectra[key] = pipeline.spectrum(self.model, self.base, self.P["hessian"], gran, vectors=vectors,
                                                   progress=self.progress, data_root=self.source, **overrides)
        return self._spectra[key]

    @property
    def spectra(self) -> list:
        """The spectrum the allocation reads (allocation granularity, with vectors)."""
        return self.spectrum()[0]

    # ------------------------------------------------------------------ allocation and orders

    def allocation(self, policy: str = "hawq", measure: str | None = None) -> BitConfig:
        """The bit allocation of ``policy`` at the profile's first target; see :func:`hawqlib.repro.experiments.allocation`."""
        return experiments.allocation(self.model, self.spectra, self.P, policy, measure)

    def order(self, bit_config: BitConfig, policy: str = "omega") -> list[str]:
        """The block names of fine-tuning order ``policy`` of ``bit_config`` (section 3.2,
        :func:`hawqlib.order.finetune_order`), random orders seeded by the profile's ``ablation.seed``."""
        return [e.name for e in finetune_order(self.model, self.spectra, bit_config, policy=policy,
                                               seed=self.P["ablation"]["seed"])]

    def orders(self, bit_config: BitConfig) -> dict[str, list[str]]:
        """Every fine-tuning order of ``bit_config`` by policy (:data:`hawqlib.order.ORDERS`)."""
        return {policy: self.order(bit_config, policy) for policy in ORDERS}

    # ------------------------------------------------------------------ fine-tuning runs

    def run_names(self, group: str | None = None) -> list[str]:
        """The names of the profile's runs (:func:`hawqlib.repro.experiments.run_names`), computing nothing."""
        return experiments.run_names(self.P, group)

    def specs(self, names=None) -> dict[str, experiments.RunSpec]:
        """The runs ``names`` (default: every one) by name (:func:`hawqlib.repro.experiments.run_specs`), each built once."""
        names = self.run_names() if names is None else list(names)
        todo = [n for n in names if n not in self._specs]
        if todo:
            self._specs.update(experiments.run_specs(self.model, self.spectra, self.P, todo, base=self.base,
                                                     data_root=self.source))
        return {n: self._specs[n] for n in names}

    def run(self, name: str, seed: int | None = None, *, force: bool | None = None,
            load_only: bool = False) -> pipeline.FinetuneResult | None:
        """Fine-tune (or load) run ``name`` with ``seed`` (default its first, :func:`hawqlib.repro.experiments.seeds`).

        The run's bits and order (:meth:`specs`) and its fine-tuning settings
        (:func:`hawqlib.repro.experiments.finetune_settings`) go to the one cached fine-tuning step,
        :func:`hawqlib.repro.pipeline.finetuned`; the spectrum's folder is recorded beside the baseline's as the
        allocation's provenance. ``load_only=True`` returns ``None`` when the run is not stored, instead of
        computing it.
        """
        spec = self.specs([name])[name]
        return pipeline.finetuned(self.model, self.base, spec.bit_config, None if spec.direct else list(spec.order),
                                  experiments.finetune_settings(self.P, spec, seed), direct=spec.direct,
                                  progress=self.progress, force=force, data_root=self.source, load_only=load_only,
                                  provenance={"baseline": self.base, "spectrum": self.spectrum()[1].name})

    def run_seeds(self, name: str, compute: bool | None = None) -> dict[int, pipeline.FinetuneResult | None]:
        """Every seed of run ``name`` (:func:`hawqlib.repro.experiments.seeds`) by seed: its result, or ``None`` when
        not stored and not computed.

        ``compute`` (default: the profile's ``finetune.notebooks_compute``, or ``FORCE=1``) says whether a run that
        is not stored is computed here; otherwise the notebooks show what is stored and name what is not, and
        ``python -m hawqlib finetune`` computes the rest in the background.
        """
        if compute is None:
            compute = bool(self.P["finetune"].get("notebooks_compute", True)) or force_recompute()
        return {s: self.run(name, s, load_only=not compute) for s in experiments.seeds(self.P, name)}

    def live_run(self, name: str | None = None) -> pipeline.FinetuneResult | None:
        """Run ``name`` (default: the profile's ``live_finetune.run``) fine-tuned in the profile's short
        ``live_finetune`` schedule (the ``lab`` profile: one stage of one epoch on a subset of the training set),
        from the same baseline, bits and order as the stored run; ``None`` when the profile has no
        ``live_finetune`` section. Its key differs from the stored run's (the schedule is in it), so it is
        computed into the profile's own store, once."""
        live = self.P.get("live_finetune")
        if not live:
            return None
        name = name or live["run"]
        spec = self.specs([name])[name]
        cfg = dict(experiments.finetune_settings(self.P, spec), **{k: v for k, v in live.items() if k != "run"})
        return pipeline.finetuned(self.model, self.base, spec.bit_config, None if spec.direct else list(spec.order),
                                  cfg, direct=spec.direct, progress=self.progress, data_root=self.source,
                                  provenance={"baseline": self.base, "spectrum": self.spectrum()[1].name})
