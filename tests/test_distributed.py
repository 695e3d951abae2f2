"""hawqlib.distributed: training, resume, fine-tuning and the Hessian on 2 ranks (torchrun, gloo, CPU, 1 thread
each) against one process. The worker (tests/_ddp_worker.py) runs on a tiny conv net and 41 synthetic 8x8
images; two launches in all, shared by the tests (module fixture)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker as worker  # noqa: E402

from hawqlib import distributed as hdist  # noqa: E402

WORKER = Path(__file__).parent / "_ddp_worker.py"
ROOT = Path(__file__).resolve().parents[1]

# (a)'s tolerance: the same global batches in the same order, so the two runs differ only in the order of
# float32 sums (each rank's mean loss over its slice, then DDP's all-reduce of the gradients, versus one
# mean over the whole batch): a few units of float32 rounding (1.2e-7 relative) per step, over a few steps.
RTOL, ATOL = 1e-5, 1e-6


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _cmd(out: Path, what: str) -> list[str]:
    # --standalone: a local rendezvous on a free port
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
            str(out), what]


def _torchrun(out: Path, what: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out, what), env=_env(), capture_output=True, text=True, timeout=600)


def _kill_after_first_checkpoint(out: Path) -> None:
    """Start a 2-epoch run; once both ranks are past epoch 1's checkpoint, SIGKILL the ranks (each in its own
    session, as torchrun starts them; they wrote their pids) and torchrun's process group."""
    proc = subprocess.Popen(_cmd(out, "hang"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not all((out / f"hang.rank{r}").exists() for r in (0, 1)):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach its first checkpoint"
            time.sleep(0.2)
    finally:
        pids = [int((out / f"hang.rank{r}").read_text()) for r in (0, 1) if (out / f"hang.rank{r}").exists()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)   # the group this test started: torchrun
        proc.wait()
        proc.stderr.close()
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    first = _torchrun(out, "first")
    if first.returncode != 0 and "rendezvous" in (first.stderr + first.stdout).lower() \
            and not (out / "a.rank0.pt").exists():
        pytest.skip(f"torchrun cannot start 2 local ranks on this machine: {first.stderr[-500:]}")
    assert first.returncode == 0, first.stderr[-3000:]
    _kill_after_first_checkpoint(out)
    assert not (out / "ck_kill" / "model.pt").exists()  # killed before its end
    second = _torchrun(out, "resume")
    assert second.returncode == 0, second.stderr[-3000:]
    load = lambda name, r: torch.load(out / f"{name}.rank{r}.pt", weights_only=True)  # noqa: E731
    return {name: (load(name, 0), load(name, 1)) for name in ("a", "b", "c_full", "c_stop", "c_resume", "d",
                                                                "d_stop", "d_resume", "c_killed_resume", "e",
                                                                "e_shared")}


def _same(s0: dict, s1: dict) -> None:
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k


def test_training_matches_one_process(runs, one_thread):
    r0, r1 = runs["a"]
    _same(r0["state"], r1["state"])             # every rank holds the same weights
    assert r0["metrics"] == r1["metrics"]        # and logs the same (all-reduced) numbers
    one = worker.run_train(1)
    for k, v in one["state"].items():
        torch.testing.assert_close(r0["state"][k], v, rtol=RTOL, atol=ATOL)
    for a, b in zip(r0["metrics"], one["metrics"]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5), k


def test_spectrum_matches_one_process(runs, one_thread):
    r0, r1 = runs["b"]
    assert r0 == r1
    assert r0["method"] == ["autograd", "autograd"]  # "auto" picks autograd under a process group
    one = worker.run_hessian()                         # one process, "auto": Gauss-Newton here
    from hawqlib.hessian import top_eigenvalues
    net = worker.model()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 3, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    ag = top_eigenvalues(net, torch.nn.CrossEntropyLoss(), (x, y), chunk_size=3, tol=1e-6, max_iter=40,
                         progress=False, method="autograd")
    for ref in (one["eig"], [r.eigenvalue for r in ag]):
        for a, b in zip(r0["eig"], ref):
            assert a == pytest.approx(b, rel=1e-6)


def test_resume_after_first_epoch_matches_uninterrupted(runs):
    full, stop, resumed = runs["c_full"][0], runs["c_stop"][0], runs["c_resume"][0]
    assert len(stop["metrics"]) == 1 and len(resumed["metrics"]) == 2
    _same(resumed["state"], full["state"])      # bit-identical on the CPU
    _same(runs["c_resume"][1]["state"], full["state"])
    assert resumed["metrics"] == full["metrics"]
    for r in runs["c_killed_resume"]:            # killed (SIGKILL) after epoch 1's checkpoint, restarted
        _same(r["state"], full["state"])
        assert r["metrics"] == full["metrics"]


def test_finetune_ranks_agree_and_resume(runs):
    r0, r1 = runs["d"]
    _same(r0["state"], r1["state"])             # weights, quantizer ranges and switches
    assert r0["val"] == r1["val"] and len(r0["val"]) == 2 and r0["complete"]
    assert not runs["d_stop"][0]["complete"] and not runs["d_stop"][1]["complete"]
    for r in runs["d_resume"]:                   # stage 1 from rank 0's files, stage 2 trained again
        _same(r["state"], r0["state"])
        assert r["val"] == r0["val"] and r["complete"]


def test_finetune_with_a_learned_step_and_distillation_matches_one_process(runs, one_thread, tmp_path):
    r0, r1 = runs["e"]
    _same(r0["state"], r1["state"])             # the learned steps too: the ranks averaged their gradients
    one = worker.run_finetune(tmp_path / "ft_lsq", **worker.LEARNED)
    for k, v in one["state"].items():
        if v.is_floating_point():
            torch.testing.assert_close(r0["state"][k], v, rtol=RTOL, atol=ATOL)
        else:
            assert torch.equal(r0["state"][k], v), k
    steps = [k for k in one["state"] if k.endswith(".scale") and "act" in k]
    assert steps


def test_finetune_shares_stages_across_runs_on_every_rank(runs):
    full = runs["e"][0]
    for r in runs["e_shared"]:                  # rank 0 read the other run's files; every rank loaded them
        assert r["shared"] == ["plain", "plain", None]
        _same(r["state"], full["state"])
        assert r["val"] == full["val"] and r["complete"]


def test_one_process_helpers():
    assert not hdist.is_distributed()
    assert hdist.rank() == 0 and hdist.world_size() == 1 and hdist.is_main()
    hdist.barrier()
    assert hdist.broadcast_object({"x": 1}) == {"x": 1}
    data = [(torch.zeros(5, 1), torch.arange(5))]
    assert hdist.shard(data) is data             # no process group: the loader itself
    sh = hdist.Shard(data, rank_=1, world=2, dev="cpu")
    (x, y), = list(sh)
    assert y.tolist() == [2, 3, 4] and sh.global_n == 5
    with pytest.raises(ValueError, match="cannot be split"):
        list(hdist.Shard([(torch.zeros(1, 1), torch.zeros(1))], rank_=0, world=2, dev="cpu"))


def test_cli_refuses_torchrun_with_one_line(monkeypatch, capsys):
    from hawqlib.repro.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # train and finetune run under torchrun; the other commands do not
    assert main(["seal", "--all"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs as one process" in err
