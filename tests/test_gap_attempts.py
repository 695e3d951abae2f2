"""The attempts at closing the headline row's accuracy gap: a learned activation step (LSQ), distillation
from the FP32 network, and the named attempt runs (hawqlib.quant.QuantAct.set_learn_step, hawqlib.distill,
hawqlib.finetune, hawqlib.repro.experiments)."""
from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawqlib.repro import experiments, profiles
from hawqlib import export
from hawqlib.blocks import quant_blocks
from hawqlib.repro.data import TensorLoader
from hawqlib.distill import DistillationLoss
from hawqlib.finetune import staged_finetune
from hawqlib.quant import BitConfig, QuantAct
from hawqlib.train import evaluate, train

from test_finetune import Crash, FailingLoader, small_cnn, synthetic

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrated_act(bits=4, lo=-1.0, hi=3.0):
    q = QuantAct(bits, averaging_constant=1.0, rule="minmax")
    q.observe = True
    q(torch.tensor([lo, hi]))
    q.observe = None
    return q


def test_learned_step_gradient_is_lsq():
    q = _calibrated_act()
    s0, z = float(q.scale), int(q.zero_point)
    q.set_learn_step(True)
    assert q.learn_step and q.observe is False and q.scale.requires_grad
    x = torch.tensor([[-2.0, -0.37, 0.0, 0.81, 1.4, 2.9, 5.0]], requires_grad=True)
    out = q(x)
    # forward: the affine grid of the calibrated step
    codes = torch.clamp(torch.round(x.detach() / s0) + z, 0, 15)
    assert torch.allclose(out.detach(), (codes - z) * s0, atol=1e-6)
    out.sum().backward()
    # d out / d x: 1 on the grid, 0 where the code saturates
    inside = (x.detach() / s0 + z >= 0) & (x.detach() / s0 + z <= 15)
    assert torch.equal(x.grad, inside.float())
    # d out / d s: round(x/s + z) - z - x/s on the grid, the clamped code - z outside, times 1/sqrt(N * q_max)
    v = x.detach() / s0 + z
    per = torch.where(inside, torch.round(v) - v, torch.clamp(torch.round(v), 0, 15) - z)
    g = 1.0 / math.sqrt(x[0].numel() * 15)
    assert q.scale.grad is not None and math.isclose(float(q.scale.grad), float(per.sum()) * g, rel_tol=1e-5)
    # without gradients (eval, export) the module reads the step as a plain buffer
    with torch.no_grad():
        assert torch.allclose(q(x), out.detach(), atol=1e-6)
    q.set_learn_step(False)
    assert not q.scale.requires_grad and not q.learn_step


def test_learned_step_keeps_a_positive_floor():
    q = _calibrated_act(lo=0.0, hi=1.0).set_learn_step(True)
    with torch.no_grad():
        q.scale.fill_(-0.5)             # where SGD could drive it
    out = q(torch.tensor([[0.3, 2.0]], requires_grad=True))
    assert float(q.scale.detach()) > 0 and torch.isfinite(out).all()


def test_learned_step_needs_a_calibrated_range():
    with pytest.raises(RuntimeError, match="calibrate"):
        QuantAct(4).set_learn_step(True)


def test_train_learns_the_step_without_weight_decay(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    act = _calibrated_act(lo=0.0, hi=0.05)   # a range far too narrow for the data: the step must grow
    model = nn.Sequential(net, act, nn.Linear(8, 3))
    act.set_learn_step(True)
    x = torch.randn(256, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    before = float(act.scale.detach())
    train(model, data, None, epochs=3, lr=0.05, weight_decay=0.5, progress=False, channels_last=False,
          checkpoint_dir=tmp_path)
    assert float(act.scale.detach()) > before, "the learned step did not move"
    groups = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and len(groups[1]["params"]) == 1
    assert act.scale.requires_grad and act.running_max.item() == pytest.approx(0.05)  # no observing


def test_distillation_loss():
    torch.manual_seed(0)
    teacher = nn.Linear(5, 4)
    x, y = torch.randn(16, 5), torch.randint(0, 4, (16,))
    z = torch.randn(16, 4, requires_grad=True)
    assert torch.equal(DistillationLoss(teacher, alpha=0.0)(z, y, x), F.cross_entropy(z, y))
    # a student that equals the teacher has no soft loss
    t = teacher(x).detach()
    assert float(DistillationLoss(teacher, alpha=1.0, temperature=3.0)(t, y, x)) == pytest.approx(0.0, abs=1e-6)
    kd = DistillationLoss(teacher, alpha=0.25, temperature=2.0)
    p_t = F.softmax(t / 2.0, dim=1)
    soft = (p_t * (p_t.log() - F.log_softmax(z / 2.0, dim=1))).sum(1).mean() * 4.0
    assert float(kd(z, y, x).detach()) == pytest.approx(float((0.75 * F.cross_entropy(z, y) + 0.25 * soft).detach()), rel=1e-5)
    kd(z, y, x).backward()
    assert z.grad is not None and teacher.weight.grad is None   # the teacher is not trained
    assert not list(kd.parameters()) and not kd.state_dict()    # nor part of the loss's state
    assert teacher.training                                      # and is given back in its own mode
    for bad in (dict(alpha=1.5), dict(alpha=True), dict(temperature=0.0)):
        with pytest.raises(ValueError):
            DistillationLoss(teacher, **bad)


@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)
    xtr, ytr = synthetic(512, 1)
    xte, yte = synthetic(256, 2)
    te = TensorLoader(xte, yte, 256)
    model = small_cnn(0)
    train(model, TensorLoader(xtr, ytr, 64, shuffle=True, seed=0), te, epochs=4, lr=0.05, progress=False)
    return model, (xtr, ytr), (xte, yte)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device visible to torch on this machine"))])
def test_staged_finetune_with_learned_step_and_distillation(device, task, tmp_path, monkeypatch):
    """On ``device`` (the model and its data there; a GPU where there is one, with deterministic cuDNN so
    that the resumed run can be compared bit for bit)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cpu_model, (xtr, ytr), (xte, yte) = task
    model = copy.deepcopy(cpu_model).to(device)
    te_cpu, te = TensorLoader(xte, yte, 256), TensorLoader(xte.to(device), yte.to(device), 256)
    cfg = BitConfig.uniform(model, 3, act_bits=4)
    order = [b.name for b in quant_blocks(model)]
    kw = dict(stages=2, epochs_per_stage=1, final_epochs=1, lr=0.02, progress=False, seed=1,
              act_step="learned", distill={"alpha": 0.9, "temperature": 4.0})
    loader = FailingLoader(xtr.to(device), ytr.to(device), 64, shuffle=True, seed=0)
    ref, hist = staged_finetune(model, cfg, order, loader, te, checkpoint_dir=tmp_path / "a", **kw)
    assert hist["plan"]["act_step"] == "learned" and hist["plan"]["distill"] == {"alpha": 0.9, "temperature": 4.0}
    assert all(t.device.type == device for t in [*ref.parameters(), *ref.buffers()])
    acts = [m for m in ref.modules() if isinstance(m, QuantAct)]
    assert acts and not any(m.learn_step for m in acts)   # plain buffers again once the run is over
    # the steps were trained: none equals what its (unchanged) observed range gives
    from hawqlib.quant.observer import affine_qparams
    moved = [float(m.scale) != float(affine_qparams(m.running_min, m.running_max, m.quant_min, m.quant_max)[0])
             for m in acts]
    assert any(moved)
    # a crash in the final (distilled) stage resumes to the same weights
    loader.fail_at = 2
    with pytest.raises(Crash):
        staged_finetune(model, cfg, order, loader, te, checkpoint_dir=tmp_path / "b", **kw)
    loader.fail_at = None
    got, _ = staged_finetune(model, cfg, order, loader, te, checkpoint_dir=tmp_path / "b", **kw)
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in ref.state_dict().items())
    # the packed file holds the learned steps: it predicts as the fake-quantized model
    packed = tmp_path / "m.hawq"
    export.save_packed(ref, packed)
    restored = export.load_packed(packed, small_cnn(0))   # on the CPU
    with torch.no_grad():
        x = next(iter(te_cpu))[0]
        assert torch.allclose(restored.eval()(x), ref.eval()(x.to(device)).cpu(), atol=1e-4)
    if device == "cpu":  # on a GPU, float rounding may flip a near tie
        assert evaluate(restored, te_cpu)["top1"] == evaluate(ref, te)["top1"]
    # the plan without the options is the plan of before (no new keys), and is another plan than this one
    _, plain = staged_finetune(model, cfg, order, loader, None, stages=2, epochs_per_stage=1, lr=0.02,
                               progress=False, seed=1)
    assert "act_step" not in plain["plan"] and "distill" not in plain["plan"]
    with pytest.raises(ValueError, match="final_epochs"):
        staged_finetune(model, cfg, order, loader, te, **{**kw, "final_epochs": 0})
    with pytest.raises(ValueError, match="act_step"):
        staged_finetune(model, cfg, order, loader, te, **{**kw, "act_step": "lsq"})


def _sharing_runs(task, tmp_path, epochs_per_stage: int):
    """``run(folder, trained=None, **settings)``: a staged fine-tuning of the task's model checkpointed in
    ``tmp_path/folder`` (none for ``None``), appending each trained epoch's stage to ``trained``; and the
    settings of a run with a learned step, without distillation and with it."""
    model, (xtr, ytr), (xte, yte) = task
    te = TensorLoader(xte, yte, 256)
    cfg = BitConfig.uniform(model, 3, act_bits=4)
    order = [b.name for b in quant_blocks(model)]
    kw = dict(stages=2, epochs_per_stage=epochs_per_stage, final_epochs=1, lr=0.02, progress=False, seed=1,
              act_step="learned")

    def run(folder, trained=None, callback=None, **k):
        loader = TensorLoader(xtr, ytr, 64, shuffle=True, seed=0)
        if trained is not None:
            callback = lambda rec: trained.append(rec["stage"])  # noqa: E731
        return staged_finetune(model, cfg, order, loader, te, checkpoint_dir=folder and tmp_path / folder,
                               callback=callback, **k)

    return run, kw, dict(kw, distill={"alpha": 0.9, "temperature": 4.0})


def test_runs_differing_in_the_final_stage_alone_share_the_stages_before_it(task, tmp_path):
    """A distilled run takes the finished stages of the same run without distillation (module docstring,
    "Shared stages"): it trains the final stage alone and ends with the weights of a run that trained all."""
    run, kw, kd = _sharing_runs(task, tmp_path, epochs_per_stage=1)
    run("lsq", **kw)
    ref, ref_hist = run("ref", **kd)
    trained = []
    got, hist = run("kd", trained, share_from={"lsq": tmp_path / "lsq"}, **kd)
    assert trained == [3]                      # stages 1 and 2 came from the run without distillation
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in ref.state_dict().items())
    assert [s.get("shared_from") for s in hist["stages"]] == ["lsq", "lsq", None]
    assert [s["before"] for s in hist["stages"]] == [s["before"] for s in ref_hist["stages"]]
    assert hist["plan"] == ref_hist["plan"]
    # the shared stages are this run's files now, under its own plan: a resume reads them as its own
    trained = []
    again, hist2 = run("kd", trained, share_from={}, **kd)
    assert trained == [] and [s.get("shared_from") for s in hist2["stages"]] == ["lsq", "lsq", None]
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ref.state_dict().items())
    # another plan (another learning rate) shares nothing; neither does a run whose file fails its digest
    trained = []
    run("other", trained, share_from={"lsq": tmp_path / "lsq"}, **dict(kd, lr=0.03))
    assert trained == [1, 2, 3]
    shutil.copytree(tmp_path / "lsq", tmp_path / "bad")
    f = tmp_path / "bad" / "stage_1" / "model.pt"
    c = torch.load(f, weights_only=True)
    w = next(v for v in c["model"].values() if v.is_floating_point() and v.numel() > 4)
    w.view(-1).view(torch.int32)[3] ^= 1 << 30  # one bit of one weight, as a disk fault would
    torch.save(c, f)
    trained = []
    with pytest.warns(UserWarning, match="not sharing stage 1 of bad"):
        bad, _ = run("kd2", trained, share_from={"bad": tmp_path / "bad"}, **kd)
    assert trained[0] == 1 and all(torch.equal(v, bad.state_dict()[k]) for k, v in ref.state_dict().items())
    # a stage this run had begun itself is superseded by the shared one, its partial files with it
    import json
    partial = tmp_path / "kd3" / "stage_1"
    partial.mkdir(parents=True)
    (partial / "log.json").write_text(json.dumps({"epochs": []}))
    (partial / "checkpoint.pt").write_bytes(b"partial")
    run("kd3", share_from={"lsq": tmp_path / "lsq"}, **kd)
    assert sorted(p.name for p in partial.iterdir()) == ["model.pt"]
    # a file without a digest is not taken either
    shutil.copytree(tmp_path / "lsq", tmp_path / "nodigest")
    f = tmp_path / "nodigest" / "stage_1" / "model.pt"
    c = torch.load(f, weights_only=True)
    del c["sha256"]
    torch.save(c, f)
    trained = []
    with pytest.warns(UserWarning, match="records no SHA-256"):
        run("kd4", trained, share_from={"nodigest": tmp_path / "nodigest"}, **kd)
    assert trained[0] == 1                     # stage 1 trained here (stage 2, verified, may be taken)
    with pytest.raises(TypeError, match="share_from must be a dict"):
        run("kd5", share_from=tmp_path / "lsq", **kd)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        run(None, share_from={"lsq": tmp_path / "lsq"}, **kd)


def test_a_run_shares_the_stages_another_run_in_progress_has_finished(task, tmp_path):
    """The other run stopped inside its second stage: the first is taken, the rest trained here; every
    record (the "before" evaluation of the stage trained here included) is that of a run that trained all."""
    run, kw, kd = _sharing_runs(task, tmp_path, epochs_per_stage=2)
    _, part = run("lsq", callback=lambda rec: rec["global_epoch"] == 3, **kw)   # stops in stage 2
    assert not part["complete"] and not (tmp_path / "lsq" / "stage_2" / "model.pt").exists()
    ref, ref_hist = run("ref", **kd)
    trained = []
    got, hist = run("kd", callback=lambda rec: trained.append((rec["stage"], rec["epoch"])),
                    share_from={"lsq": tmp_path / "lsq"}, **kd)
    assert trained == [(2, 1), (2, 2), (3, 1)]
    assert [s.get("shared_from") for s in hist["stages"]] == ["lsq", None, None]
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in ref.state_dict().items())
    for a, b in zip(hist["stages"], ref_hist["stages"]):
        assert a["before"] == b["before"]
        assert [{k: v for k, v in r.items() if not k.endswith("_s")} for r in a["epochs"]] == \
            [{k: v for k, v in r.items() if not k.endswith("_s")} for r in b["epochs"]]


def test_attempt_runs_are_named_grouped_and_keyed_apart():
    P = profiles.get("cpu")
    assert experiments.run_names(P, "attempts") == ["hawq", "hawq+final", "hawq+lsq", "hawq+kd"]
    assert not set(experiments.run_names(P, "table")) & {"hawq+final", "hawq+lsq", "hawq+kd"}
    # each attempt adds one change to the one before
    A = P["finetune"]["attempts"]
    assert A["hawq+final"]["final_epochs"] > 0 == P["finetune"]["final_epochs"]
    assert A["hawq+lsq"] == {**A["hawq+final"], "act_step": "learned"}
    assert A["hawq+kd"] == {**A["hawq+lsq"], "distill": A["hawq+kd"]["distill"]}
    experiments.check_names(P, ["hawq+kd"])
