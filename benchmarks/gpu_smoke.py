"""An ImageNet-shaped smoke of the method on one device: ResNet50 on a generated ImageFolder, end to end.

Baseline from seeded weights (``torch.manual_seed(0)``, no training), the Hessian spectrum, the allocation and
order, one fine-tuning stage (:func:`hawqlib.quantize` on the device), the packed export, the reload
(:func:`hawqlib.export.load_packed`), and a check that the reloaded model's top-1 equals the quantized model's.
Reads no network and installs nothing: the images are generated (seeded noise, one colour bias per class) and
written as PNG files under a temporary folder, read back by torchvision's ``ImageFolder``.

    python benchmarks/gpu_smoke.py [--size full|tiny] [--device cuda|cpu] [--threads N]

``full``: 224 px, 8 classes x 16 images, batch 16, the Hessian on 16 images; ``tiny`` (for a CPU): 32 px,
4 classes x 4 images, batch 8, 8 images, 3 eigensolver iterations, a one-sample check of the Hessian route, and
on a CPU one intra-op thread (our choice: at 32 px an operation is too small to gain from a second thread, and
on a shared machine every parallel operation waits for the thread that has no core; ``--threads`` overrides
it). Prints each step's seconds and exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {"full": dict(px=224, classes=8, per_class=16, batch=16, hessian_iter=20),
         "tiny": dict(px=32, classes=4, per_class=4, batch=8, hessian_iter=3, check_samples=1, cpu_threads=1)}


def make_folder(root: Path, px: int, classes: int, per_class: int) -> None:
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True)
        bias = torch.rand(3, 1, 1, generator=g) * 128
        for i in range(per_class):
            img = (torch.rand(3, px, px, generator=g) * 127 + bias).clamp(0, 255).to(torch.uint8)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:03d}.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads on a CPU (default: 1 for tiny, torch's own otherwise)")
    args = ap.parse_args()
    cfg = SIZES[args.size]
    threads = args.threads if args.threads is not None else cfg.get("cpu_threads")
    if threads is not None and torch.device(args.device).type == "cpu":
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    from torchvision import datasets, transforms

    import hawqlib
    from hawqlib.export import load_packed
    from hawqlib.models.imagenet import resnet50
    from hawqlib.train import evaluate

    dev = torch.device(args.device)
    where = f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f", {torch.get_num_threads()} thread(s)"
    print(f"torch {torch.__version__}, device {dev}{where}, size {args.size}")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folder(root / "train", cfg["px"], cfg["classes"], cfg["per_class"])
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406],
                                                                             [0.229, 0.224, 0.225])])
        ds = datasets.ImageFolder(str(root / "train"), transform=tf)
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg["batch"], shuffle=False, num_workers=0)
        print(f"  data: {len(ds)} images of {cfg['px']} px in {cfg['classes']} classes "
              f"({time.perf_counter() - t:.1f} s)")
        torch.manual_seed(0)
        model = resnet50(num_classes=cfg["classes"]).to(dev)
        t = time.perf_counter()
        base = evaluate(model, [(x.to(dev), y.to(dev)) for x, y in loader])["top1"]
        print(f"  baseline (seeded weights): top-1 {base:.2f}% ({time.perf_counter() - t:.1f} s)")
        t = time.perf_counter()
        qmodel, rep = hawqlib.quantize(
            model, loader, target_compression=8, device=dev, val_data=loader, progress=False,
            hessian_data=max(1, 16 // cfg["batch"]) if args.size == "full" else 1,
            hessian={"max_iter": cfg["hessian_iter"], **({"check_samples": cfg["check_samples"]}
                                                         if "check_samples" in cfg else {})},
            finetune={"stages": 1, "epochs_per_stage": 1, "lr": 0.001, "calibration_batches": 2},
            packed_path=root / "model.hawq")
        print(f"  quantize: {time.perf_counter() - t:.1f} s; " + ", ".join(f"{k} {v:.1f} s"
                                                                           for k, v in rep.timings.items()))
        print(f"  {rep.hessian_samples} Hessian images, weights {rep.weight_compression:.2f}x smaller, "
              f"bits {sorted(set(rep.bit_config.weights.values()))}, top-1 {rep.val_top1:.2f}%")
        restored = load_packed(root / "model.hawq", resnet50(num_classes=cfg["classes"])).to(dev)
        top1 = evaluate(restored, [(x.to(dev), y.to(dev)) for x, y in loader])["top1"]
    checks = {
        "quantized model on the device": all(p.device.type == dev.type for p in qmodel.parameters()),
        "one fine-tuning stage ran": rep.history is not None and len(rep.history["stages"]) == 1,
        f"reloaded top-1 {top1:.2f}% equals the quantized model's {rep.val_top1:.2f}%": top1 == rep.val_top1,
    }
    for what, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
