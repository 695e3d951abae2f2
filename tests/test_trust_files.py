"""Issue 17, input files: crafted data folders and packed models are refused with a clear error.

A batch pickle that would run code, an edited or added image, stray and corrupt files in class
folders, a bad ``HAWQ_DATA``, crafted packed files (missing records, NaN scales, zlib bombs,
malformed fields); new packed files record their architecture.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _trust_helpers import ENV, cli, image_folder, tiny
from PIL import Image
from torch import nn

from hawqlib.repro import batches, data
from hawqlib import export, packfile
from hawqlib.quant import BitConfig, quantize_model


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
    r = cli("train", "--data", str(tmp_path / "d"), env={**ENV, "HAWQ_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1 and "Traceback" not in r.stderr and "MD5" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_restricted_unpickler_admits_only_the_format(tmp_path):
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


# ---------------------------------------------------------------------- 3. the decode cache follows its source

def test_edited_or_added_image_rebuilds_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FORCE", raising=False)
    root = image_folder(tmp_path / "d")
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


# ---------------------------------------------------------------------- 5. crafted packed files

@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    net, batch = tiny()
    q = quantize_model(net, BitConfig.uniform(net, 4))
    q.train()(batch[0])
    q.eval()
    path = tmp_path_factory.mktemp("packed") / "tiny.hawq"
    export.save_packed(q, path)
    return net, q, path


def _rewrite(path: Path, out: Path, edit=None, *, header_bytes: bytes | None = None, payload=None) -> Path:
    """A crafted file whose digests are recomputed after the edit (as a forger would), so that the field
    checks behind them are what refuses it."""
    raw = path.read_bytes()
    hlen = struct.unpack("<I", raw[12:16])[0]
    header, body = json.loads(zlib.decompress(raw[48:48 + hlen])), raw[48 + hlen:]
    if edit is not None:
        body = edit(header, body) or body
    body = payload if payload is not None else body
    off, digests = 0, []
    for k, n, shape, bits in (header["entries"] if isinstance(header.get("entries"), list) else []):
        try:
            size = packfile.entry_size(k, shape, bits)
        except TypeError:
            size = 0
        digests.append(hashlib.sha256(body[off:off + size]).hexdigest())
        off += size
    header["sha256"] = digests
    hb = header_bytes if header_bytes is not None else zlib.compress(json.dumps(header).encode())
    out.write_bytes(raw[:12] + struct.pack("<I", len(hb)) + hashlib.sha256(hb).digest() + hb + body)
    return out


def _drop(kind):
    def edit(header, body):
        off = 0
        for i, (k, n, shape, bits) in enumerate(header["entries"]):
            size = packfile.entry_size(k, shape, bits)
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
    assert export.arch_of(m) == "resnet20" and export.arch_of(tiny()[0]) is None
    q = quantize_model(m, BitConfig.uniform(m, 4))
    export.save_packed(q, tmp_path / "r20.hawq", arch=export.arch_of(m))
    assert export.read_header(tmp_path / "r20.hawq")["arch"] == "resnet20"
    assert isinstance(export.load_packed(tmp_path / "r20.hawq"), nn.Module)


# ---------------------------------------------------------------------- 6. stray files and clear errors

def test_stray_files_are_skipped_and_bad_images_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "cache"))
    root = image_folder(tmp_path / "d")
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
