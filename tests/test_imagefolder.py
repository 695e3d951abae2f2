"""The ImageNet path end to end on a tiny ImageFolder tree written here (ImageNet cannot be had on this machine).

The tree has ImageNet's layout (``train/<class>/``, ``val/<class>/``) with a few small images per class;
the commands are the README's ("ImageNet models"), at the smoke profile, on SqueezeNext (the smallest of the
paper's ImageNet models) with 32-pixel crops.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hawqlib import distributed
from hawqlib.repro import sources
from hawqlib.repro.imagenet import ImageFolderSource

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("n01", "n02", "n03")


def write_tree(root: Path, per_class=(8, 4), size: int = 40) -> Path:
    """A seeded ImageFolder tree: each class a different mean colour plus noise, PNG files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3)) + 60 + 70 * c
                img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """FP32 weights supplied by the user, as the paper's rows take torchvision's (here: seeded, 3 classes)."""
    from hawqlib import models

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "squeezenext-3.pt"
    torch.save(models.get("squeezenext", num_classes=3).state_dict(), path)
    return path


def test_source_key_loaders_and_rank_slices(tree, tmp_path):
    src = ImageFolderSource(tree, "squeezenext", image_size=32)
    assert src.num_classes == 3
    key = src.key()
    assert key == ImageFolderSource(tree, "squeezenext", image_size=32).key()
    assert key != ImageFolderSource(tree, "squeezenext", image_size=24).key()
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)
    extra = copy / "train" / CLASSES[0] / "extra.png"
    shutil.copy(copy / "train" / CLASSES[1] / f"{CLASSES[1]}_0.png", extra)
    assert ImageFolderSource(copy, "squeezenext", image_size=32).key()["imagefolder"]["train"] != \
        key["imagefolder"]["train"]  # one more file: another key

    tr, te = src.loaders(batch_size=10, seed=3)
    assert len(tr) == 3 and len(te) == 1
    tr.set_epoch(1)
    a = list(tr)
    b = list(tr)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))  # epoch replays
    tr.set_epoch(2)
    assert not torch.equal(next(iter(tr))[0], a[0][0])  # another epoch, another order and crops
    tr.set_epoch(1)
    for (x, y), *slices in zip(a, tr.iter_shard(0, 2), tr.iter_shard(1, 2)):
        assert torch.equal(torch.cat([s[0] for s in slices]), x)  # the two ranks' slices are the global batch
        assert torch.equal(torch.cat([s[1] for s in slices]), y)
        assert slices[0][2] == len(y)
    assert x.shape[1:] == (3, 32, 32)
    xs, ys = src.sample(5, seed=1)
    assert xs.shape == (5, 3, 32, 32) and torch.equal(src.sample(5, seed=1)[0], xs)


def test_source_errors_name_what_is_valid(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        ImageFolderSource(tmp_path / "nowhere")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="'val' split"):
        ImageFolderSource(tmp_path, image_size=32).split("val")
    with pytest.raises(ValueError, match="ImageNet model"):
        sources.for_model("resnet50", None)
    assert isinstance(sources.for_model("resnet20", None), sources.CIFAR10Source)


def _cli(args, env, launcher=None, timeout=900):
    cmd = (launcher or [sys.executable, "-m"]) + ["hawqlib", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _env(tmp_path, name):
    env = dict(os.environ, HAWQ_ARTIFACTS=str(tmp_path / name), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("FORCE", None)
    return env


COMMON = ["--model", "squeezenext", "--profile", "smoke", "--image-size", "32", "--threads", "1"]


def test_imagenet_pipeline_end_to_end_from_the_command_line(tree, weights, tmp_path):
    env = _env(tmp_path, "one")
    out = _cli(["train", "--data", str(tree), *COMMON], env)  # the baseline trained (smoke: one epoch)
    assert "done:" in out and "baseline_squeezenext-" in out
    common = [*COMMON, "--weights", str(weights)]  # from here on, the supplied FP32 weights
    out = _cli(["train", "--data", str(tree), *common], env)
    assert "done:" in out and "baseline_squeezenext-" in out
    out = _cli(["finetune", "hawq", "--data", str(tree), "--seeds", "0", *common], env)
    line = next(ln for ln in out.splitlines() if ln.startswith("hawq (seed 0): test top-1"))
    m = re.search(r"test top-1 ([\d.]+)% \(from the packed file ([\d.]+)%\)", line)
    assert m and m.group(1) == m.group(2)  # the packed file restores the fine-tuned model's predictions
    folders = sorted(p.name.split("-")[0] for p in (tmp_path / "one").iterdir())
    assert folders == ["baseline_squeezenext", "baseline_squeezenext", "finetune", "spectrum"]
    for f in (tmp_path / "one").iterdir():
        assert (f / "manifest.json").is_file()
    again = _cli(["finetune", "hawq", "--data", str(tree), "--seeds", "0", *common], env)
    assert line.split(", fine-tuning")[0] in again  # loaded: the same numbers


@pytest.mark.skipif(not distributed.dist.is_available(), reason="torch.distributed is not available")
def test_imagenet_pipeline_under_torchrun_two_ranks(tree, weights, tmp_path):
    env = _env(tmp_path, "two")
    common = [*COMMON, "--weights", str(weights)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    out = _cli(["train", "--data", str(tree), *common], env, launcher=torchrun)
    assert out.count("done:") == 1  # rank 0 alone reports (and writes)
    out = _cli(["finetune", "hawq", "--data", str(tree), "--seeds", "0", *common], env, launcher=torchrun)
    assert out.count("hawq (seed 0): test top-1") == 1
    made = sorted((tmp_path / "two").iterdir())
    assert sorted(p.name.split("-")[0] for p in made) == ["baseline_squeezenext", "finetune", "spectrum"]
    # one process then finds every artifact complete and verified: it loads them, computing nothing
    stamps = {p: (p / "manifest.json").stat().st_mtime_ns for p in made}
    _cli(["finetune", "hawq", "--data", str(tree), "--seeds", "0", *common], env)
    assert sorted((tmp_path / "two").iterdir()) == made
    assert {p: (p / "manifest.json").stat().st_mtime_ns for p in made} == stamps
