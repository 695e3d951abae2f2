"""hawqlib.repro.data: both CIFAR-10 layouts, the verified cache, the fixed order, transforms, ImageNet, errors."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hawqlib.repro import batches, data

#: MD5 of the synthetic batch files written here: they stand in for torchvision's published ones.
FAKE_MD5: dict = {}

SHARED_DIGEST = "c12c05da773e19b150be0801e70c90ffde81677c9a3563d61d2812a9b064e1b5"


@pytest.fixture(autouse=True)
def _fake_checksums(monkeypatch):
    monkeypatch.setattr(batches, "published_md5", lambda: dict(FAKE_MD5))


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HAWQ_CACHE", str(cache))
    return cache


def _fake_cifar(tmp_path: Path, per_class: int = 2, seed: int = 0):
    """Write the same tiny data set in both layouts; return (batches_root, imagefolder_root)."""
    rng = np.random.default_rng(seed)
    rows = {"train": [], "test": []}
    for split in rows:
        for label, cls in enumerate(data.CIFAR10_CLASSES):
            for k in range(per_class):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                # names deliberately not in class order within a batch, to exercise the sort
                rows[split].append((label, f"{cls}_s_{(7 - k) * 13:06d}.png", img))
    rng.shuffle(rows["train"])
    bat = tmp_path / "bat" / "cifar-10-batches-py"
    bat.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(rows["train"])), 5)
    for i, idx in enumerate(chunks, 1):
        part = [rows["train"][j] for j in idx]
        _write_batch(bat / f"data_batch_{i}", part)
    _write_batch(bat / "test_batch", rows["test"])
    img_root = tmp_path / "img" / "cifar10"
    for split, rs in rows.items():
        for label, name, img in rs:
            d = img_root / split / data.CIFAR10_CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / name)
    return tmp_path / "bat", tmp_path / "img"


def _write_batch(path: Path, rows):
    d = {b"data": np.stack([r[2].transpose(2, 0, 1).reshape(-1) for r in rows]),
         b"labels": [r[0] for r in rows], b"filenames": [r[1].encode() for r in rows]}
    raw = pickle.dumps(d, protocol=3)  # bytes and numpy arrays in the forms the published files use
    path.write_bytes(raw)
    FAKE_MD5[path.name] = hashlib.md5(raw).hexdigest()


def test_both_layouts_give_identical_tensors_and_digest(tmp_path, tmp_cache):
    bat, img = _fake_cifar(tmp_path)
    for split in ("train", "test"):
        a, b = data.cifar10(split, bat, download=False), data.cifar10(split, img, download=False)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert a.names == b.names and a.digest == b.digest
    assert data.cifar10_digest(bat, download=False) == data.cifar10_digest(img, download=False)


def test_fixed_order_is_class_then_file_name(tmp_path, tmp_cache):
    bat, _ = _fake_cifar(tmp_path)
    s = data.cifar10("train", bat, download=False)
    keys = list(zip(s.labels.tolist(), s.names))
    assert keys == sorted(keys)
    assert s.images.dtype == torch.uint8 and s.images.shape == (20, 3, 32, 32)


def test_cache_is_reused_and_corruption_is_detected(tmp_path, tmp_cache, monkeypatch):
    bat, _ = _fake_cifar(tmp_path)
    first = data.cifar10("test", bat, download=False)
    u8 = next(tmp_cache.glob("*.u8"))
    # a cached load must not decode again
    monkeypatch.setattr(data, "_decode_batches", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    again = data.cifar10("test", bat, download=False)
    assert torch.equal(first.images, again.images)
    monkeypatch.undo()
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_cache))
    monkeypatch.setattr(batches, "published_md5", lambda: dict(FAKE_MD5))
    # flip one byte: same size, wrong digest -> rebuilt
    raw = bytearray(u8.read_bytes())
    raw[100] ^= 0xFF
    u8.write_bytes(bytes(raw))
    assert torch.equal(data.cifar10("test", bat, download=False).images, first.images)
    assert u8.read_bytes() != bytes(raw)
    # truncate: partial cache -> rebuilt
    u8.write_bytes(u8.read_bytes()[:50])
    assert torch.equal(data.cifar10("test", bat, download=False).images, first.images)


def test_no_data_error_names_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.delenv("HAWQ_DATA", raising=False)
    monkeypatch.setattr(data, "project_root", lambda: tmp_path)
    with pytest.raises(data.DataNotFoundError) as e:
        data.find_cifar10(download=False)
    msg = str(e.value)
    assert "root=" in msg and "HAWQ_DATA" in msg and "download" in msg and str(tmp_path / "data") in msg


def test_wrong_explicit_root_is_an_error(tmp_path):
    with pytest.raises(data.DataNotFoundError, match="cifar-10-batches-py"):
        data.cifar10("train", tmp_path / "nowhere", download=False)


def test_bad_split_is_an_error():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.cifar10("val")


def test_shared_cifar10_matches_published_digest_and_stats(cifar_root):
    assert data.cifar10_digest(cifar_root, download=False) == SHARED_DIGEST
    train = data.cifar10("train", cifar_root, download=False)
    assert len(train) == 50_000 and len(data.cifar10("test", cifar_root, download=False)) == 10_000
    x = train.images[::10].double() / 255
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    assert torch.allclose(mean, torch.tensor(data.CIFAR10_MEAN, dtype=torch.double), atol=2e-3)
    assert torch.allclose(std, torch.tensor(data.CIFAR10_STD, dtype=torch.double), atol=2e-3)
    assert torch.bincount(train.labels).tolist() == [5000] * 10


def test_augmentation_is_a_shifted_and_maybe_flipped_window():
    g = torch.Generator().manual_seed(3)
    imgs = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = data.augment_cifar(imgs, g)
    assert out.shape == imgs.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(imgs, (4, 4, 4, 4))
    for i in range(16):
        windows = [padded[i, :, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(out[i], w) for w in windows)
    assert torch.equal(out, data.augment_cifar(imgs, torch.Generator().manual_seed(3)))


def test_loader_replays_an_epoch_exactly_and_normalizes():
    imgs = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    ld = data.TensorLoader(imgs, labels, 16, shuffle=True, augment=True, seed=1)
    ld.set_epoch(2)
    a = list(ld)
    ld.set_epoch(3)
    b = list(ld)
    ld.set_epoch(2)
    c = list(ld)
    assert len(a) == len(ld) == 4 and sum(len(y) for _, y in a) == 50
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, c))
    assert not all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(a, b))
    plain = data.TensorLoader(imgs, labels, 50)
    x, y = next(iter(plain))
    expect = (imgs.float() / 255 - torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(x, expect, atol=1e-6) and torch.equal(y, labels)


def test_loader_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        data.TensorLoader(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        data.TensorLoader(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
