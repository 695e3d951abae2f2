"""Helpers shared by the trust tests (test_trust.py, test_trust_files.py, test_trust_state.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args, env=None, timeout=120):
    """Run ``python -m hawqlib ARGS`` from this checkout; the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", "hawqlib", *args], capture_output=True, text=True,
                          env=env or ENV, cwd=ROOT, timeout=timeout)


def tiny():
    """A seeded conv-BN-linear net in eval mode and a batch of 12 6x6 images with 5 classes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 5))
    g = torch.Generator().manual_seed(1)
    return net.eval(), (torch.randn(12, 3, 6, 6, generator=g), torch.randint(0, 5, (12,), generator=g))


def image_folder(root: Path, per_class: int = 1, **save_kwargs) -> Path:
    """A seeded CIFAR-10-shaped ImageFolder under ``root/cifar10/{train,test}/<class>/<class>_<k>.png``;
    ``save_kwargs`` go to ``PIL.Image.save`` (``compress_level=0`` keeps an edited pixel's file the same size)."""
    import numpy as np
    from PIL import Image

    from hawqlib.repro import data

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in data.CIFAR10_CLASSES:
            d = root / "cifar10" / split / cls
            d.mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{cls}_{k}.png",
                                                                                       **save_kwargs)
    return root
