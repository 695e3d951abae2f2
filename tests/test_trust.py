"""Issue 17, stored state: each fault or attack on artifacts, checkpoints and runs gets a clear error.

Flipped bits in an artifact and a checkpoint, hand-edited or legacy manifests, forged checkpoint
fields, a NaN loss, two writers of one run, orphan temp files, command-line user errors; and every
committed artifact still verifies.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _trust_helpers import ENV, ROOT, cli, tiny
from torch import nn

from hawqlib import hessian
from hawqlib.repro import pipeline
from hawqlib.repro.artifacts import MANIFEST, ArtifactError, FolderBusyError, artifact_wall_s, read_manifest, seal, verify
from hawqlib.train import CheckpointError, NonFiniteLossError, content_digest, train


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FORCE", raising=False)
    return tmp_path / "artifacts"


# ---------------------------------------------------------------------- 2. flipped bits, edited manifests

CFG = {"method": "autograd", "solver": "lanczos", "tol": 1e-6, "max_iter": 50, "seed": 0}


def _spectrum(net, batch):
    return pipeline.spectrum(net, "tiny", CFG, "layer", data=batch, data_key="tiny", vectors=True)


def _no_recompute(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("recomputed over a stored artifact")

    monkeypatch.setattr(hessian, "top_eigenvalues", boom)


def _flip_bit(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_flipped_bit_in_an_artifact_is_named_never_recomputed(artifacts, monkeypatch):
    net, batch = tiny()
    _, folder = _spectrum(net, batch)
    _no_recompute(monkeypatch)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _flip_bit(folder / "vectors.pt", len(before["vectors.pt"]) // 2)
    with pytest.raises(ArtifactError, match=r"vectors\.pt does not match the SHA-256.*FORCE=1"):
        _spectrum(net, batch)
    assert (folder / "spectrum.json").read_bytes() == before["spectrum.json"]
    (folder / "vectors.pt").write_bytes(before["vectors.pt"])
    _spectrum(net, batch)  # restored: loads, without computing
    # a missing file: the message says it is missing and how to recompute (not "delete it")
    (folder / "vectors.pt").unlink()
    with pytest.raises(ArtifactError, match=r"vectors\.pt is listed in the manifest but missing.*manifest"):
        _spectrum(net, batch)
    (folder / "vectors.pt").write_bytes(before["vectors.pt"])
    # a truncated spectrum.json is caught by its digest, not a raw JSONDecodeError
    (folder / "spectrum.json").write_bytes(before["spectrum.json"][:40])
    with pytest.raises(ArtifactError, match=r"spectrum\.json does not match"):
        _spectrum(net, batch)
    (folder / "spectrum.json").write_bytes(before["spectrum.json"])
    _spectrum(net, batch)


def test_edited_truncated_or_legacy_manifest_is_an_error_not_a_restart(artifacts, monkeypatch):
    net, batch = tiny()
    _, folder = _spectrum(net, batch)
    _no_recompute(monkeypatch)
    path = folder / "manifest.json"
    good = path.read_text()
    m = json.loads(good)
    m["wall_s"] = 1.0  # a value edited by hand
    path.write_text(json.dumps(m, indent=2))
    with pytest.raises(ArtifactError, match="changed after it was written"):
        _spectrum(net, batch)
    with pytest.raises(ArtifactError):
        artifact_wall_s(folder)
    path.write_text(good[: len(good) // 2])  # truncated: an error, never a silent recompute
    with pytest.raises(ArtifactError, match="manifest.json is unreadable"):
        _spectrum(net, batch)
    # a manifest from before digests were recorded: refused, naming the seal command
    legacy = {k: v for k, v in json.loads(good).items() if k not in ("files", "manifest_sha256")}
    path.write_text(json.dumps(legacy, indent=2))
    with pytest.raises(ArtifactError, match=f"python -m hawqlib seal {folder}"):
        _spectrum(net, batch)
    r = cli("seal", str(folder), env={**ENV, "HAWQ_ARTIFACTS": str(artifacts)})
    assert r.returncode == 0 and f"sealed: {folder}" in r.stdout
    sealed = json.loads(path.read_text())
    assert sealed["key"] == legacy["key"] and sealed["params"] == legacy["params"]
    assert sealed["files"] == json.loads(good)["files"] and "sealed" in sealed
    _spectrum(net, batch)
    seal(folder)  # sealing again verifies and changes nothing
    assert json.loads(path.read_text()) == sealed


def test_seal_refuses_a_damaged_legacy_artifact(artifacts):
    net, batch = tiny()
    _, folder = _spectrum(net, batch)
    m = json.loads((folder / "manifest.json").read_text())
    legacy = {k: v for k, v in m.items() if k not in ("files", "manifest_sha256")}
    (folder / "manifest.json").write_text(json.dumps(legacy))
    (folder / "spectrum.json").write_text('{"truncated": ')
    with pytest.raises(ArtifactError, match=r"spectrum\.json is unreadable.*not sealing"):
        seal(folder)
    assert json.loads((folder / "manifest.json").read_text()) == legacy
    with pytest.raises(ArtifactError, match="no manifest.json"):
        seal(artifacts)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(x)


def _loader(nan=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    if nan:
        x[5, 2] = float("nan")
    y = torch.randint(0, 3, (32,), generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]


def _one_epoch(folder: Path) -> Path:
    torch.manual_seed(0)
    train(_Tiny(), _loader(), epochs=3, lr=0.1, checkpoint_dir=folder, progress=False, channels_last=False,
          callback=lambda rec: True)
    return folder / "checkpoint.pt"


def test_flipped_bit_in_a_checkpoint_refuses_to_resume(tmp_path):
    ckpt_path = _one_epoch(tmp_path / "run")
    ckpt = torch.load(ckpt_path, weights_only=True)
    w = ckpt["model"]["fc.weight"]
    w.view(-1).view(torch.int32)[3] ^= 1 << 30  # one bit of one weight, as a disk fault would
    torch.save(ckpt, ckpt_path)
    with pytest.raises(CheckpointError, match="does not match the SHA-256 it records"):
        train(_Tiny(), _loader(), epochs=3, lr=0.1, checkpoint_dir=tmp_path / "run", progress=False,
              channels_last=False)
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.parametrize("field,value", [("epoch", 7), ("epoch", -1), ("epoch", "1"), ("history", [])])
def test_checkpoint_fields_are_range_checked_on_resume(tmp_path, field, value):
    ckpt_path = _one_epoch(tmp_path / "run")
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt[field] = value
    ckpt["sha256"] = content_digest({k: v for k, v in ckpt.items() if k != "sha256"})  # a consistent forgery
    torch.save(ckpt, ckpt_path)
    with pytest.raises(CheckpointError, match=f"field '{field}'"):
        train(_Tiny(), _loader(), epochs=3, lr=0.1, checkpoint_dir=tmp_path / "run", progress=False,
              channels_last=False)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    ckpt_path = _one_epoch(tmp_path / "run")
    saved = ckpt_path.read_bytes()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, step 1/4.*keeps epoch 1"):
        train(_Tiny(), _loader(nan=True), epochs=3, lr=0.1, checkpoint_dir=tmp_path / "run", progress=False,
              channels_last=False)
    assert ckpt_path.read_bytes() == saved and not (tmp_path / "run" / "model.pt").exists()


def test_weights_made_non_finite_under_a_finite_loss_stop_the_run(tmp_path):
    """One step a epoch: the NaN gradient of its only step leaves the loss finite and the weights not."""
    torch.manual_seed(0)
    model = _Tiny()
    hook = model.fc.weight.register_hook(lambda g: g if hook_on else torch.full_like(g, float("nan")))
    hook_on = True
    one_batch = _loader()[:1]
    train(model, one_batch, epochs=3, lr=0.1, checkpoint_dir=tmp_path / "run", progress=False,
          channels_last=False, callback=lambda rec: True)
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    hook_on = False
    with pytest.raises(NonFiniteLossError, match=r"weights fc.weight became NaN or infinite in epoch 2 while the "
                                                 r"training loss stayed finite.*keeps epoch 1"):
        train(model, one_batch, epochs=3, lr=0.1, checkpoint_dir=tmp_path / "run", progress=False,
              channels_last=False)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == saved
    assert not (tmp_path / "run" / "model.pt").exists()
    hook.remove()


def test_a_non_finite_validation_loss_stops_the_run(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"validation loss is nan after epoch 1 with finite weights"):
        train(_Tiny(), _loader(), val_data=_loader(nan=True), epochs=2, lr=0.1, checkpoint_dir=tmp_path / "run",
              progress=False, channels_last=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------------- 4. one writer per run

_HOLDER = """
import sys, time
from pathlib import Path
from hawqlib.repro import pipeline
go, release = Path(sys.argv[1]), Path(sys.argv[2])
def compute(folder):
    go.write_text("computing")
    while not release.exists():
        time.sleep(0.05)
    return 41
def save(folder, value):
    (folder / "value.json").write_text(str(value))
pipeline._cached("race", {"run": 1}, compute, save, lambda f: int((f / "value.json").read_text()), None)
"""


def test_second_writer_of_a_run_is_told_the_holders_pid(artifacts, tmp_path):
    go, release = tmp_path / "go", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(go), str(release)],
                              env={**ENV, "HAWQ_ARTIFACTS": str(artifacts)}, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not go.exists():
            assert holder.poll() is None and time.time() < deadline, "the first writer did not start"
            time.sleep(0.05)

        def never(folder):
            raise AssertionError("a second writer computed the same run")

        with pytest.raises(FolderBusyError, match=f"being written by process {holder.pid}"):
            pipeline._cached("race", {"run": 1}, never, None, None, None)
        release.touch()
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    value, folder = pipeline._cached("race", {"run": 1}, never, None, lambda f: int((f / "value.json").read_text()),
                                     None)
    assert value == 41 and verify(folder)["files"].keys() == {"value.json"}


def test_orphan_temp_files_are_removed_by_the_next_writer(artifacts):
    net, batch = tiny()
    _, folder = _spectrum(net, batch)
    stray = folder / ".vectors.pt.abc123.tmp"
    stray.write_bytes(b"half")
    (folder / "manifest.json").unlink()  # the run was interrupted: it is recomputed, and the stray goes
    _spectrum(net, batch)
    assert not stray.exists() and verify(folder)


# ---------------------------------------------------------------------- 6. clear errors at the command line

def test_command_line_user_errors_are_one_line(tmp_path):
    r = cli("train", "--threads", "99999")
    assert r.returncode == 2 and "0.." in r.stderr and "Traceback" not in r.stderr
    r = cli("finetune", "--data", str(tmp_path), env={**ENV, "HAWQ_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"No CIFAR-10 at {tmp_path}" in r.stderr


# ---------------------------------------------------------------------- nothing committed changed

def test_every_committed_artifact_verifies():
    root = ROOT / "data" / "artifacts"
    folders = [f for f in sorted(root.iterdir()) if f.is_dir()] if root.is_dir() else []
    if not folders:
        pytest.skip("no committed artifacts in this checkout")
    finished = []
    for f in folders:
        if not (f / MANIFEST).exists() and {p.name for p in f.iterdir()} <= {"run"}:
            continue  # a fine-tuning run in progress (only its resume state): not an artifact yet
        m = verify(f)
        assert f.name.endswith(m["key"]) and m["files"]
        finished.append(f)
    for f in (f for f in finished if f.name.startswith("finetune-")):
        packed_file = f / "model.hawq"
        assert read_manifest(f)["packed_bytes"] == packed_file.stat().st_size
