"""Versions that follow results: each code version in an artifact key, and a small fixed case of what it versions.

A stored result is keyed by the code versions of what computed it (:mod:`hawqlib.repro.artifacts`). A version
is bumped by hand when the computation changes; nothing else invalidates a stored result, so a refactor that
computes the same numbers lands without recomputing hours of artifacts. What keeps that honest is this file:
for every version constant, one case recomputes a small fixed example of what it versions (seeded tensors,
tiny models, synthetic data: seconds in all) and ``result_records.json`` records, beside the constant's value,
the numbers that case gave. ``test_code_versions.py`` recomputes every case and compares:

- the numbers changed and the version did not: the computation changed under an unchanged version, so a stored
  result could be loaded for code that would compute something else. Bump the constant (its artifacts are then
  recomputed), or undo the change if it was not meant to change results;
- the version changed: re-record with ``.venv/bin/python tests/result_cases.py`` (it re-records only the
  constants whose value changed; ``--all`` re-records every one, for a deliberate change of a case itself).

Numbers are compared with a relative tolerance of :data:`RTOL` (a different CPU may round differently; a changed
computation moves them far more), integers and strings exactly. Each case covers the modules of its version:
a case that does not exercise a changed function cannot catch it, so a new computation gets a new entry here.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).with_name("result_records.json")
RTOL = 1e-6


def _stats(t: torch.Tensor) -> list[float]:
    t = t.detach().double().flatten()
    return [float(t.sum()), float(t.abs().sum()), float((t * t).sum())]


def _model_stats(model: nn.Module) -> dict:
    return {k: _stats(v) for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}


def _tiny_cnn(seed: int = 0, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def _images(n: int = 64, seed: int = 1, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, classes, (n,),
                                                                                               generator=g)


def _loaders(batch_size: int = 16):
    from hawqlib.repro.data import TensorLoader

    x, y = _images()
    return (TensorLoader(x, y, batch_size, shuffle=True, augment=True, seed=3, channels_last=False),
            TensorLoader(x[:32], y[:32], 32, channels_last=False))


# ----------------------------------------------------------------------------------------------- the cases

def train_case() -> dict:
    """The FP32 baseline: model initialisation, CIFAR-10 augmentation and normalization, the SGD loop."""
    from hawqlib.models import resnet20
    from hawqlib.repro.baseline import initial_model
    from hawqlib.repro.data import augment_cifar, normalize
    from hawqlib.train import train

    x, _ = _images(8)
    aug = augment_cifar(x, torch.Generator().manual_seed(5))
    init = initial_model("resnet20", 0)
    net = _tiny_cnn(0)
    tr, te = _loaders()
    log = train(net, tr, te, epochs=2, lr=0.05, progress=False, channels_last=False, eval_every=1)
    torch.manual_seed(0)
    return {"augment": _stats(aug.float()), "normalize": _stats(normalize(x)),
            "resnet20_init": _stats(torch.cat([p.flatten() for p in init.parameters()])),
            "resnet20_params": sum(p.numel() for p in resnet20().parameters()),
            "losses": [e["train_loss"] for e in log["epochs"]], "val": [e.get("val_top1") for e in log["epochs"]],
            "weights": _model_stats(net)}


def hessian_case() -> dict:
    """The Hessian steps: both routes' top eigenvalues and traces, the loss along a direction, a seeded sample."""
    from hawqlib import hessian
    from hawqlib.blocks import quant_blocks
    from hawqlib.repro.data import CIFAR10Split, sample_batch
    from hawqlib.surface import loss_surface

    net = _tiny_cnn(2).eval()
    x, y = _images(48, seed=4)
    batch = ((x.float() - 128) / 64, y)
    loss = nn.CrossEntropyLoss()
    out = {}
    for method in ("gauss-newton", "autograd"):
        spec = hessian.top_eigenvalues(net, loss, batch, "layer", method=method, tol=1e-5, max_iter=200, seed=0,
                                       progress=False)
        out[f"lambda_{method}"] = [s.eigenvalue for s in spec]
    out["power"] = [s.eigenvalue for s in hessian.top_eigenvalues(net, loss, batch, "layer", method="autograd",
                                                                   solver="power", tol=1e-6, max_iter=300, seed=0,
                                                                   progress=False)]
    out["trace"] = [t.trace for t in hessian.traces(net, loss, batch, "layer", seed=0, progress=False)]
    block = quant_blocks(net, "layer")[1]
    d = [torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) for p in block.params]
    out["surface"] = loss_surface(net, block, [d], torch.linspace(-1, 1, 5).view(-1, 1), batch).tolist()
    split = CIFAR10Split(*_images(40, seed=9), "fixed")
    sx, sy = sample_batch(split, 10, seed=3)
    out["sample"] = _stats(sx) + [int(v) for v in sy]
    return out


def quant_case() -> dict:
    """The quantizers: the weight grid at every width, the activation quantizer, a swapped and calibrated model."""
    from hawqlib.bitconfig import BitConfig
    from hawqlib.quant import calibrate_activations, quantize_model, quantize_tensor

    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(11))
    out = {f"w{b}": _stats(quantize_tensor(w, b)) for b in (2, 3, 4, 8)}
    net = _tiny_cnn(3).eval()
    tr, te = _loaders()
    q = quantize_model(net, BitConfig.uniform(net, 3, act_bits=4))
    tr.set_epoch(0)
    calibrate_activations(q, tr, num_batches=2, calibration="moving_average")
    xb, _ = next(iter(te))
    out["calibrated"] = _model_stats(q)
    out["output"] = _stats(q.eval()(xb))
    return out


def finetune_case() -> dict:
    """Staged fine-tuning (section 3.2), a learned activation step and distillation, the direct baseline, sizes."""
    from hawqlib import size
    from hawqlib.bitconfig import BitConfig
    from hawqlib.finetune import direct_finetune, staged_finetune

    net = _tiny_cnn(4).eval()
    bc = BitConfig({"0": 2, "3": 4, "7": 8}, act_bits=4)
    tr, te = _loaders()
    out = {"size_bytes": size.model_size_bytes(net, bc), "weight_compression": size.weight_compression(net, bc)}
    runs = {"staged": dict(), "learned_kd": dict(act_step="learned", final_epochs=1,
                                                 distill={"alpha": 0.5, "temperature": 2.0})}
    for name, extra in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            q, hist = staged_finetune(net, bc, ["7", "0", "3"], tr, te, stages=2, epochs_per_stage=1, lr=0.02,
                                      checkpoint_dir=tmp, progress=False, seed=1, calibration_batches=2,
                                      calibration="moving_average", **extra)
        out[name] = {"weights": _model_stats(q), "val": [e.get("val_top1") for e in hist["epochs"]],
                     "loss": [e["train_loss"] for e in hist["epochs"]]}
    with tempfile.TemporaryDirectory() as tmp:
        q, hist = direct_finetune(net, bc, tr, te, epochs=1, lr=0.02, checkpoint_dir=tmp, progress=False, seed=1,
                                  calibration_batches=2, calibration="moving_average")
    out["direct"] = {"weights": _model_stats(q), "loss": [e["train_loss"] for e in hist["epochs"]]}
    return out


def export_case() -> dict:
    """The packed file: its size, the integer codes it holds, and the model it restores.

    ``CODE_VERSION`` versions what a packed file decodes to (the codes, the scales, the restored model), which
    is what a stored result's key is about. The size also follows the file's layout, versioned apart by
    ``PACKED_FORMAT``, which every file names and :func:`hawqlib.export.load_packed` checks (older formats
    are still read), so a new layout re-records this case (``--all``) without bumping ``CODE_VERSION``, as
    ``hawqlib.packed/3`` did when it added digests (666 to 1,069 bytes, the codes and outputs unchanged)."""
    from hawqlib.bitconfig import BitConfig
    from hawqlib.export import load_packed, save_packed
    from hawqlib.quant import calibrate_activations, quantize_model

    net = _tiny_cnn(5).eval()
    tr, te = _loaders()
    q = quantize_model(net, BitConfig({"0": 2, "3": 3, "7": 4}, act_bits=4))
    tr.set_epoch(0)
    calibrate_activations(q, tr, num_batches=2, calibration="moving_average")
    q.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.hawq"
        nbytes = save_packed(q, path)
        restored = load_packed(path, net)
    xb, _ = next(iter(te))
    codes = hashlib.sha256()
    for _, m in restored.named_modules():
        if hasattr(m, "int_weight"):
            codes.update(m.int_weight()[0].to(torch.int64).numpy().tobytes())
    return {"bytes": nbytes, "codes": codes.hexdigest(), "output": _stats(restored(xb)),
            "same_as_fake_quant": bool(torch.equal(restored(xb), q(xb)))}


def front_door_case() -> dict:
    """The front door without fine-tuning: spectra, the allocation under a budget, the Omega order, calibration."""
    import hawqlib

    net = _tiny_cnn(6)
    x, y = _images(64, seed=12)
    data = [((x[i:i + 16].float() - 128) / 64, y[i:i + 16]) for i in range(0, 64, 16)]
    q, rep = hawqlib.quantize(net, data, target_compression=10, finetune=False, val_data=data, progress=False,
                              calibration="moving_average")
    return {"bits": rep.bit_config.to_dict(), "order": [e.name for e in rep.order],
            "omega": [e.omega for e in rep.order], "lambda": [s.eigenvalue for s in rep.spectra],
            "val_top1": rep.val_top1, "output": _stats(q(data[0][0]))}


#: Every version constant in an artifact key ("module.NAME"), and the case that recomputes what it versions.
CASES = {
    "hawqlib.repro.baseline.TRAIN_CODE_VERSION": train_case,
    "hawqlib.repro.pipeline.HESSIAN_STEP_VERSION": hessian_case,
    "hawqlib.quant.CODE_VERSION": quant_case,
    "hawqlib.repro.pipeline.FINETUNE_STEP_VERSION": finetune_case,
    "hawqlib.finetune.FINETUNE_FORMAT": finetune_case,
    "hawqlib.export.CODE_VERSION": export_case,
    "hawqlib.repro.cached_quantize.STEP_VERSION": front_door_case,
}


def value(constant: str):
    module, _, name = constant.rpartition(".")
    return getattr(importlib.import_module(module), name)


def compute(constant: str) -> dict:
    """The case of ``constant``, computed now (seeded, one thread, so it is the same in every process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        return json.loads(json.dumps(CASES[constant]()))  # as the record stores it
    finally:
        torch.set_num_threads(threads)


def differences(recorded, now, where: str = "") -> list[str]:
    """Where ``now`` differs from ``recorded`` beyond :data:`RTOL` (numbers) or at all (anything else)."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        out = [f"{where}.{k}: only in {'the record' if k in recorded else 'the code'}"
               for k in sorted(set(recorded) ^ set(now))]
        for k in sorted(set(recorded) & set(now)):
            out += differences(recorded[k], now[k], f"{where}.{k}")
        return out
    if isinstance(recorded, list) and isinstance(now, list):
        if len(recorded) != len(now):
            return [f"{where}: {len(recorded)} values recorded, {len(now)} now"]
        return [d for i, (a, b) in enumerate(zip(recorded, now)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(recorded, float) or isinstance(now, float):
        if isinstance(recorded, (int, float)) and isinstance(now, (int, float)) and not isinstance(recorded, bool) \
                and math.isclose(recorded, now, rel_tol=RTOL, abs_tol=RTOL * 1e-3):
            return []
        return [f"{where}: recorded {recorded!r}, now {now!r}"]
    return [] if recorded == now else [f"{where}: recorded {recorded!r}, now {now!r}"]


def main(argv: list[str]) -> int:
    """Re-record the cases whose constant's value changed (``--all``: every case)."""
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    redo = [c for c in CASES if "--all" in argv or c not in record or record[c]["value"] != value(c)]
    for c in redo:
        record[c] = {"value": value(c), "outputs": compute(c)}
        print(f"recorded {c} = {record[c]['value']!r}")
    for c in sorted(set(record) - set(CASES)):
        del record[c]
        print(f"dropped {c} (no longer versioned)")
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    if not redo:
        print("every recorded value is current; nothing re-recorded (--all re-records every case)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
