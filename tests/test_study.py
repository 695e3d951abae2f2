"""hawqlib.repro.study.Study: the shared recipes delegate to the pipeline and key the very same artifacts."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hawqlib.repro import baseline as baseline_step
from hawqlib.repro import experiments, pipeline, profiles
from hawqlib.repro.artifacts import is_complete, read_manifest
from hawqlib.blocks import quant_blocks
from hawqlib.order import ORDERS, finetune_order
from hawqlib.models import resnet20
from hawqlib.repro.study import Study


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.delenv("FORCE", raising=False)
    return tmp_path / "artifacts"


def _fake_baseline(monkeypatch, net):
    calls = []

    def baseline(cfg, model="resnet20", data_root=None, *, progress=True, force=None, weights=None):
        calls.append((cfg, model, getattr(data_root, "root", data_root), progress))
        return net, {"epochs": [{"val_top1": 12.5}]}, Path(f"/nowhere/baseline_{model}-0123456789ab")

    monkeypatch.setattr(baseline_step, "baseline", baseline)
    return calls


def test_preamble_and_spectrum_are_the_pipelines(artifacts, monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 5)).eval()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g))
    calls = _fake_baseline(monkeypatch, net)
    seen = []
    monkeypatch.setattr(pipeline, "hessian_batch",
                        lambda n, seed, root: seen.append((n, seed, getattr(root, "root", root))) or batch)

    study = Study("smoke", data="/data/root", model="tiny")
    P, model, base = study.preamble()
    assert P == profiles.get("smoke") and model is net and base == "baseline_tiny-0123456789ab"
    assert study.log["epochs"][-1]["val_top1"] == 12.5 and study.folder.name == base
    assert calls == [(P["baseline"], "tiny", "/data/root", False)]  # trained or loaded once

    spectra, folder = study.spectrum()
    assert folder.parent == artifacts and is_complete(folder, read_manifest(folder)["params"])
    assert seen == [(P["hessian"]["n_samples"], P["hessian"]["data_seed"], "/data/root")]
    assert study.spectrum() == (spectra, folder) and study.spectra is spectra  # kept, not reloaded
    # the same artifact as the notebooks' and the command line's call
    again, folder2 = pipeline.spectrum(net, base, P["hessian"], P["allocation"]["granularity"], vectors=True)
    assert folder2 == folder and [r.eigenvalue for r in again] == [r.eigenvalue for r in spectra]
    _, other = study.spectrum("layer", vectors=False, solver="power")
    assert other != folder and read_manifest(other)["params"]["solver"] == "power"


@pytest.fixture
def r20(monkeypatch):
    torch.manual_seed(0)
    net = resnet20().eval()
    spectra = [SimpleNamespace(name=b.name, numel=b.numel, eigenvalue=float(1 + (7 * i) % 20))
               for i, b in enumerate(quant_blocks(net, "layer"))]
    _fake_baseline(monkeypatch, net)
    sfolder = Path("/nowhere/spectrum-abcdef012345")
    monkeypatch.setattr(pipeline, "spectrum", lambda *a, **k: (spectra, sfolder))
    return net, spectra, sfolder


def test_allocation_orders_and_runs_delegate(r20, monkeypatch):
    net, spectra, sfolder = r20
    study = Study("smoke")
    P = study.P
    bc = study.allocation()
    assert bc.to_dict() == experiments.allocation(net, spectra, P, "hawq").to_dict()
    orders = study.orders(bc)
    assert set(orders) == set(ORDERS)
    assert orders["omega"] == [e.name for e in finetune_order(net, spectra, bc, seed=P["ablation"]["seed"])]
    assert study.run_names("table") == experiments.run_names(P, "table")

    built = []
    real_specs = experiments.run_specs
    monkeypatch.setattr(experiments, "run_specs", lambda *a, **kw: built.append(a[3]) or real_specs(*a, **kw))
    ft = []
    monkeypatch.setattr(pipeline, "finetuned", lambda *a, **k: ft.append((a, k)) or f"r{k['direct']}")
    assert study.run("hawq") == "rFalse"
    assert study.run_seeds("hawq", compute=True) == {0: "rFalse", 1: "rFalse"}
    assert built == [["hawq"]]  # each spec built once
    (model, base, bits, order, cfg), kw = ft[0]
    assert model is net and base == "baseline_resnet20-0123456789ab" and bits.to_dict() == bc.to_dict()
    assert order == orders["omega"] and cfg == dict(P["finetune"], seed=0)
    assert kw["provenance"] == {"baseline": base, "spectrum": sfolder.name}
    assert [k[1]["load_only"] for k in ft] == [False, False, False]
    assert study.specs(["W4A4"])["W4A4"].direct


def test_run_seeds_loads_only_unless_the_profile_or_force_says_compute(r20, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "finetuned", lambda *a, **k: calls.append((a[4]["seed"], k["load_only"],
                                                                              k["provenance"])) or None)
    monkeypatch.delenv("FORCE", raising=False)
    study = Study("cpu")  # the published profile only loads: its runs take hours
    assert study.run_seeds("hawq") == {0: None, 1: None, 2: None}
    assert calls == [(s, True, {"baseline": study.base, "spectrum": "spectrum-abcdef012345"}) for s in (0, 1, 2)]
    calls.clear()
    monkeypatch.setenv("FORCE", "1")
    study.run_seeds("hawq")
    assert [c[1] for c in calls] == [False] * 3
    calls.clear()
    monkeypatch.delenv("FORCE")
    Study("smoke").run_seeds("hawq")
    assert [c[:2] for c in calls] == [(0, False), (1, False)]
