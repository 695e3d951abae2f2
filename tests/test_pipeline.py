"""The notebook steps of hawqlib.repro.pipeline: artifacts load what was computed, inputs are checked."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hawqlib import hessian, quant
from hawqlib.repro import pipeline
from hawqlib.repro.artifacts import (artifact_dir, artifact_threads, artifact_wall_s, compute_recording, read_manifest,
                                    replay, verify)
from hawqlib.repro.artifacts.manifest import _write_sealed
from hawqlib.repro.imagenet import imagenet_batch
from hawqlib.blocks import quant_blocks
from hawqlib.models import resnet20


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.delenv("FORCE", raising=False)
    return tmp_path / "artifacts"


def _tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 5))
    net.eval()
    g = torch.Generator().manual_seed(1)
    return net, (torch.randn(12, 3, 6, 6, generator=g), torch.randint(0, 5, (12,), generator=g))


CFG = {"method": "autograd", "solver": "lanczos", "tol": 1e-6, "max_iter": 50, "seed": 0}


def test_spectrum_is_stored_then_loaded_without_recomputing(artifacts, monkeypatch):
    net, data = _tiny()
    res, folder = pipeline.spectrum(net, "tiny", CFG, "layer", data=data, data_key="tiny-data", vectors=True)
    assert read_manifest(folder) is not None and folder.parent == artifacts
    ref = hessian.top_eigenvalues(net, nn.CrossEntropyLoss(), data, "layer", **CFG, progress=False)
    assert [r.eigenvalue for r in res] == [r.eigenvalue for r in ref]

    def boom(*a, **k):
        raise AssertionError("recomputed a stored spectrum")

    monkeypatch.setattr(hessian, "top_eigenvalues", boom)
    again, folder2 = pipeline.spectrum(net, "tiny", CFG, "layer", data=data, data_key="tiny-data", vectors=True)
    assert folder2 == folder
    assert [r.eigenvalue for r in again] == [r.eigenvalue for r in res]
    assert all(torch.equal(a, b) for r, q in zip(res, again) for a, b in zip(r.vector, q.vector))
    # another key (tolerance) is another artifact; force recomputes
    with pytest.raises(AssertionError, match="recomputed"):
        pipeline.spectrum(net, "tiny", CFG, "layer", data=data, data_key="tiny-data", tol=1e-5)
    with pytest.raises(AssertionError, match="recomputed"):
        pipeline.spectrum(net, "tiny", CFG, "layer", data=data, data_key="tiny-data", vectors=True, force=True)


def test_a_stored_spectrum_warns_as_its_computation_did(artifacts, monkeypatch):
    """A block that did not converge warns when computed and again, with the same words, when loaded."""
    net, data = _tiny()
    cfg = {**CFG, "solver": "power", "max_iter": 2, "tol": 1e-9}
    with pytest.warns(RuntimeWarning) as computed:
        res, folder = pipeline.spectrum(net, "tiny", cfg, "layer", data=data, data_key="tiny-data")
    assert not all(r.converged for r in res)
    said = [str(w.message) for w in computed if "not converged" in str(w.message)]
    assert said and read_manifest(folder)["warnings"]
    with monkeypatch.context() as m:  # not monkeypatch.undo(): that would drop the fixture's HAWQ_ARTIFACTS too
        m.setattr(hessian, "top_eigenvalues", lambda *a, **k: pytest.fail("recomputed a stored spectrum"))
        with pytest.warns(RuntimeWarning) as loaded:
            pipeline.spectrum(net, "tiny", cfg, "layer", data=data, data_key="tiny-data")
    assert [str(w.message) for w in loaded if "not converged" in str(w.message)] == said
    # a converged spectrum records nothing
    quiet, qfolder = pipeline.spectrum(net, "tiny", CFG, "layer", data=data, data_key="tiny-data")
    assert all(r.converged for r in quiet) and read_manifest(qfolder)["warnings"] == []


def test_a_spectrum_stored_before_warnings_were_recorded_still_warns(artifacts, monkeypatch):
    """A legacy manifest (no "warnings" entry) rebuilds the non-convergence warnings from the stored results."""
    net, data = _tiny()
    cfg = {**CFG, "solver": "power", "max_iter": 2, "tol": 1e-9}
    with pytest.warns(RuntimeWarning):
        res, folder = pipeline.spectrum(net, "tiny", cfg, "layer", data=data, data_key="tiny-data")
    m = read_manifest(folder)
    del m["warnings"], m["manifest_sha256"]
    _write_sealed(folder, m)  # as sealed by the code before this change
    with pytest.warns(RuntimeWarning) as loaded:
        pipeline.spectrum(net, "tiny", cfg, "layer", data=data, data_key="tiny-data")
    said = [str(w.message) for w in loaded]
    assert len(said) == sum(not r.converged for r in res)
    assert all("reported as not converged (stored result)" in m for m in said)


def test_warnings_of_other_packages_pass_through_once_and_ours_are_kept_if_compute_fails(artifacts):
    def compute(folder):
        for _ in range(3):
            warnings.warn("from elsewhere", DeprecationWarning)  # attributed to this test file
            replay([{"category": "RuntimeWarning", "message": "ours"}])  # raised inside hawqlib
        raise ValueError("boom")

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        with pytest.raises(ValueError, match="boom"):
            compute_recording(compute, None)
    assert [str(w.message) for w in seen] == ["from elsewhere", "ours"]


def test_spectrum_checks_its_inputs(artifacts):
    net, data = _tiny()
    with pytest.raises(ValueError, match="data_key"):
        pipeline.spectrum(net, "tiny", CFG, "layer", data=data)
    with pytest.raises(ValueError, match="miss"):
        pipeline.spectrum(net, "tiny", {"tol": 1e-3}, "layer", data=data, data_key="d")
    with pytest.raises(ValueError, match="n_samples"):
        pipeline.hessian_batch(0)


def test_loss_surface_moves_one_block_and_restores_it():
    net, data = _tiny()
    block = quant_blocks(net, "layer")[0]
    d = torch.randn(block.numel, generator=torch.Generator().manual_seed(2))
    before = [p.detach().clone() for p in net.parameters()]
    coords = torch.tensor([[0.0], [0.5], [-1.0]])
    losses = pipeline.loss_surface(net, block, [d], coords, data)
    for c, got in zip(coords[:, 0], losses):
        moved, _ = _tiny()
        with torch.no_grad():
            moved[0].weight += float(c) * d.view_as(moved[0].weight)
        want = nn.functional.cross_entropy(moved(data[0]), data[1]).item()
        assert got.item() == pytest.approx(want, rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    # the list-of-tensors form of a direction gives the same numbers
    assert torch.equal(pipeline.loss_surface(net, block, [[d.view_as(block.params[0])]], coords, data), losses)
    with pytest.raises(ValueError, match="columns"):
        pipeline.loss_surface(net, block, [d, d], coords, data)
    with pytest.raises(ValueError, match="entries"):
        pipeline.loss_surface(net, block, [d[:-1]], coords, data)


def test_landscape_is_an_artifact(artifacts, monkeypatch, cifar_root):
    net = resnet20().eval()
    block = quant_blocks(net, "layer")[-1]
    d = torch.randn(block.numel, generator=torch.Generator().manual_seed(0))
    cfg = {"n_samples": 8, "data_seed": 0}
    coords = torch.linspace(-1, 1, 3)[:, None]
    losses, folder = pipeline.landscape(net, "r20", cfg, block.name, [d], coords, directions_key="rand0",
                                        data_root=cifar_root)
    monkeypatch.setattr(pipeline, "loss_surface", lambda *a, **k: (_ for _ in ()).throw(AssertionError("again")))
    again, folder2 = pipeline.landscape(net, "r20", cfg, block.name, [d], coords, directions_key="rand0",
                                        data_root=cifar_root)
    assert folder2 == folder and torch.equal(again, losses)
    with pytest.raises(ValueError, match="no block"):
        pipeline.landscape(net, "r20", cfg, "nope", [d], coords, directions_key="rand0")


def test_imagenet_batch_synthetic_is_seeded():
    (x, y), key = imagenet_batch("resnet50", 3, 7, image_size=16)
    (x2, y2), key2 = imagenet_batch("resnet50", 3, 7, image_size=16)
    assert x.shape == (3, 3, 16, 16) and torch.equal(x, x2) and torch.equal(y, y2) and key == key2
    assert int(y.max()) < 1000
    with pytest.raises(ValueError, match="image_size"):
        imagenet_batch("resnet50", 3)


FT = {"stages": 2, "epochs_per_stage": 1, "final_epochs": 0, "lr": 0.01, "momentum": 0.9, "nesterov": True,
      "weight_decay": 1e-4, "batch_size": 16, "seed": 0, "train_subset": 32, "test_subset": 32,
      "calibration_batches": 1}


def test_finetuned_stores_model_history_and_packed_file(artifacts, cifar_root, monkeypatch):
    torch.manual_seed(0)
    net = resnet20().eval()
    bc = quant.BitConfig.uniform(net, 4, act_bits=4)
    order = [b.name for b in quant_blocks(net, "layer")]
    r = pipeline.finetuned(net, "r20-random", bc, order, FT, data_root=cifar_root)
    assert len(r.history["stages"]) == 2 and len(r.history["epochs"]) == 2
    assert r.top1 == r.history["epochs"][-1]["val_top1"]
    assert r.packed_top1 == r.top1  # the packed file restores the fake-quantized model exactly
    assert r.size_bytes <= r.packed_bytes <= 1.02 * r.size_bytes + 4096
    assert (r.folder / "model.hawq").stat().st_size == r.packed_bytes
    assert not (r.folder / "run").exists()     # the resume state is dropped once the artifact is complete
    assert artifact_threads(r.folder) == torch.get_num_threads()
    assert artifact_threads(r.folder / "run") is None and artifact_wall_s(r.folder / "run") == 0.0
    assert {p.name for p in r.folder.iterdir()} >= {"manifest.json", "qmodel.pt", "history.json", "model.hawq",
                                                     "bit_config.json"}
    # every result file's digest is in the manifest; the packed file records its architecture
    assert set(verify(r.folder)["files"]) == {"qmodel.pt", "history.json", "model.hawq", "bit_config.json"}
    from hawqlib import export, finetune

    assert export.read_header(r.folder / "model.hawq")["arch"] == "resnet20"
    xx = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # built from the recorded arch alone, it computes what the given model's does
        assert torch.equal(export.load_packed(r.folder / "model.hawq")(xx),
                           export.load_packed(r.folder / "model.hawq", net)(xx))

    monkeypatch.setattr(finetune, "staged_finetune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("again")))
    again = pipeline.finetuned(net, "r20-random", bc, order, FT, data_root=cifar_root)
    assert again.folder == r.folder and again.top1 == r.top1 and again.packed_bytes == r.packed_bytes
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    r.qmodel.eval()
    assert torch.equal(again.qmodel(x), r.qmodel(x))
    with pytest.raises(ValueError, match="miss"):
        pipeline.finetuned(net, "r20-random", bc, order, {"lr": 0.1})
    with pytest.raises(TypeError, match="BitConfig"):
        pipeline.finetuned(net, "r20-random", {"conv1": 4}, order, FT)


def test_a_fine_tuning_run_names_the_runs_that_train_its_first_stages(artifacts):
    """hawqlib.finetune's "Shared stages": the same key but for the final-stage settings, whichever exist."""
    kd = dict(FT, final_epochs=2, act_step="learned", distill={"alpha": 0.9, "temperature": 4.0})
    params = {"base": "b", "bit_config": {}, "order": ["a", "b"], "direct": False, "finetune": kd,
              "code": pipeline._finetune_code()}

    def key(**ft):
        return artifact_dir("finetune", dict(params, finetune=ft))

    lsq = {k: v for k, v in kd.items() if k != "distill"}
    assert pipeline._stage_sharing_runs(params) == [key(**lsq), key(**dict(lsq, final_epochs=0))]
    assert pipeline._stage_sharing_runs(dict(params, finetune=lsq)) == [key(**dict(lsq, final_epochs=0))]
    assert pipeline._stage_sharing_runs(dict(params, finetune=dict(lsq, final_epochs=0))) == []


def test_a_distilled_run_is_offered_the_stages_of_the_same_run_without_distillation(artifacts, cifar_root,
                                                                                     monkeypatch):
    """finetuned hands staged_finetune the folder the run without distillation fine-tunes in."""
    from hawqlib import finetune

    torch.manual_seed(0)
    net = resnet20().eval()
    bc = quant.BitConfig.uniform(net, 4, act_bits=4)
    order = [b.name for b in quant_blocks(net, "layer")]
    seen = {}

    class Stop(Exception):
        pass

    def fake(*args, checkpoint_dir, share_from=None, distill=None, **kw):
        seen["kd" if distill else "lsq"] = (checkpoint_dir, share_from)
        raise Stop

    monkeypatch.setattr(finetune, "staged_finetune", fake)
    lsq = dict(FT, final_epochs=1, act_step="learned")
    for cfg in (lsq, dict(lsq, distill={"alpha": 0.9, "temperature": 4.0})):
        with pytest.raises(Stop):
            pipeline.finetuned(net, "r20-random", bc, order, cfg, data_root=cifar_root)
    lsq_dir, lsq_share = seen["lsq"]
    kd_dir, kd_share = seen["kd"]
    assert kd_share[lsq_dir.parent.name] == lsq_dir and list(kd_share)[0] == lsq_dir.parent.name
    assert lsq_dir not in lsq_share.values() and kd_dir not in kd_share.values() and lsq_dir != kd_dir
