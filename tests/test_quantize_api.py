"""hawqlib.quantize, the front door (paper sections 3.1-3.3 in one call), its README snippet and its command."""
from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import hawqlib
from hawqlib import size
from hawqlib.repro.cli import main
from hawqlib.blocks import quant_blocks
from hawqlib.export import load_packed
from hawqlib.quant import QUANT_MODULES, BitConfig, quantize_model
from hawqlib.train import evaluate, train

from conftest import DEVICES

README = Path(__file__).resolve().parents[1] / "README.md"


pytestmark = pytest.mark.usefixtures("one_thread")


def batches(n_batches: int, seed: int, bs: int = 32, classes: int = 10):
    """Float 3x8x8 images: a fixed random template per class plus noise, as a list of (x, y) batches."""
    templates = torch.randn(classes, 3, 8, 8, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, classes, (bs,), generator=g)
        out.append((templates[y] + 0.8 * torch.randn(bs, 3, 8, 8, generator=g), y))
    return out


def cnn() -> nn.Module:
    """Piecewise linear: Conv/BatchNorm/ReLU, pooling, Linear (the exact Gauss-Newton route applies)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class TinyViT(nn.Module):
    """A one-block vision transformer: patch embedding, LayerNorm, softmax attention, GELU MLP."""

    def __init__(self, dim: int = 16, classes: int = 10):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, dim, 4, stride=4)  # 8x8 -> 4 tokens
        self.pos = nn.Parameter(0.02 * torch.randn(1, 4, dim))
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        q, k, v = self.qkv(self.norm1(t)).chunk(3, dim=-1)
        t = t + self.proj(torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v)
        t = t + self.fc2(self.act(self.fc1(self.norm2(t))))
        return self.head(self.norm(t.mean(1)))


def pretrained(build, data) -> nn.Module:
    model = build()
    train(model, data, epochs=3, lr=0.05, progress=False, channels_last=False)
    return model.eval()


def snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], [type(m) for m in model.modules()])


def assert_unchanged(model, before) -> None:
    sd, modes, flags, types = before
    assert [type(m) for m in model.modules()] == types
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)


def assert_hawq_allocation(model, qmodel, report, target: float) -> None:
    """The budget is met, bits follow S, the model is quantized at the reported bits, sizes agree."""
    cfg = report.bit_config
    assert report.weight_compression >= target - 1e-9
    assert report.weight_compression == pytest.approx(32 / cfg.mean_bits(model))
    assert report.weight_compression == pytest.approx(size.weight_compression(model, cfg))
    for a in report.table:  # a more sensitive block never gets fewer bits (section 3.1)
        for b in report.table:
            if a["S"] > b["S"]:
                assert a["bits"] >= b["bits"], (a, b)
    names = [b.name for b in quant_blocks(model)]
    assert [s.name for s in report.spectra] == names == [r["name"] for r in report.table]
    omegas = [e.omega for e in report.order]
    assert sorted(e.name for e in report.order) == sorted(names) and omegas == sorted(omegas, reverse=True)
    assert {e.name: e.bits for e in report.order} == cfg.weights
    qmods = dict(qmodel.named_modules())
    first = names[0]
    for n in names:
        m = qmods[n]
        assert isinstance(m, QUANT_MODULES) and m.quant_enabled and m.weight_bits == cfg.weights[n]
        if n == first:
            assert m.act_quant is None
        else:
            assert m.act_quant.bits == cfg.act_bits and m.act_quant.enabled and m.act_quant.has_range()
    assert not qmodel.training
    assert report.size_bytes == size.model_size_bytes(model, cfg)
    assert report.compression == pytest.approx(size.fp32_size_bytes(model) / report.size_bytes)
    assert report.activation_compression == 32 / cfg.act_bits


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    tr, va = batches(8, seed=1), batches(4, seed=2)
    model = pretrained(cnn, tr)
    before = snapshot(model)
    packed = tmp_path_factory.mktemp("cnn") / "model.hawq"
    qmodel, report = hawqlib.quantize(model, tr, target_compression=10, act_bits=4, val_data=va,
                                      finetune=dict(stages=2, epochs_per_stage=1, lr=0.02), packed_path=packed,
                                      progress=False)
    return model, before, qmodel, report, tr, va


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_cnn_allocation_and_quantized_model(cnn_run):
    model, _, qmodel, report, _, _ = cnn_run
    assert_hawq_allocation(model, qmodel, report, 10)
    assert len(set(report.bit_config.weights.values())) > 1  # mixed precision: the S order is exercised
    assert {s.method for s in report.spectra} == {"gauss-newton"}  # piecewise linear: the exact route
    assert report.measure == "weights" and report.target == {"target_compression": 10}
    assert report.hessian_samples == 4 * 32  # the first HESSIAN_BATCHES batches of train_data


def test_cnn_finetuned_in_omega_order_and_evaluated(cnn_run):
    model, _, qmodel, report, _, va = cnn_run
    stages = report.history["stages"]
    assert len(stages) == 2 and report.history["complete"]
    assert [n for s in stages for n in s["quantized"]] == [e.name for e in report.order]
    assert report.val_top1 == evaluate(qmodel, va)["top1"]
    assert report.fp32_val_top1 == evaluate(model, va)["top1"]
    assert report.fp32_val_top1 > 50 and report.val_top1 > 30  # chance is 10%


def test_cnn_packed_file_restores_predictions(cnn_run):
    model, _, qmodel, report, _, va = cnn_run
    path = Path(report.packed_path)
    assert path.stat().st_size == report.packed_bytes > report.size_bytes
    restored = load_packed(path, cnn())
    x = va[0][0]
    with torch.no_grad():
        assert torch.allclose(restored(x), qmodel(x), atol=1e-5)
    assert json.loads(json.dumps(report.to_dict()))["bit_config"] == report.bit_config.to_dict()


def test_cnn_user_model_unchanged(cnn_run):
    model, before, _, _, _, _ = cnn_run
    assert_unchanged(model, before)


def test_gelu_layernorm_model_takes_the_autograd_route():
    tr, va = batches(6, seed=3), batches(2, seed=4)
    model = pretrained(TinyViT, tr)
    before = snapshot(model)
    qmodel, report = hawqlib.quantize(model, tr, target_compression=10, act_bits=8, val_data=va, hessian_data=2,
                                      finetune=dict(stages=2, epochs_per_stage=1, lr=0.02), progress=False)
    assert {s.method for s in report.spectra} == {"autograd"}
    assert all(s.converged for s in report.spectra)
    assert_hawq_allocation(model, qmodel, report, 10)
    assert len(set(report.bit_config.weights.values())) > 1  # mixed precision: the S order is exercised
    assert report.hessian_samples == 2 * 32
    assert report.val_top1 == evaluate(qmodel, va)["top1"]
    assert_unchanged(model, before)


def test_no_finetune_on_cpu_is_deterministic():
    tr = batches(4, seed=5)
    model = pretrained(cnn, tr)
    runs = [hawqlib.quantize(model, tr, target_size_mb=2000 / 2 ** 20, measure="model", choices=(2, 4, 8),
                             finetune=False, hessian_data=tr[0], device="cpu", seed=3, progress=False)
            for _ in range(2)]
    (q1, r1), (q2, r2) = runs
    assert r1.history is None and r1.val_top1 is None and r1.device == "cpu"
    assert r1.size_bytes <= 2000 and r1.hessian_samples == 32
    assert_hawq_allocation(model, q1, r1, 0)
    assert all(p.device.type == "cpu" for p in q1.parameters())
    assert r1.bit_config == r2.bit_config
    s1, s2 = q1.state_dict(), q2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("device", DEVICES)
def test_every_step_runs_where_asked_from_cpu_data(tmp_path, device):
    """Hessian, allocation, order, fine-tuning (one stage) and export on ``device``, from CPU batches: the
    model and the report say ``device``, the packed file restores the model, the bits are HAWQ's."""
    tr = batches(4, seed=6)
    model = pretrained(cnn, tr)
    before = snapshot(model)
    kw = dict(target_compression=10, finetune={"stages": 1, "epochs_per_stage": 1, "calibration_batches": 2},
              progress=False)
    qmodel, report = hawqlib.quantize(model, tr, val_data=tr, device=device, packed_path=tmp_path / "m.hawq", **kw)
    assert report.device.startswith(device) and all(p.device.type == device for p in qmodel.parameters())
    assert all(b.device.type == device for b in qmodel.buffers())
    assert report.history is not None and len(report.history["stages"]) == 1
    assert report.val_top1 == evaluate(qmodel, [(x.to(device), y.to(device)) for x, y in tr])["top1"]
    assert set(report.timings) >= {"hessian", "errors", "allocation", "order", "finetune", "export"}
    if device != "cpu":  # the same spectra as on the CPU, to the devices' rounding
        on_cpu = hawqlib.quantize(model, tr, device="cpu", **kw)[1]
        for a, b in zip(report.spectra, on_cpu.spectra):
            assert a.eigenvalue == pytest.approx(b.eigenvalue, rel=1e-3)
    restored = load_packed(tmp_path / "m.hawq", cnn())
    with torch.no_grad():
        assert torch.allclose(restored(tr[0][0]), qmodel(tr[0][0].to(device)).cpu(), atol=1e-4)
    assert_hawq_allocation(model, qmodel.cpu(), report, 10)
    assert_unchanged(model, before)


def test_the_callers_random_state_is_left_as_it_was():
    """quantize seeds its own random state (torch.random.fork_rng): the caller's next numbers are unchanged."""
    tr = batches(2, seed=8)
    model = pretrained(cnn, tr)
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    hawqlib.quantize(model, tr, target_compression=8, finetune={"stages": 1, "epochs_per_stage": 1}, progress=False)
    assert torch.equal(torch.rand(5), expected)
    torch.manual_seed(123)
    hawqlib.quantize(model, tr, target_compression=8, finetune=False, progress=False, seed=5)
    assert torch.equal(torch.rand(5), expected)


def test_calibration_covers_every_batch_by_default():
    """Issue case: calibration batches scaled x1, x10, x10, x10. The default range (all batches at once) covers
    the x10 batches; the training moving average (the stored runs' rule) is decided by the first and clips them."""
    tr = batches(4, seed=9)
    model = pretrained(cnn, tr)
    scaled = [(x * f, y) for (x, y), f in zip(tr, (1.0, 10.0, 10.0, 10.0))]
    x10 = scaled[1][0]
    with torch.no_grad():
        ref = model.eval()(x10)
    errs = {}
    for rule in ("union", "moving_average"):
        q, _ = hawqlib.quantize(model, scaled, target_compression=4, choices=(8,), act_bits=8, finetune=False,
                                progress=False, calibration=rule)
        with torch.no_grad():
            errs[rule] = float((q(x10) - ref).norm() / ref.norm())
    assert errs["union"] < 0.05, errs
    assert errs["moving_average"] > 5 * errs["union"], errs
    with pytest.raises(ValueError, match="unknown calibration 'ema'; valid: union, moving_average"):
        hawqlib.quantize(model, scaled, target_compression=4, finetune=False, progress=False, calibration="ema")


def _bad_cases():
    vit = TinyViT()
    mha = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    return [
        (dict(), "exactly one budget"),
        (dict(target_compression=8, target_size_mb=1.0), "exactly one budget"),
        (dict(target_compression=8, measure="bytes"), "unknown measure 'bytes'; valid: model, weights"),
        (dict(target_compression=17), r"smallest achievable size .*compression 16\.00x"),
        (dict(target_compression=-2), "target_compression must be a positive number"),
        (dict(target_compression=8, act_bits=9), r"act_bits other than None must be an integer in 1\.\.8 .*got 9"),
        (dict(target_compression=8, choices=(0, 4)), r"each bit width in choices must be an integer in 1\.\.8 .*got 0"),
        (dict(target_compression=8, finetune={"epochs": 2}), r"unknown fine-tuning setting\(s\) \['epochs'\]"),
        (dict(target_compression=8, finetune="yes"), "finetune must be True, False, a dict"),
        (dict(target_compression=8, finetune={"lr": 0}), "fine-tuning lr must be a number > 0, got 0"),
        (dict(target_compression=8, finetune={"epochs_per_stage": 0}), "epochs_per_stage must be an int >= 1"),
        (dict(target_compression=8, finetune={"stages": 7}),
         r"stages must be an int in 1\.\.6 \(the number of blocks\)"),
        (dict(target_compression=8, device="tpu0"), "device must be None, 'cpu'"),
        *([(dict(target_compression=8, device="cuda"), "torch sees no CUDA device")]
          if not torch.cuda.is_available() else []),
        (dict(target_compression=8, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1)),
         "pass finetune=False with it"),
        (dict(target_compression=8, hessian={"iters": 3}), r"unknown hessian option\(s\) \['iters'\]"),
        (dict(target_compression=8, train_data=iter(batches(1, 0))), "one-shot iterator"),
        (dict(target_compression=8, train_data=batches(1, 0)[0][0]), "train_data must be a re-iterable"),
        (dict(target_compression=8, model=nn.Sequential(nn.ReLU())), "has no Conv2d or Linear layer"),
        (dict(target_compression=8, model=quantize_model(vit, BitConfig.uniform(vit, 4))), "already quantized"),
        (dict(target_compression=8, model=mha), "'1.out_proj' is the output projection of an nn.MultiheadAttention"),
        (dict(target_compression=8, seed=1.5), "seed must be an int"),
    ]


@pytest.mark.parametrize("kwargs,message", _bad_cases())
def test_bad_arguments_fail_at_the_boundary_with_one_clear_message(kwargs, message):
    kwargs = dict(kwargs)
    model = kwargs.pop("model", TinyViT())
    data = kwargs.pop("train_data", batches(1, 0))
    with pytest.raises((ValueError, TypeError), match=message):
        hawqlib.quantize(model, data, progress=False, **kwargs)


def test_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    text = README.read_text()
    section = text.split("## Use it on your own model", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) < 10
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)
    report = env["report"]
    assert report.weight_compression >= 8 and Path("model.hawq").stat().st_size == report.packed_bytes
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(env["restored"](x), env["qmodel"](x), atol=1e-5)


CLI_MODULE = '''
import torch
from torch import nn


def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def data():
    g = torch.Generator().manual_seed(0)
    make = lambda: [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
                    for _ in range(3)]
    return make(), make()
'''


def test_command_quantizes_a_factory_model_with_its_weights(tmp_path, monkeypatch, capsys):
    (tmp_path / "usernet.py").write_text(CLI_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import usernet

    model = usernet.net()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.5)  # weights the factory alone would not give
    torch.save(model.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "out"
    rc = main(["quantize", "usernet:net", "--weights", str(tmp_path / "w.pt"), "--data", "usernet:data",
               "--target-compression", "8", "--no-finetune", "--out", str(out), "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["weight_compression"] >= 8 and report["val_top1"] is not None
    assert BitConfig.load(out / "bit_config.json").to_dict() == report["bit_config"]
    restored = load_packed(out / "model.hawq", usernet.net)
    assert torch.equal(restored[-1].bias, model[-1].bias)  # the FP32 bias of the weights file, not the factory's
    assert "weights 8.00x smaller" in capsys.readouterr().out

    rc = main(["quantize", "usernet:net", "--data", "usernet:data", "--target-compression", "8", "--stages", "1",
               "--epochs-per-stage", "1", "--out", str(out), "--quiet"])
    history = json.loads((out / "report.json").read_text())["history"]
    # resumable while it runs; the resume folder goes once the results are written
    assert rc == 0 and len(history["stages"]) == 1 and not (out / "run").exists()
    assert all((out / f).stat().st_mode & 0o777 == 0o666 & ~_umask() for f in ("model.hawq", "bit_config.json",
                                                                              "report.json"))
    with pytest.raises(SystemExit, match="must be 'module:callable'"):
        main(["quantize", "usernet.net", "--data", "usernet:data", "--target-compression", "8", "--out", str(out)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="quantize: .*torch sees no CUDA device"):
            main(["quantize", "usernet:net", "--data", "usernet:data", "--target-compression", "8", "--device", "cuda",
                  "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["quantize", "usernet:net", "--data", "usernet:data", "--target-compression", "8", "--act-bits", "9",
              "--out", str(out)])
    assert "--act-bits: must be a whole number in 1..8 or 'none', got '9'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot import 'nosuchmodule'"):
        main(["quantize", "nosuchmodule:net", "--data", "usernet:data", "--target-compression", "8",
              "--out", str(out)])


# ----------------------------------------------------------------------------- issue 38: every parameter documented

_SECTIONS = ("Parameters", "Args", "Arguments", "Attributes")


def documented_parameters(doc: str) -> set[str]:
    """The names a docstring's Parameters section lists (numpy style: ``name : type`` under a dashed header;
    Google style: ``name (type): text`` or ``name: text`` under ``Args:``), several names per line included."""
    lines = inspect.cleandoc(doc or "").splitlines()
    names: set[str] = set()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        numpy = line in _SECTIONS and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}
        google = line.rstrip(":") in _SECTIONS and line.endswith(":")
        if not (numpy or google):
            i += 1
            continue
        i += 2 if numpy else 1
        while i < len(lines):
            raw = lines[i]
            if numpy and i + 1 < len(lines) and raw.strip() and set(lines[i + 1].strip()) == {"-"}:
                break  # the next numpy section
            if google and raw.strip() and not raw.startswith((" ", "\t")):
                break  # the next Google section (no longer indented)
            if raw.strip() and (numpy and not raw.startswith((" ", "\t"))
                                or google and len(raw) - len(raw.lstrip()) <= 4):
                head = re.split(r"\s*\(|\s*:", raw.strip(), maxsplit=1)[0]
                names |= {n.strip().lstrip("*") for n in head.split(",") if n.strip()}
            i += 1
    return names


def test_the_docstring_parser_reads_both_styles_and_misses_an_undocumented_parameter():
    def numpy_style(a, b, *, c=1):
        """Do it.

        Parameters
        ----------
        a, b : int
            The two.

        Returns
        -------
        int
            Something.
        """

    def google_style(a, b):
        """Do it.

        Args:
            a (int): one.
            b: two,
                continued.
        """

    assert documented_parameters(numpy_style.__doc__) == {"a", "b"}  # c is missing: the test below would fail
    # prose after a numpy section is read as one more entry (napoleon renders it as a parameter): caught too
    assert "Some prose." in documented_parameters("Do it.\n\nParameters\n----------\na : int\n    One.\n\n"
                                                 "Some prose.\n")
    assert documented_parameters(google_style.__doc__) == {"a", "b"}


@pytest.mark.parametrize("name", hawqlib.__all__)
def test_every_public_entry_point_documents_every_parameter(name):
    """``hawqlib.__all__``: each callable's Parameters section lists exactly its signature's parameters."""
    obj = getattr(hawqlib, name)
    params = {p.name for p in inspect.signature(obj).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    documented = documented_parameters(inspect.getdoc(obj))
    assert params <= documented, f"hawqlib.{name}: parameters not in its docstring: {sorted(params - documented)}"
    assert documented <= params, f"hawqlib.{name}: its docstring lists non-parameters: {sorted(documented - params)}"
