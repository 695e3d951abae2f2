"""Issue 37: every file trusted only once verified, not only artifact folders.

Each test is the attack or the fault: a shipped packed file with a flipped or forged number, an edited resume
state, a checkpoint stripped of its digest or carrying garbage under a valid one, an image edited with its size
and time stamp kept, a stray class folder or a grayscale image, a store variable naming a file, a pickle where
weights belong; each asserts one clear error and that nothing stored changed.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _trust_helpers import ENV, ROOT, cli, image_folder, tiny
from PIL import Image

from hawqlib import export, packfile
from hawqlib.blocks import quant_blocks
from hawqlib.files import atomic_write_bytes, load_weights_only
from hawqlib.finetune import _read_cached, staged_finetune
from hawqlib.quant import BitConfig, quantize_model
from hawqlib.repro import data, paths
from hawqlib.train import CheckpointError, TrainConfig, _save_checkpoint, load_checkpoint, train

# ---------------------------------------------------------------------- 1. a shipped packed file verifies itself


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    net, batch = tiny()
    q = quantize_model(net, BitConfig.uniform(net, 4, act_bits=4))
    q.train()(batch[0])
    q.eval()
    path = tmp_path_factory.mktemp("ship") / "model.hawq"
    export.save_packed(q, path)
    return net, q, path


def _records(path: Path):
    """``(index, kind, name, offset)`` of each record in the payload, and the payload's start."""
    raw = path.read_bytes()
    hlen = struct.unpack("<I", raw[12:16])[0]
    header = json.loads(zlib.decompress(raw[48:48 + hlen]))
    off, out = 48 + hlen, []
    for i, (k, n, shape, bits) in enumerate(header["entries"]):
        out.append((i, k, n, off, shape, bits))
        off += packfile.entry_size(k, shape, bits)
    return out


def test_every_corruption_of_a_shipped_packed_file_is_refused_naming_the_record(shipped, tmp_path):
    net, q, path = shipped
    raw = path.read_bytes()
    recs = _records(path)
    qi, _, qname, qoff, qshape, qbits = next(r for r in recs if r[1] == "q")
    nb = -(-int(np.prod(qshape)) * qbits // 8)
    ai, _, aname, aoff, _, _ = next(r for r in recs if r[1] == "act")

    def edited(name, fn):
        b = bytearray(raw)
        fn(b)
        (tmp_path / name).write_bytes(bytes(b))
        return tmp_path / name

    def flip(off, mask=1):
        return lambda b: b.__setitem__(off, b[off] ^ mask)

    def put(off, fmt, value):
        return lambda b: b.__setitem__(slice(off, off + struct.calcsize(fmt)), struct.pack(fmt, value))

    def invert(b):
        b[qoff:qoff + nb] = bytes(255 - v for v in b[qoff:qoff + nb])

    cases = [  # the five silent corruptions, then the header and the file's end
        (edited("code_bit", flip(qoff)), f"record {qi} \\(q '{qname}'\\)"),
        (edited("scale_exponent", flip(qoff + nb + 3, 0x40)), f"record {qi} \\(q '{qname}'\\)"),
        (edited("codes_inverted", invert), f"record {qi} \\(q '{qname}'\\)"),
        (edited("scale_3e38", put(qoff + nb, "<f", 3e38)), f"record {qi} \\(q '{qname}'\\)"),
        (edited("zero_point", put(aoff + 4, "<i", 2 ** 31 - 1)), f"record {ai} \\(act '{aname}'\\)"),
        (edited("header_bit", flip(60)), "header does not match"),
        (edited("preamble_digest", flip(20)), "header does not match"),
    ]
    (tmp_path / "cut").write_bytes(raw[:-3])
    (tmp_path / "longer").write_bytes(raw + b"\0")
    cases += [(tmp_path / "cut", "truncated at record"), (tmp_path / "longer", "trailing bytes")]
    built = []
    for bad, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            export.load_packed(bad, lambda: built.append(1) or net)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert not built, "a model was built from an unverified file"
    assert path.read_bytes() == raw
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(export.load_packed(path, net)(x), q(x))


def _as_legacy(path: Path, out: Path) -> Path:
    """The same model in the previous format (hawqlib.packed/2: version 1, no digests)."""
    raw = path.read_bytes()
    hlen = struct.unpack("<I", raw[12:16])[0]
    header = json.loads(zlib.decompress(raw[48:48 + hlen]))
    header.pop("sha256")
    header["format"] = packfile.LEGACY_FORMAT
    hb = zlib.compress(json.dumps(header).encode())
    out.write_bytes(packfile.MAGIC + struct.pack("<II", 1, len(hb)) + hb + raw[48 + hlen:])
    return out


def test_a_file_of_the_previous_format_loads_with_a_warning_that_it_cannot_be_verified(shipped, tmp_path):
    net, q, path = shipped
    old = _as_legacy(path, tmp_path / "old.hawq")
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(export.UnverifiedPackedWarning, match="cannot be verified"):
        assert torch.equal(export.load_packed(old, net)(x), q(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file of the current format verifies: no warning
        export.load_packed(path, net)


def test_committed_packed_files_still_load():
    from hawqlib.models import get

    path = next(iter(sorted((ROOT / "data" / "artifacts").glob("finetune-*/model.hawq"))), None)
    if path is None:
        pytest.skip("no committed packed file in this checkout")
    raw = path.read_bytes()
    with pytest.warns(export.UnverifiedPackedWarning):
        restored = export.load_packed(path, lambda: get("resnet20"))
    assert isinstance(restored, torch.nn.Module) and path.read_bytes() == raw


# ---------------------------------------------------------------------- 2. resume state: digested, never taken on trust

def _finetuned(root: Path):
    net, batch = tiny()
    cfg = BitConfig.uniform(net, 4)
    order = [b.name for b in quant_blocks(net, cfg.granularity)]
    staged_finetune(net, cfg, order, [batch], [batch], stages=2, epochs_per_stage=1, lr=0.01, checkpoint_dir=root,
                    progress=False, calibration_batches=0)
    return net, cfg, order, batch


def _resume(root, net, cfg, order, batch):
    return staged_finetune(net, cfg, order, [batch], [batch], stages=2, epochs_per_stage=1, lr=0.01,
                           checkpoint_dir=root, progress=False, calibration_batches=0)


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_edited_resume_state_is_refused_saying_how_to_start_over(tmp_path):
    root = tmp_path / "run"
    net, cfg, order, batch = _finetuned(root)
    hist = json.loads((root / "history.json").read_text())
    assert len(hist["sha256"]) == 64
    for name, edit in [("before", lambda h: h["stages"][0]["before"].update(val_top1=77.7)),
                       ("string", lambda h: h["stages"][0].update(before="77.7")),
                       ("stages", lambda h: h.update(stages=[1, 2])),
                       # stripped of its digest, it is checked against the checkpoints (its epochs, not its
                       # "before" points: the legacy path, for files written before histories had digests)
                       ("no digest", lambda h: h["stages"][0]["epochs"][0].update(val_top1=77.7) or h.pop("sha256"))]:
        h = json.loads(json.dumps(hist))
        edit(h)
        (root / "history.json").write_text(json.dumps(h))
        before = _snapshot(root)
        with pytest.raises(CheckpointError, match=f"delete {root} to start the run over") as err, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _resume(root, net, cfg, order, batch)
        assert "\n" not in str(err.value), name
        assert _snapshot(root) == before, name


def test_a_checkpoint_without_its_digest_is_refused(tmp_path):
    root = tmp_path / "run"
    net, cfg, order, batch = _finetuned(root)
    model_pt = root / "stage_1" / "model.pt"
    ckpt = torch.load(model_pt, weights_only=True)
    del ckpt["sha256"]
    torch.save(ckpt, model_pt)
    before = _snapshot(root)
    with pytest.raises(CheckpointError, match="records no SHA-256.*Delete it"):
        _resume(root, net, cfg, order, batch)
    assert _snapshot(root) == before


@pytest.mark.parametrize("run", ["finetune-8f80f523c4c9", "finetune-4244427c9192"])
def test_the_committed_runs_still_resume(run, tmp_path):
    """A committed resume state reads back: with the digest its history.json records (the runs rewrite it at each
    stage), and in the form written before histories had digests (that digest removed), which is accepted because
    every stage it records is its verified checkpoint. Either form with a stage's epochs edited is refused."""
    src = ROOT / "data" / "artifacts" / run / "run"
    if not (src / "history.json").is_file():
        pytest.skip(f"{src} is not in this checkout (the run completed and its run/ folder was removed)")
    root = tmp_path / "run"
    shutil.copytree(src, root)
    hist_path = root / "history.json"
    hist = json.loads(hist_path.read_text())
    digest = hist.pop("sha256", None)
    for ckpt in root.rglob("*.pt"):
        assert "sha256" in load_checkpoint(ckpt)
    stages = sorted(s["stage"] for s in hist["stages"])
    if digest is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert sorted(_read_cached(hist_path, hist["plan"])) == stages
    hist_path.write_text(json.dumps(hist))  # the pre-digest form of the same record
    with pytest.warns(UserWarning, match="written before fine-tuning histories recorded a SHA-256"):
        assert sorted(_read_cached(hist_path, hist["plan"])) == stages
    done = next(s for s in hist["stages"] if s["epochs"])
    done["epochs"][0]["train_loss"] = 0.0
    hist_path.write_text(json.dumps(hist))
    with pytest.raises(CheckpointError, match=f"stage {done['stage']} does not match"):
        _read_cached(hist_path, hist["plan"])
    if digest is not None:
        hist_path.write_text(json.dumps({**hist, "sha256": digest}))
        with pytest.raises(CheckpointError, match="does not match the SHA-256 it records"):
            _read_cached(hist_path, hist["plan"])


@pytest.mark.parametrize("field,garbage,match", [
    ("optimizer", {"foo": 1}, "field 'optimizer'"),
    ("optimizer", "momentum", "field 'optimizer'"),
    ("rng_state", torch.zeros(3), "field 'rng_state'"),
])
def test_garbage_under_a_valid_digest_is_refused_in_one_line(tmp_path, field, garbage, match):
    net, batch = tiny()
    cfg = TrainConfig(epochs=2, lr=0.01)
    train(net, [batch], config=TrainConfig(epochs=2, lr=0.01), checkpoint_dir=tmp_path, progress=False,
          callback=lambda rec: True)  # stop after epoch 1: an interrupted run
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt.pop("sha256")
    ckpt[field] = garbage
    _save_checkpoint(tmp_path / "checkpoint.pt", ckpt)  # a valid digest of garbage
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=match) as err:
        train(tiny()[0], [batch], config=cfg, checkpoint_dir=tmp_path, progress=False)
    assert "Delete the checkpoint" in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------------- 3. the decode cache follows the bytes

def test_an_edit_that_keeps_size_and_mtime_rebuilds_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FORCE", raising=False)
    root = image_folder(tmp_path / "d", compress_level=0)
    first = data.cifar10("test", root, download=False)
    img = root / "cifar10" / "test" / "cat" / "cat_0.png"
    st = img.stat()
    arr = np.asarray(Image.open(img)).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(img, compress_level=0)  # stored, not compressed: the same size
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same time stamp, as `cp -p` leaves it
    assert (img.stat().st_size, img.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    monkeypatch.setattr(data, "_CONTENT", {})  # a new process
    edited = data.cifar10("test", root, download=False)
    assert edited.digest != first.digest
    assert torch.equal(edited.images[3].permute(1, 2, 0), torch.from_numpy(arr))


def test_a_stray_class_folder_or_a_grayscale_image_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "cache"))
    root = image_folder(tmp_path / "d", compress_level=0)
    stray = root / "cifar10" / "test" / "unicorn"
    stray.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(stray / "u.png")
    with pytest.raises(data.DataIntegrityError, match=r"not CIFAR-10 classes: \['unicorn'\]"):
        data.cifar10("test", root, download=False)
    shutil.rmtree(stray)
    gray = root / "cifar10" / "test" / "dog" / "dog_0.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(gray)
    with pytest.raises(data.DataIntegrityError, match="dog_0.png is a 'L' image"):
        data.cifar10("test", root, download=False)
    assert not list((tmp_path / "cache").glob("cifar10-test-*.u8"))


# ---------------------------------------------------------------------- 4. files a user receives

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == mode


# ---------------------------------------------------------------------- 5. one line for every user error

def test_a_store_variable_naming_a_file_is_one_line(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for var, fn in (("HAWQ_ARTIFACTS", paths.artifacts_root), ("HAWQ_CACHE", paths.cache_dir)):
        monkeypatch.setenv(var, str(afile / "sub"))
        with pytest.raises(ValueError, match=f"{var}=.* names a path through the file {afile}"):
            fn()
        monkeypatch.delenv(var)
    r = cli("seal", "--all", env={**ENV, "HAWQ_ARTIFACTS": str(afile)})
    assert r.returncode == 1 and r.stderr.startswith("error: HAWQ_ARTIFACTS=") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and afile.read_text() == "x"


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_where_weights_belong_is_one_line_without_torchs_advice(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "qmodel.pt"
    torch.save({"w": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="is not a weights-only torch file .*GLOBAL") as err:
        load_weights_only(evil)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    r = cli("quantize", "hawqlib.models:resnet20", "--weights", str(evil), "--data",
            "hawqlib.repro.data:cifar10_loaders", "--target-compression", "8", "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "weights_only" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_pickle_in_an_artifact_under_a_forged_manifest_is_one_line_and_runs_nothing(tmp_path, monkeypatch):
    from hawqlib.repro import pipeline
    from hawqlib.repro.artifacts import manifest

    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FORCE", raising=False)
    net, batch = tiny()
    cfg = {"method": "autograd", "solver": "lanczos", "tol": 1e-6, "max_iter": 50, "seed": 0}
    _, folder = pipeline.spectrum(net, "tiny", cfg, "layer", data=batch, data_key="tiny", vectors=True)
    marker = tmp_path / "pwned"
    torch.save({"w": _Payload(marker)}, folder / "vectors.pt")
    m = manifest.read_manifest(folder)  # the manifest re-sealed over the pickle, as a forger would
    m["files"] = manifest._file_records(folder, manifest.result_files(folder))
    manifest._write_sealed(folder, m)
    before = _snapshot(folder)
    with pytest.raises(ValueError, match=r"vectors\.pt is not a weights-only torch file") as err:
        pipeline.spectrum(net, "tiny", cfg, "layer", data=batch, data_key="tiny", vectors=True)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists() and _snapshot(folder) == before
