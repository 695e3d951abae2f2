"""The lab profile: the hours-long steps load the committed cpu artifacts read-only, the rest is computed in scratch.

Checked without executing a notebook: the settings that key each loaded kind are the cpu profile's; the lab's
baseline and fine-tuned runs resolve to folders committed under data/artifacts, and loading them writes nothing
there; a cached step at the lab profile loads a published copy of a loaded kind and computes every other kind
into its own store; the ledger and the page note say which was which.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hawqlib.repro import artifacts, book, damage, experiments, pages, paths, profiles
from hawqlib.repro.artifacts import ArtifactError, cached, ledger

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "data" / "artifacts"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("HAWQ_ARTIFACTS", raising=False)
    monkeypatch.delenv("HAWQ_PROFILE", raising=False)
    monkeypatch.delenv("FORCE", raising=False)
    ledger.clear()
    yield
    paths.use_profile(None)
    ledger.clear()


def test_the_lab_loads_hours_long_kinds_at_the_cpu_settings():
    lab, cpu = profiles.get("lab"), profiles.get("cpu")
    assert tuple(lab["loads"]) == profiles.LAB_LOADS == artifacts.loaded_kinds("lab")
    assert artifacts.loaded_kinds("cpu") == () and artifacts.loaded_kinds("smoke") == ()
    assert set(profiles.LAB_LOADS) >= {"baseline_resnet20", "finetune"}
    # what keys the loaded kinds: the baselines, every fine-tuning setting and run, the front door's run, the damage
    assert lab["baseline"] == cpu["baseline"] and lab["finetune"] == cpu["finetune"]
    assert lab["own_network"] == cpu["own_network"]
    assert damage._settings(lab) == damage._settings(cpu)
    # what keys the spectrum the runs' bits and orders come from, and those bits and orders
    for k in ("n_samples", "data_seed", "method", "solver", "tol", "max_iter", "seed"):
        assert lab["hessian"][k] == cpu["hessian"][k], k
    assert lab["allocation"] == cpu["allocation"] and lab["ablation"] == cpu["ablation"]
    assert experiments.run_names(lab) == experiments.run_names(cpu)
    # and it runs no fine-tuning of the table in a notebook; its one live fine-tune is short and on a subset
    assert lab["finetune"]["notebooks_compute"] is False
    live = lab["live_finetune"]
    assert live["run"] in experiments.run_names(lab) and live["stages"] * live["epochs_per_stage"] <= 2
    assert 0 < live["train_subset"] <= 10_000
    # the cheap steps it recomputes are smaller than the cpu ones where the cpu ones take minutes
    assert lab["landscape"]["grid"] < cpu["landscape"]["grid"]
    assert max(lab["hessian"]["stability"]["n_samples"]) < max(cpu["hessian"]["stability"]["n_samples"])
    assert lab["sensitivity"]["test_subset"] < cpu["sensitivity"]["test_subset"]


def test_the_lab_writes_where_git_ignores_it(monkeypatch):
    store = Path(book.artifacts_for("lab"))
    assert store == ROOT / "data" / "scratch" / "lab"
    assert subprocess.run(["git", "check-ignore", "-q", str(store / "x")], cwd=ROOT).returncode == 0
    monkeypatch.chdir(ROOT / "notebooks")
    paths.use_profile("lab")
    assert artifacts.artifacts_root() == store and paths.published_root() == PUBLISHED
    monkeypatch.setenv("HAWQ_ARTIFACTS", str(store))  # as the book runner sets it: the published store stays
    assert paths.published_root() == PUBLISHED


def _snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_the_labs_baseline_and_runs_resolve_to_committed_artifacts(tmp_path, monkeypatch, cifar_root):
    """The lab's baseline and its fine-tuned runs are the committed ones, loaded without writing a byte."""
    from hawqlib.repro.study import Study

    monkeypatch.chdir(ROOT / "notebooks")
    before = _snapshot(PUBLISHED)
    # the allocation's spectrum at the lab's settings: the cpu profile's committed one (the lab recomputes it;
    # its key, hence its values, are the same), read here so that the test stays seconds long
    cpu = Study("cpu", cifar_root)
    spectra, sfolder = cpu.spectrum()
    assert sfolder.parent == PUBLISHED
    ledger.clear()
    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path / "lab"))
    study = Study("lab", cifar_root)
    study._spectra[(repr("layer"), True, repr([]))] = (spectra, sfolder)  # noqa: SLF001  (the lab's own key)
    assert study.spectrum()[0] is spectra
    assert study.folder.parent == PUBLISHED  # the baseline: a published copy, loaded
    assert [e.how for e in artifacts.ledger_entries() if e.kind == "baseline_resnet20"] == [ledger.PUBLISHED]
    # one run of each recipe: the headline's seeds (staged, Omega order), a direct row, another order (the
    # allocation is shared within one specs call; each costs seconds)
    names = ["hawq", "W4A4", "order-reverse"]
    study.specs(names)
    found = {(n, s): study.run(n, s, load_only=True) for n in names for s in experiments.seeds(study.P, n)}
    assert None not in found.values(), [k for k, r in found.items() if r is None]
    assert all(r.folder.parent == PUBLISHED for r in found.values())
    assert len({r.folder for r in found.values()}) == len(found) >= 5
    # the Hessian chapter's residual-granularity spectrum: the committed one, loaded (loads_matching); the layer
    # one is not loaded (the lab recomputes it)
    ledger.clear()
    res, rfolder = study.spectrum("residual", vectors=False)
    assert rfolder.parent == PUBLISHED and len(res) == 11
    assert [e.how for e in artifacts.ledger_entries() if e.kind == "spectrum"] == [ledger.PUBLISHED]
    assert not artifacts.loads("spectrum", {"granularity": "layer"}, "lab")
    assert artifacts.loads("spectrum", {"granularity": "residual", "tol": 1.0}, "lab")
    assert not artifacts.loads("spectrum", {"granularity": "residual"}, "smoke")
    # nothing was written: not in the published store, not in the lab's (everything there was loaded)
    assert _snapshot(PUBLISHED) == before
    assert not (tmp_path / "lab").exists() or not any((tmp_path / "lab").iterdir())


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "hawqlib").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    return root


def _step(kind: str, value: int, calls: list):
    def compute(folder):
        calls.append((kind, value))
        return value

    def save(folder, v):
        (folder / "v.txt").write_text(str(v))

    return dict(kind=kind, params={"v": value}, compute=compute, save=save,
                load=lambda folder: int((folder / "v.txt").read_text()), force=None)


def test_a_lab_step_loads_a_published_copy_and_computes_the_rest_into_scratch(tmp_path, monkeypatch):
    root = _checkout(tmp_path)
    monkeypatch.chdir(root)
    calls: list = []
    paths.use_profile("cpu")  # the published run: both kinds computed into data/artifacts
    for kind in ("finetune", "spectrum"):
        assert cached(**_step(kind, 7, calls))[1].parent == root / "data" / "artifacts"
    assert calls == [("finetune", 7), ("spectrum", 7)]
    published = _snapshot(root / "data" / "artifacts")
    ledger.clear()
    paths.use_profile("lab")
    calls.clear()
    value, folder = cached(**_step("finetune", 7, calls))  # a loaded kind: the published copy, not computed
    assert value == 7 and folder.parent == root / "data" / "artifacts" and calls == []
    value, folder = cached(**_step("spectrum", 7, calls))  # not a loaded kind: computed into scratch
    assert value == 7 and folder.parent == root / "data" / "scratch" / "lab" and calls == [("spectrum", 7)]
    value, folder = cached(**_step("finetune", 8, calls))  # a loaded kind not published: computed into scratch
    assert folder.parent == root / "data" / "scratch" / "lab" and calls[-1] == ("finetune", 8)
    assert _snapshot(root / "data" / "artifacts") == published  # nothing written there
    assert [(e.kind, e.how) for e in artifacts.ledger_entries()] == [
        ("finetune", ledger.PUBLISHED), ("spectrum", ledger.COMPUTED), ("finetune", ledger.COMPUTED)]
    assert artifacts.find("finetune", {"v": 7}).parent == root / "data" / "artifacts"
    assert artifacts.find("finetune", {"v": 9}) is None

    note = pages.live_note(profiles.get("lab"))
    assert "Computed when this page was executed: Hessian spectra (1), fine-tuned runs (1)." in note
    assert "Loaded read-only from the published results" in note and "fine-tuned runs (1)." in note
    ledger.clear()
    cached(**_step("spectrum", 7, calls))  # a second lab run: its own store's copy, computed by the first
    assert "Loaded from this profile's own store" in pages.live_note(profiles.get("lab"))
    # a run the lab cannot load is computed at the published profile, whose results the lab then loads
    assert "--profile cpu hawq" in pages.missing_runs({"hawq": {0: None}}, "lab")
    assert "--profile smoke hawq" in pages.missing_runs({"hawq": {0: None}}, "smoke")
    assert pages.live_note(profiles.get("cpu")).count("\n") == 0  # the published page: one line

    # a published copy that fails verification is an error, never passed over for a recomputation
    (root / "data" / "artifacts" / f"finetune-{artifacts.config_hash({'v': 7})}" / "v.txt").write_text("70")
    with pytest.raises(ArtifactError, match="v.txt"):
        cached(**_step("finetune", 7, calls))
