"""Training: the loss goes down, logs and checkpoints, exact resume, refused checkpoints, evaluate()."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hawqlib.models as M
from hawqlib.repro.data import TensorLoader, cifar10
from hawqlib.train import CheckpointError, TrainConfig, content_digest, evaluate, load_checkpoint, load_weights, train

TIMING = ("images_per_s", "wall_s", "eval_s")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread (our choice for tests): on oversubscribed cores two OpenMP threads run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Tiny(nn.Module):
    """A small CNN with BatchNorm and dropout: dropout draws on torch's global random state."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(16 * width, 10)

    def forward(self, x):
        return self.fc(self.drop(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1)))


def synthetic_loaders(n: int = 96, seed: int = 0):
    """uint8 images whose mean brightness encodes the label, shuffled and augmented like CIFAR."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = (torch.rand(n, 3, 16, 16, generator=g) * 60 + labels[:, None, None, None] * 19).to(torch.uint8)
    return (TensorLoader(images, labels, 32, shuffle=True, augment=True, seed=seed),
            TensorLoader(images[:48], labels[:48], 48))


CFG = dict(epochs=4, lr=0.05, schedule="cosine", weight_decay=5e-4, seed=3)


def run(folder, *, init_seed=1, callback=None, width=8, **over):
    torch.manual_seed(init_seed)
    model = Tiny(width)
    tr, te = synthetic_loaders()
    log = train(model, tr, te, checkpoint_dir=folder, progress=False, callback=callback, **{**CFG, **over})
    return model, log


def strip(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    model, log = run(folder)
    return model, log, folder


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run of the same 4-epoch configuration stopped after epoch 2 (as by a kill after its checkpoint)."""
    folder = tmp_path_factory.mktemp("cut")
    _, log = run(folder, callback=lambda rec: rec["epoch"] == 2)
    return folder, log


def test_resume_after_interruption_is_bit_exact(uninterrupted, interrupted, tmp_path):
    full_model, full_log, _ = uninterrupted
    folder, cut_log = interrupted
    assert len(cut_log["epochs"]) == 2 and not (folder / "model.pt").exists()
    assert load_checkpoint(folder / "checkpoint.pt")["epoch"] == 2
    work = tmp_path / "resume"
    work.mkdir()
    (work / "checkpoint.pt").write_bytes((folder / "checkpoint.pt").read_bytes())
    torch.rand(1000)                                     # a different global random state ...
    resumed, log = run(work, init_seed=99)               # ... and other initial weights: all replaced
    assert len(log["epochs"]) == 4
    assert same_weights(resumed, full_model)             # bit for bit
    assert strip(log["epochs"]) == strip(full_log["epochs"])
    final = load_checkpoint(work / "model.pt")
    assert all(torch.equal(final["model"][k], v) for k, v in full_model.state_dict().items())


def test_resume_needs_the_saved_random_state(uninterrupted, interrupted, tmp_path):
    """Sensitivity check: without the saved global random state, dropout makes the resumed run differ."""
    full_model, _, _ = uninterrupted
    folder, _ = interrupted
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    del ckpt["rng_state"], ckpt["sha256"]  # as a checkpoint written before the random state was recorded
    work = tmp_path / "norng"
    work.mkdir()
    torch.save({**ckpt, "sha256": content_digest(ckpt)}, work / "checkpoint.pt")  # one without a digest is refused
    resumed, _ = run(work)
    assert not same_weights(resumed, full_model)


def test_resume_in_a_fresh_process(uninterrupted, interrupted, tmp_path):
    full_model, _, _ = uninterrupted
    folder, _ = interrupted
    work = tmp_path / "proc"
    work.mkdir()
    (work / "checkpoint.pt").write_bytes((folder / "checkpoint.pt").read_bytes())
    # same thread count as this process: bit-exactness holds for a fixed number of threads
    code = ("import sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[2]); "
            "import test_train as t; t.run(sys.argv[1], init_seed=7)")
    subprocess.run([sys.executable, "-c", code, str(work), str(Path(__file__).parent)], check=True, timeout=300)
    resumed = load_weights(Tiny(), work / "model.pt")
    assert same_weights(resumed, full_model)


def test_log_and_checkpoint_files(uninterrupted):
    model, log, folder = uninterrupted
    on_disk = json.loads((folder / "log.json").read_text())
    assert on_disk["config"]["epochs"] == 4 and len(on_disk["epochs"]) == 4
    for i, rec in enumerate(on_disk["epochs"], 1):
        assert rec["epoch"] == i and rec["images_per_s"] > 0 and 0 <= rec["train_top1"] <= 100
        assert "val_top1" in rec                                   # eval_every=1
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "log.json", "model.pt"]  # no temp files
    assert on_disk["epochs"][-1]["lr"] < on_disk["epochs"][0]["lr"]                       # cosine decay


def test_checkpoint_of_another_model_refused(interrupted, tmp_path):
    folder, _ = interrupted
    work = tmp_path / "other"
    work.mkdir()
    (work / "checkpoint.pt").write_bytes((folder / "checkpoint.pt").read_bytes())
    with pytest.raises(CheckpointError, match="another model"):
        run(work, width=16)
    with pytest.raises(CheckpointError, match="another configuration"):
        run(work, lr=0.1)
    with pytest.raises(CheckpointError, match="another model"):
        load_weights(M.resnet20(), work / "checkpoint.pt")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_ours"])
def test_corrupt_checkpoint_refused(interrupted, tmp_path, damage):
    folder, _ = interrupted
    good = (folder / "checkpoint.pt").read_bytes()
    path = tmp_path / "checkpoint.pt"
    if damage == "garbage":
        path.write_bytes(b"\x00 not a checkpoint")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        torch.save(Tiny().state_dict(), path)                      # a bare state dict, not a checkpoint
    with pytest.raises(CheckpointError, match="not a readable checkpoint|is not a hawqlib.train"):
        run(tmp_path)
    assert path.exists()                                            # refused, never overwritten


def test_a_few_steps_lower_the_loss_and_model_pt_loads(cifar_root, tmp_path):
    split = cifar10("train", cifar_root)
    idx = torch.arange(0, len(split), len(split) // 128)[:128]        # 128 images of all classes
    loader = TensorLoader(split.images[idx], split.labels[idx], 32, shuffle=True, augment=False, seed=0)
    torch.manual_seed(0)
    model = M.resnet20()
    before = evaluate(model, loader)["loss"]
    log = train(model, loader, epochs=3, lr=0.05, schedule="constant", checkpoint_dir=tmp_path, progress=False)
    losses = [r["train_loss"] for r in log["epochs"]]                 # 12 steps of 32 images
    assert losses[-1] < losses[0] - 0.1 and losses[-1] < before
    again = M.get("resnet20", weights=tmp_path / "model.pt")        # hawqlib checkpoints load through get()
    assert same_weights(again, model)


def test_progress_bar_and_silence(capsys):
    torch.manual_seed(0)
    tr, _ = synthetic_loaders()
    train(Tiny(), tr, epochs=1, lr=0.05, progress=True)
    err = capsys.readouterr().err
    assert "loss=" in err and "img/s=" in err and "acc=" in err
    train(Tiny(), tr, epochs=1, lr=0.05, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_evaluate_counts_top1_top5():
    logits = torch.tensor([[9., 1, 2, 3, 4, 5, 0],        # label 0: top-1
                           [1., 9, 8, 7, 6, 5, 0],        # label 2: top-5 only
                           [1., 2, 3, 4, 5, 6, 9]])       # label 0: neither
    labels = torch.tensor([0, 2, 0])
    res = evaluate(nn.Identity(), [(logits, labels)])
    assert res["top1"] == pytest.approx(100 / 3) and res["top5"] == pytest.approx(200 / 3) and res["n"] == 3
    assert res["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, labels)))
    with pytest.raises(ValueError, match="no batches"):
        evaluate(nn.Identity(), [])


def test_bad_arguments():
    tr, _ = synthetic_loaders()
    with pytest.raises(TypeError, match="epochs"):
        train(Tiny(), tr)
    with pytest.raises(ValueError, match="schedule"):
        train(Tiny(), tr, epochs=1, schedule="linear")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0).validate()


def test_command_line_says_where_files_go(cifar_root, tmp_path, monkeypatch, capsys):
    """``python -m hawqlib train`` (smoke profile, 1 epoch on 1,024 images) prints its folder and files."""
    from hawqlib.repro.cli import main

    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path))
    monkeypatch.delenv("FORCE", raising=False)
    assert main(["train", "--profile", "smoke", "--epochs", "1", "--data", str(cifar_root)]) == 0
    out = capsys.readouterr().out
    folders = [p for p in tmp_path.iterdir() if p.name.startswith("baseline_resnet20-")]
    assert len(folders) == 1
    for name in ("checkpoint.pt", "log.json", "model.pt"):
        assert (folders[0] / name).is_file() and str(folders[0] / name) in out
