"""The "HAWQ on your own network" chapter's pieces: the small ViT, its profile section, and the cached front-door
step (:mod:`hawqlib.repro.cached_quantize`) that stores and reloads a :func:`hawqlib.quantize` result."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import hawqlib
from hawqlib.repro import artifacts as store, cached_quantize, profiles
from hawqlib import models
from hawqlib.repro.baseline import baseline_params
from hawqlib.blocks import quant_blocks
from hawqlib.hessian.gauss_newton import gauss_newton_exact
from hawqlib.quant import QUANT_MODULES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.delenv("FORCE", raising=False)
    return tmp_path / "artifacts"


def test_vit_builds_by_name_and_by_attribute():
    torch.manual_seed(0)
    a = models.get("vit_cifar")
    torch.manual_seed(0)
    b = getattr(models, "vit_cifar")()  # what pipeline.initial_model calls
    assert type(a) is type(b) is models.VisionTransformer
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # 64 tokens of patch 4; per block qkv, proj, fc1, fc2; plus the patch embedding and the head
    names = [blk.name for blk in quant_blocks(a, "layer")]
    assert len(names) == 2 + 4 * len(a.blocks) and names[0] == "patch_embed" and names[-1] == "head"
    assert a.pos_embed.shape == (1, 64, 64)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in a.modules())  # Linear layers HAWQ can quantize
    small = models.get("vit_cifar", num_classes=3, dim=16, depth=1, heads=2, image_size=8)
    assert small(torch.randn(1, 3, 8, 8)).shape == (1, 3) and small.pos_embed.shape == (1, 4, 16)
    with pytest.raises(TypeError, match="unexpected options"):
        models.get("vit_cifar", width=2)
    with pytest.raises(ValueError, match="multiple of heads"):
        models.vit_cifar(dim=10, heads=4)
    sd = a.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in models.get("vit_cifar", weights=sd).state_dict().items())


def test_vit_is_not_piecewise_linear_so_the_exact_route_refuses_it():
    net = models.vit_cifar(dim=16, depth=1, heads=2).eval()
    kinds = {type(m) for m in net.modules()}
    assert nn.GELU in kinds and nn.LayerNorm in kinds
    for blk in quant_blocks(net, "layer"):
        ok, why = gauss_newton_exact(net, nn.CrossEntropyLoss(), blk)
        assert not ok and ("LayerNorm" in why or "GELU" in why), why


def test_front_door_on_the_vit_takes_the_autograd_route():
    torch.manual_seed(0)
    net = models.vit_cifar(dim=16, depth=1, heads=2, image_size=8).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    qmodel, report = hawqlib.quantize(net, data, target_compression=6, act_bits=8, finetune=False,
                                      hessian={"tol": 1e-2, "max_iter": 20}, progress=False)
    assert {s.method for s in report.spectra} == {"autograd"}
    assert all("LayerNorm" in s.note or "GELU" in s.note for s in report.spectra)
    assert json.loads(json.dumps(report.to_dict()))["spectra"][0]["note"] == report.spectra[0].note
    assert report.weight_compression >= 6
    assert all(isinstance(dict(qmodel.named_modules())[b], QUANT_MODULES) for b in report.bit_config.weights)


def test_profiles_hold_the_chapter_settings_as_data():
    for name in profiles.PROFILES:
        P = profiles.get(name)
        O = P["own_network"]
        assert O["model"] in models.names()
        assert set(O["baseline"]) == set(P["baseline"])  # baseline.baseline reads the same table
        assert set(O["quantize"]) == set(cached_quantize.SETTINGS_KEYS)
        assert O["quantize"]["measure"] == "weights" and O["quantize"]["hessian"]["method"] == "auto"
    smoke, cpu = profiles.get("smoke")["own_network"], profiles.get("cpu")["own_network"]
    assert smoke["baseline"]["train_subset"] and smoke["quantize"]["finetune"]["train_subset"]
    assert cpu["baseline"]["train_subset"] is None and cpu["quantize"]["finetune"]["train_subset"] is None


SETTINGS = {"target_compression": 6.0, "measure": "weights", "act_bits": 8, "choices": [2, 4, 8],
            "granularity": "layer", "seed": 0, "uniform_bits": [4],
            "hessian": {"n_samples": 8, "data_seed": 0, "method": "auto", "solver": "lanczos", "tol": 1e-1,
                        "max_iter": 4},
            "finetune": {"stages": 2, "epochs_per_stage": 1, "final_epochs": 0, "lr": 0.01, "momentum": 0.9,
                         "nesterov": True, "weight_decay": 1e-4, "calibration_batches": 1, "batch_size": 16,
                         "train_subset": 32, "test_subset": 32}}


def test_cached_step_stores_then_loads_identical_state(artifacts, cifar_root, monkeypatch):
    torch.manual_seed(0)
    net = models.vit_cifar(dim=16, depth=1, heads=2).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(RuntimeWarning):  # 4 products are too few for tol 1e-1 somewhere: stored and replayed
        r = cached_quantize.quantized(net, "vit-random", SETTINGS, data_root=cifar_root)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the user's model is untouched
    assert r.folder.parent == artifacts and r.folder.name.startswith(cached_quantize.KIND + "-")
    assert set(store.verify(r.folder)["files"]) == {"qmodel.pt", "model.hawq", "report.json", "bit_config.json",
                                                    "post_training.json"}
    assert not (r.folder / "run").exists()  # the resume state is dropped once the artifact is complete
    assert r.report["packed_path"] == "model.hawq" and r.report["measure"] == "weights"
    assert {s["method"] for s in r.report["spectra"]} == {"autograd"}
    assert r.report["weight_compression"] >= 6 and len(r.report["history"]["stages"]) == 2
    assert set(r.post_training) == {"hawq", "uniform W4"}
    assert r.packed_top1 == r.report["val_top1"]  # the packed file restores the fake-quantized model
    assert r.hessian_s > 0 and r.finetune_s > 0 and r.wall_s >= r.finetune_s

    # the second call loads: nothing is recomputed, and every piece of state is the same
    monkeypatch.setattr(cached_quantize, "quantize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("again")))
    with pytest.warns(RuntimeWarning):  # the stored warnings are replayed
        again = cached_quantize.quantized(net, "vit-random", SETTINGS, data_root=cifar_root)
    assert again.folder == r.folder
    # equal down to the order of keys (a page that iterates over them shows the same thing either way)
    assert json.dumps(again.report) == json.dumps(r.report)
    assert json.dumps(again.post_training) == json.dumps(r.post_training)
    assert again.bit_config.to_dict() == r.bit_config.to_dict()
    assert (again.packed_top1, again.finetune_s, again.hessian_s, again.wall_s) == \
        (r.packed_top1, r.finetune_s, r.hessian_s, r.wall_s)
    a, b = r.qmodel.state_dict(), again.qmodel.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(r.qmodel.eval()(x), again.qmodel(x))

    # other settings are another artifact; a tampered file is refused, not loaded
    assert cached_quantize.quantized(net, "vit-random", {**SETTINGS, "act_bits": 4}, load_only=True) is None
    with open(r.folder / "qmodel.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(store.ArtifactError, match="qmodel.pt"):
        cached_quantize.quantized(net, "vit-random", SETTINGS, data_root=cifar_root)


def test_cached_step_names_missing_settings():
    with pytest.raises(ValueError, match=r"hessian\.tol"):
        cached_quantize.quantized(nn.Linear(2, 2), "x", {**SETTINGS, "hessian": {"n_samples": 8}})


def test_the_chapter_baseline_key_uses_the_vit(cifar_root):
    P = profiles.get("smoke")["own_network"]
    params = baseline_params(P["baseline"], P["model"], cifar_root)
    assert params["model"] == "vit_cifar" and params["train"] == P["baseline"]
    assert store.artifact_dir(f"baseline_{P['model']}", params).name.startswith("baseline_vit_cifar-")
