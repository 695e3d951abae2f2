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
