"""Where artifacts and caches go: never the package's location (hawqlib.repro.paths)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from hawqlib.repro import artifacts, data, paths

ROOT = Path(__file__).resolve().parents[1]


def test_outside_a_checkout_the_store_is_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("HAWQ_ARTIFACTS", raising=False)
    monkeypatch.delenv("HAWQ_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert paths.is_checkout(Path(paths.__file__).resolve().parents[2])  # the package is imported from a checkout
    assert artifacts.artifacts_root() == tmp_path.resolve() / "hawq-artifacts"
    assert data.cache_dir() == tmp_path.resolve() / "hawq-cache"
    assert artifacts.artifact_dir("spectrum", {"a": 1}).parent == tmp_path.resolve() / "hawq-artifacts"


def test_in_a_checkout_subfolder_the_store_is_the_checkouts(monkeypatch):
    monkeypatch.delenv("HAWQ_ARTIFACTS", raising=False)
    monkeypatch.delenv("HAWQ_CACHE", raising=False)
    monkeypatch.chdir(ROOT / "notebooks")  # where a notebook's kernel runs
    assert artifacts.artifacts_root() == ROOT / "data" / "artifacts"
    assert data.cache_dir() == ROOT / "data" / "cache"


def test_a_profile_other_than_the_published_one_stores_in_scratch(tmp_path, monkeypatch):
    """A smoke run from a checkout (Study, the command line, or HAWQ_PROFILE) lands where git ignores it."""
    monkeypatch.delenv("HAWQ_ARTIFACTS", raising=False)
    monkeypatch.chdir(ROOT / "notebooks")
    paths.use_profile("smoke")
    assert artifacts.artifacts_root() == ROOT / "data" / "scratch" / "smoke"
    assert subprocess.run(["git", "check-ignore", "-q", str(ROOT / "data" / "scratch" / "smoke" / "x")],
                          cwd=ROOT).returncode == 0
    paths.use_profile("cpu")
    assert artifacts.artifacts_root() == ROOT / "data" / "artifacts"
    paths.use_profile(None)
    monkeypatch.setenv("HAWQ_PROFILE", "paper")
    assert artifacts.artifacts_root() == ROOT / "data" / "scratch" / "paper"
    monkeypatch.chdir(tmp_path)  # outside a checkout
    assert artifacts.artifacts_root() == tmp_path.resolve() / "hawq-artifacts" / "scratch" / "paper"
    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path / "mine"))  # the environment wins over the profile
    assert artifacts.artifacts_root() == tmp_path / "mine"


def test_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path / "a"))
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "c"))
    assert artifacts.artifacts_root() == tmp_path / "a" and data.cache_dir() == tmp_path / "c"


def test_the_first_checkout_up_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "hawqlib").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "book" / "executed").mkdir(parents=True)
    (tmp_path / "other" / "hawqlib").mkdir(parents=True)  # no pyproject.toml: not a checkout
    monkeypatch.delenv("HAWQ_ARTIFACTS", raising=False)
    assert paths.find_checkout(tmp_path / "book" / "executed") == tmp_path.resolve()
    assert paths.find_checkout(tmp_path / "other") == tmp_path.resolve()
    monkeypatch.chdir(tmp_path / "book" / "executed")
    assert artifacts.artifacts_root() == tmp_path.resolve() / "data" / "artifacts"


def test_an_installed_package_finds_the_checkout_from_the_working_directory(tmp_path):
    """A copy of the package outside any checkout (as in site-packages) never writes beside itself."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(ROOT / "hawqlib" / "repro" / "paths.py", site / "paths.py")  # the module alone: no package, no torch
    work = tmp_path / "work"
    work.mkdir()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import paths; "
            "print(paths.project_root()); print(paths.artifacts_root())")
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=work, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(work.resolve()), str(work.resolve() / "hawq-artifacts")]
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=ROOT / "notebooks", env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(ROOT), str(ROOT / "data" / "artifacts")]
