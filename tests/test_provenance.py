"""Issue 19's guarantees: seeded initial weights across processes, provenance in manifests, stored-only loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hawqlib.repro import artifacts, pipeline, profiles
from hawqlib.repro.baseline import baseline
from hawqlib import quant
from hawqlib.blocks import quant_blocks
from hawqlib.models import resnet20

ROOT = Path(__file__).resolve().parents[1]


def _digest_in_a_new_process(seed: int) -> str:
    code = ("import hashlib, sys, torch; from hawqlib.repro.baseline import initial_model; "
            "torch.manual_seed(int(sys.argv[2]) + 1000); torch.rand(7);"  # whatever the process did before
            "net = initial_model('resnet20', int(sys.argv[1])); "
            "h = hashlib.sha256(); [h.update(t.detach().numpy().tobytes()) for t in net.state_dict().values()]; "
            "print(h.hexdigest())")
    out = subprocess.run([sys.executable, "-c", code, str(seed), str(len(str(seed)) * 17)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
    return out.stdout.strip()


def test_two_processes_build_bit_identical_initial_baseline_weights():
    a, b = _digest_in_a_new_process(0), _digest_in_a_new_process(0)
    assert a == b and len(a) == 64
    assert _digest_in_a_new_process(1) != a


def test_baseline_builds_its_model_under_the_profile_seed(monkeypatch, tmp_path):
    seen = []

    def fake(model, seed, num_classes=None):
        seen.append((model, seed))
        raise RuntimeError("stop here")

    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path))
    from hawqlib.repro import baseline as baseline_step

    monkeypatch.setattr(baseline_step, "baseline_params", lambda cfg, model, root, weights=None: {"k": 1})
    monkeypatch.setattr(baseline_step, "initial_model", fake)
    cfg = dict(profiles.get("smoke")["baseline"], seed=5)
    with pytest.raises(RuntimeError, match="stop here"):
        baseline(cfg)
    assert seen == [("resnet20", 5)]


FT = {"stages": 2, "epochs_per_stage": 1, "final_epochs": 0, "lr": 0.01, "momentum": 0.9, "nesterov": True,
      "weight_decay": 1e-4, "batch_size": 16, "seed": 3, "train_subset": 32, "test_subset": 32,
      "calibration_batches": 1}


def test_manifest_records_provenance_and_load_only_never_computes(tmp_path, monkeypatch, cifar_root):
    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path))
    monkeypatch.delenv("FORCE", raising=False)
    torch.manual_seed(0)
    net = resnet20().eval()
    bc = quant.BitConfig.uniform(net, 4, act_bits=4)
    order = [b.name for b in quant_blocks(net, "layer")]
    prov = {"baseline": "baseline_resnet20-x", "spectrum": "spectrum-y"}
    assert pipeline.finetuned(net, "r20", bc, order, FT, data_root=cifar_root, load_only=True) is None
    assert not any(tmp_path.iterdir())  # nothing was started
    r = pipeline.finetuned(net, "r20", bc, order, FT, data_root=cifar_root, provenance=prov)
    assert artifacts.read_manifest(r.folder)["provenance"] == prov
    assert "provenance" not in json.dumps(artifacts.read_manifest(r.folder)["params"])  # outside the key
    # the machine it ran on, GPU included: a wall time is only comparable on the same kind of machine
    machine = artifacts.read_manifest(r.folder)["machine"]
    assert machine["accelerator"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    assert machine["cpus"] == os.cpu_count() and machine["torch_threads"] == torch.get_num_threads()
    again = pipeline.finetuned(net, "r20", bc, order, FT, data_root=cifar_root, load_only=True)
    assert again is not None and again.folder == r.folder and again.top1 == r.top1


# ----------------------------------------------------------------------------- issue 38: the provenance page

def _stored(name: str, wall_s: float | None = None) -> Path:
    """A small artifact ``probe-<key>`` computed through the cache (in the HAWQ_ARTIFACTS of the test)."""
    def save(folder, value):
        (folder / "value.json").write_text(json.dumps(value))
        return {} if wall_s is None else {"wall_s": wall_s}

    _, folder = artifacts.cached("probe", {"name": name, "code": {"step": 1}}, lambda f: {"name": name}, save,
                                 lambda f: artifacts.read_json(f / "value.json"), False)
    return folder


def test_every_artifact_used_is_named_in_the_log(tmp_path, monkeypatch):
    from hawqlib.repro.book import artifacts_used

    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path / "store"))
    monkeypatch.delenv("FORCE", raising=False)
    monkeypatch.delenv(artifacts.USE_LOG, raising=False)
    quiet = _stored("quiet")  # no log named: nothing recorded anywhere
    log = tmp_path / "used.log"
    monkeypatch.setenv(artifacts.USE_LOG, str(log))
    a = _stored("a")  # computed: named once its manifest is written
    assert artifacts_used(log) == [str(a.resolve())]
    b = _stored("b")
    again = _stored("a")  # loaded: verified, named again; the reader keeps the first use
    assert again == a
    assert log.read_text().splitlines() == [str(a.resolve()), str(b.resolve()), str(a.resolve())]
    assert artifacts_used(log) == [str(a.resolve()), str(b.resolve())]
    assert str(quiet.resolve()) not in log.read_text()
    assert artifacts_used(tmp_path / "no-such.log") == []


def test_provenance_lists_each_artifact_once_from_its_verified_manifest(tmp_path, monkeypatch):
    from hawqlib.repro import provenance

    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path))
    monkeypatch.delenv("FORCE", raising=False)
    a, b = _stored("a", wall_s=12.5), _stored("b", wall_s=7200.0)
    timings = {"first": {"artifacts": [str(a), str(b)]}, "second": {"artifacts": [str(b)]},
               "old": {"wall_s": 1.0}}
    ch = provenance.chapters(timings, order=["first", "second", "old"])
    assert list(ch) == ["first", "second", "old"]
    assert [e["folder"] for e in ch["first"]["new"]] == [a.name, b.name] and ch["first"]["earlier"] == []
    assert ch["second"] == {"recorded": True, "new": [], "earlier": [b.name]}  # listed once, named again
    assert ch["old"]["recorded"] is False  # executed before the runner kept the list: said, not guessed
    e = ch["first"]["new"][0]
    assert e["kind"] == "probe" and e["wall_s"] == 12.5 and e["code"] == "step 1"
    assert e["threads"] == torch.get_num_threads() and f"{os.cpu_count()} CPU cores" in e["machine"]
    assert provenance.duration_text(12.5) == "12.5 s" and provenance.duration_text(7200.0) == "2.00 h"
    # a file changed since the notebook ran: the page cannot be built from it
    (b / "value.json").write_text('{"name": "changed"}')
    with pytest.raises(artifacts.ArtifactError, match="does not match the SHA-256"):
        provenance.chapters(timings, order=["first", "second", "old"])
    # a wall time that is not seconds >= 0 is refused
    c = _stored("c", wall_s=-1.0)
    with pytest.raises(artifacts.ArtifactError, match="not seconds >= 0"):
        provenance.entry(c)


def test_provenance_describes_the_committed_kinds_from_their_parameters():
    from hawqlib.repro import provenance

    assert provenance.describe("baseline_resnet20", {"model": "resnet20", "train": {"seed": 0, "epochs": 200}}) \
        == "FP32 resnet20 training, seed 0, 200 epochs"
    bits = json.dumps({"act_bits": 4, "weights": {"conv1": 4, "fc": 2}})
    assert provenance.describe("finetune", {"bit_config": bits, "direct": False, "finetune": {
        "seed": 1, "stages": 4, "epochs_per_stage": 8, "final_epochs": 0}}) \
        == "staged fine-tuning, W2-4A4, seed 1, 4 stages x 8 epochs"
    assert provenance.describe("spectrum", {"granularity": "layer", "solver": "lanczos", "tol": 1e-4,
                                            "data": {"cifar10_train": 512, "seed": 0}, "seed": 0}) \
        == "top Hessian eigenvalue per layer block, lanczos, tol 0.0001, 512 images, seed 0"


def test_the_provenance_page_has_a_table_per_chapter_and_sits_in_the_project_part():
    import yaml

    from hawqlib.repro import book

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    project = next(p for p in toc["parts"] if p["caption"] == "The project")
    assert "provenance" in [c["file"] for c in project["chapters"]]
    text = (ROOT / "book" / "provenance.md").read_text()
    assert "{provenance-summary}" in text
    tables = [ln.split()[-1] for ln in text.splitlines() if ln.startswith("```{provenance-table}")]
    assert tables == list(book.NOTEBOOKS)  # every chapter, in book order
    for name in book.NOTEBOOKS:
        label = "provenance-" + name.replace("_", "-")
        assert f"({label})=" in text and f"{{doc}}`executed/{name}`" in text
