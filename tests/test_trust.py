"""Issue 17: each way of feeding hawqlib bad state, tried as an attack or a fault, gets a clear error.

Data folders that would run code, flipped bits in artifacts and checkpoints, edited images, two
writers of one run, crafted packed files, stray files; and the committed artifacts stay verified.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hawqlib import batches, data, export, hessian, pipeline, runs, storage
from hawqlib.quant import BitConfig, quantize_model
from hawqlib.train import CheckpointError, NonFiniteLossError, content_digest, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FORCE", raising=False)
    return tmp_path / "artifacts"


def _cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "hawqlib", *args], capture_output=True, text=True,
                          env=env or ENV, cwd=ROOT, timeout=timeout)


# ---------------------------------------------------------------------- 1. no code runs from data

class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_batches(root: Path, marker: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Payload(marker)}, protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": [0]}, protocol=2))
    return folder


def test_crafted_batch_file_is_refused_before_unpickling(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    _evil_batches(tmp_path / "d", marker)
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "cache"))
    with pytest.raises(data.DataIntegrityError, match="data_batch_1: MD5 .* published .* not unpickled"):
        data.cifar10("train", tmp_path / "d", download=False)
    # the command line says so in one line, and runs nothing either
    r = _cli("train", "--data", str(tmp_path / "d"), env={**ENV, "HAWQ_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1 and "Traceback" not in r.stderr and "MD5" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_restricted_unpickler_admits_only_the_format(tmp_path):
    import hashlib

    marker = tmp_path / "pwned"
    for obj in ({b"data": _Payload(marker)}, {b"data": np.array([object()], dtype=object)},
                {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1], b"filenames": [b"a", b"b"]}):
        raw = pickle.dumps(obj, protocol=2)
        path = tmp_path / "data_batch_1"
        path.write_bytes(raw)
        # even with a matching checksum, only dicts, lists, bytes, numbers and uint8 arrays get through
        with pytest.raises(data.DataIntegrityError, match="not admitted|not a CIFAR-10 batch"):
            batches.load_batch(path, hashlib.md5(raw).hexdigest())
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker), protocol=2))  # the attack is real: a plain unpickler runs it
    assert marker.exists()
    ok = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 9], b"filenames": [b"a.png", b"b.png"],
          b"batch_label": b"x"}
    raw = pickle.dumps(ok, protocol=3)
    path.write_bytes(raw)
    got = batches.load_batch(path, hashlib.md5(raw).hexdigest())
    assert got[b"labels"] == [0, 9] and np.array_equal(got[b"data"], ok[b"data"])


# ---------------------------------------------------------------------- 2. flipped bits, edited manifests

def _tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 5))
    g = torch.Generator().manual_seed(1)
    return net.eval(), (torch.randn(12, 3, 6, 6, generator=g), torch.randint(0, 5, (12,), generator=g))


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
    net, batch = _tiny()
    _, folder = _spectrum(net, batch)
    _no_recompute(monkeypatch)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _flip_bit(folder / "vectors.pt", len(before["vectors.pt"]) // 2)
    with pytest.raises(runs.ArtifactError, match=r"vectors\.pt does not match the SHA-256.*FORCE=1"):
        _spectrum(net, batch)
    assert (folder / "spectrum.json").read_bytes() == before["spectrum.json"]
    (folder / "vectors.pt").write_bytes(before["vectors.pt"])
    _spectrum(net, batch)  # restored: loads, without computing
    # a missing file: the message says it is missing and how to recompute (not "delete it")
    (folder / "vectors.pt").unlink()
    with pytest.raises(runs.ArtifactError, match=r"vectors\.pt is listed in the manifest but missing.*manifest"):
        _spectrum(net, batch)
    (folder / "vectors.pt").write_bytes(before["vectors.pt"])
    # a truncated spectrum.json is caught by its digest, not a raw JSONDecodeError
    (folder / "spectrum.json").write_bytes(before["spectrum.json"][:40])
    with pytest.raises(runs.ArtifactError, match=r"spectrum\.json does not match"):
        _spectrum(net, batch)
    (folder / "spectrum.json").write_bytes(before["spectrum.json"])
    _spectrum(net, batch)


def test_edited_truncated_or_legacy_manifest_is_an_error_not_a_restart(artifacts, monkeypatch):
    net, batch = _tiny()
    _, folder = _spectrum(net, batch)
    _no_recompute(monkeypatch)
    path = folder / "manifest.json"
    good = path.read_text()
    m = json.loads(good)
    m["wall_s"] = 1.0  # a value edited by hand
    path.write_text(json.dumps(m, indent=2))
    with pytest.raises(runs.ArtifactError, match="changed after it was written"):
        _spectrum(net, batch)
    with pytest.raises(runs.ArtifactError):
        pipeline.artifact_wall_s(folder)
    path.write_text(good[: len(good) // 2])  # truncated: an error, never a silent recompute
    with pytest.raises(runs.ArtifactError, match="manifest.json is unreadable"):
        _spectrum(net, batch)
    # a manifest from before digests were recorded: refused, naming the seal command
    legacy = {k: v for k, v in json.loads(good).items() if k not in ("files", "manifest_sha256")}
    path.write_text(json.dumps(legacy, indent=2))
    with pytest.raises(runs.ArtifactError, match=f"python -m hawqlib seal {folder}"):
        _spectrum(net, batch)
    r = _cli("seal", str(folder), env={**ENV, "HAWQ_ARTIFACTS": str(artifacts)})
    assert r.returncode == 0 and f"sealed: {folder}" in r.stdout
    sealed = json.loads(path.read_text())
    assert sealed["key"] == legacy["key"] and sealed["params"] == legacy["params"]
    assert sealed["files"] == json.loads(good)["files"] and "sealed" in sealed
    _spectrum(net, batch)
    runs.seal(folder)  # sealing again verifies and changes nothing
    assert json.loads(path.read_text()) == sealed


def test_seal_refuses_a_damaged_legacy_artifact(artifacts):
    net, batch = _tiny()
    _, folder = _spectrum(net, batch)
    m = json.loads((folder / "manifest.json").read_text())
    legacy = {k: v for k, v in m.items() if k not in ("files", "manifest_sha256")}
    (folder / "manifest.json").write_text(json.dumps(legacy))
    (folder / "spectrum.json").write_text('{"truncated": ')
    with pytest.raises(runs.ArtifactError, match=r"spectrum\.json is unreadable.*not sealing"):
        runs.seal(folder)
    assert json.loads((folder / "manifest.json").read_text()) == legacy
    with pytest.raises(runs.ArtifactError, match="no manifest.json"):
        runs.seal(artifacts)


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


# ---------------------------------------------------------------------- 3. the decode cache follows its source

def _image_folder(root: Path, per_class: int = 1) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in data.CIFAR10_CLASSES:
            d = root / "cifar10" / split / cls
            d.mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{cls}_{k}.png")
    return root


def test_edited_or_added_image_rebuilds_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FORCE", raising=False)
    root = _image_folder(tmp_path / "d")
    first = data.cifar10("test", root, download=False)
    img = root / "cifar10" / "test" / "cat" / "cat_0.png"
    arr = np.asarray(Image.open(img)).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(img)
    os.utime(img, ns=(time.time_ns(), time.time_ns() + 10**9))  # a later mtime, whatever the clock's grain
    edited = data.cifar10("test", root, download=False)
    assert edited.digest != first.digest
    assert torch.equal(edited.images[3].permute(1, 2, 0), torch.from_numpy(arr))
    Image.fromarray(arr).save(img.with_name("cat_1.png"))
    assert len(data.cifar10("test", root, download=False)) == 11
    # every field of the cache is inside its hash: an edited digest is not believed
    meta = max((tmp_path / "cache").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    m = json.loads(meta.read_text())
    m["digest"] = "0" * 64
    meta.write_text(json.dumps(m))
    assert data.cifar10("test", root, download=False).digest != "0" * 64
    # FORCE=1 decodes again (once per process)
    calls = []
    real = data._decode_imagefolder
    monkeypatch.setattr(data, "_decode_imagefolder", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("FORCE", "1")
    data.cifar10("train", root, download=False)
    data.cifar10("train", root, download=False)
    assert len(calls) == 1


# ---------------------------------------------------------------------- 4. one writer per run

_HOLDER = """
import sys, time
from pathlib import Path
from hawqlib import pipeline
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

        with pytest.raises(storage.FolderBusyError, match=f"being written by process {holder.pid}"):
            pipeline._cached("race", {"run": 1}, never, None, None, None)
        release.touch()
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    value, folder = pipeline._cached("race", {"run": 1}, never, None, lambda f: int((f / "value.json").read_text()),
                                     None)
    assert value == 41 and runs.verify(folder)["files"].keys() == {"value.json"}


def test_orphan_temp_files_are_removed_by_the_next_writer(artifacts):
    net, batch = _tiny()
    _, folder = _spectrum(net, batch)
    stray = folder / ".vectors.pt.abc123.tmp"
    stray.write_bytes(b"half")
    (folder / "manifest.json").unlink()  # the run was interrupted: it is recomputed, and the stray goes
    _spectrum(net, batch)
    assert not stray.exists() and runs.verify(folder)


# ---------------------------------------------------------------------- 5. crafted packed files

@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    net, batch = _tiny()
    q = quantize_model(net, BitConfig.uniform(net, 4))
    q.train()(batch[0])
    q.eval()
    path = tmp_path_factory.mktemp("packed") / "tiny.hawq"
    export.save_packed(q, path)
    return net, q, path


def _rewrite(path: Path, out: Path, edit=None, *, header_bytes: bytes | None = None, payload=None) -> Path:
    raw = path.read_bytes()
    hlen = struct.unpack("<I", raw[12:16])[0]
    header, body = json.loads(zlib.decompress(raw[16:16 + hlen])), raw[16 + hlen:]
    if edit is not None:
        body = edit(header, body) or body
    hb = header_bytes if header_bytes is not None else zlib.compress(json.dumps(header).encode())
    out.write_bytes(raw[:12] + struct.pack("<I", len(hb)) + hb + (payload if payload is not None else body))
    return out


def _drop(kind):
    def edit(header, body):
        off = 0
        for i, (k, n, shape, bits) in enumerate(header["entries"]):
            size = export._entry_size(k, shape, bits)
            if k == kind:
                del header["entries"][i]
                return body[:off] + body[off + size:]
            off += size
    return edit


def test_crafted_packed_files_are_refused_with_the_field_named(packed, tmp_path):
    net, q, path = packed
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(export.load_packed(path, net)(x), q(x))
    cases = [
        (_rewrite(path, tmp_path / "noconv", _drop("q")), r"missing records \['q 0'\]"),
        (_rewrite(path, tmp_path / "nobn", _drop("bn")), r"missing records \['bn 1'\]"),
        (_rewrite(path, tmp_path / "empty", lambda h, b: h.update(entries=[]) or b"", payload=b""),
         "field 'entries'"),
        (_rewrite(path, tmp_path / "shape", lambda h, b: h["entries"][0].__setitem__(2, "big")),
         r"field 'entries\[0\]'"),
        (_rewrite(path, tmp_path / "bits", lambda h, b: h["entries"][0].__setitem__(3, 99)),
         r"field 'entries\[0\]'"),
        (_rewrite(path, tmp_path / "nohdr", header_bytes=zlib.compress(b"[1, 2]")), "not a JSON object"),
        (_rewrite(path, tmp_path / "fmt", lambda h, b: h.update(format="other")), "field 'format'"),
        (_rewrite(path, tmp_path / "cfg", lambda h, b: h.update(bit_config={"weights": 3})), "field 'bit_config'"),
        (_rewrite(path, tmp_path / "bomb", header_bytes=zlib.compress(b" " * (64 << 20), 9)), "expands beyond"),
    ]
    # a NaN scale in the first quantized record (its scales follow the packed codes)
    header = export.read_header(path)
    k, n, shape, bits = header["entries"][0]
    nb = -(-int(np.prod(shape)) * bits // 8)

    def nan_scale(h, body):
        return body[:nb] + struct.pack("<f", float("nan")) + body[nb + 4:]
    cases.append((_rewrite(path, tmp_path / "nan", nan_scale), "non-finite"))
    raw = path.read_bytes()
    (tmp_path / "hlen").write_bytes(raw[:12] + struct.pack("<I", 1 << 31) + raw[16:])
    cases.append((tmp_path / "hlen", "header length"))
    (tmp_path / "short").write_bytes(raw[:11])
    cases.append((tmp_path / "short", "preamble"))
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            export.load_packed(bad, net)
    assert path.read_bytes() == raw


def test_new_packed_files_record_their_architecture(tmp_path):
    from hawqlib.models import resnet20

    m = resnet20()
    assert export.arch_of(m) == "resnet20" and export.arch_of(_tiny()[0]) is None
    q = quantize_model(m, BitConfig.uniform(m, 4))
    export.save_packed(q, tmp_path / "r20.hawq", arch=export.arch_of(m))
    assert export.read_header(tmp_path / "r20.hawq")["arch"] == "resnet20"
    assert isinstance(export.load_packed(tmp_path / "r20.hawq"), nn.Module)


# ---------------------------------------------------------------------- 6. stray files and clear errors

def test_stray_files_are_skipped_and_bad_images_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "cache"))
    root = _image_folder(tmp_path / "d")
    clean = data.cifar10("train", root, download=False).digest
    cat = root / "cifar10" / "train" / "cat"
    (cat / ".DS_Store").write_bytes(b"\0\1junk")
    (cat / "thumbs").mkdir()
    assert data.cifar10("train", root, download=False).digest == clean
    (cat / "cat_9.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a corrupt image
    with pytest.raises(data.DataIntegrityError, match=r"cat_9\.png is not a readable image"):
        data.cifar10("train", root, download=False)
    (cat / "cat_9.png").unlink()
    for p in (root / "cifar10" / "train" / "dog").iterdir():
        p.unlink()
    with pytest.raises(data.DataNotFoundError, match=r"train/dog holds no images"):
        data.cifar10("train", root, download=False)


def test_hawq_data_that_is_empty_or_a_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HAWQ_DATA", "")
    with pytest.raises(data.DataNotFoundError, match="HAWQ_DATA is set but empty"):
        data.find_cifar10(download=False)
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("HAWQ_DATA", str(tmp_path / "f"))
    with pytest.raises(data.DataNotFoundError, match="HAWQ_DATA; it is a file"):
        data.find_cifar10(download=False)


def test_command_line_user_errors_are_one_line(tmp_path):
    r = _cli("train", "--threads", "99999")
    assert r.returncode == 2 and "0.." in r.stderr and "Traceback" not in r.stderr
    r = _cli("finetune", "--data", str(tmp_path), env={**ENV, "HAWQ_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"No CIFAR-10 at {tmp_path}" in r.stderr


# ---------------------------------------------------------------------- nothing committed changed

def test_every_committed_artifact_verifies():
    root = ROOT / "data" / "artifacts"
    folders = [f for f in sorted(root.iterdir()) if f.is_dir()] if root.is_dir() else []
    if not folders:
        pytest.skip("no committed artifacts in this checkout")
    for f in folders:
        m = runs.verify(f)
        assert f.name.endswith(m["key"]) and m["files"]
    for f in root.glob("finetune-*"):
        packed_file = f / "model.hawq"
        assert runs.read_manifest(f)["packed_bytes"] == packed_file.stat().st_size
