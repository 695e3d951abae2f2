"""environment.yml and pyproject.toml describe the same environment; the CI script calls the README's command."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_reqs() -> dict[str, Requirement]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for extra in ("book", "test"):
        reqs += meta["optional-dependencies"][extra]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def _conda_reqs() -> dict[str, Requirement]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {Requirement(r).name.lower(): Requirement(r) for r in pip if not r.startswith("-e")}


def test_same_packages():
    py, conda = _pyproject_reqs(), _conda_reqs()
    assert sorted(py) == sorted(conda), f"only in pyproject: {set(py) - set(conda)}; only in environment.yml: {set(conda) - set(py)}"


def test_same_version_specifiers():
    py, conda = _pyproject_reqs(), _conda_reqs()
    diff = {n: (str(py[n].specifier), str(conda[n].specifier)) for n in py if py[n].specifier != conda[n].specifier}
    assert not diff, f"version specifiers differ (pyproject, environment.yml): {diff}"


def test_torch_pins_admit_the_disk_builds():
    py = _pyproject_reqs()
    assert py["torch"].specifier.contains("2.14.1")
    assert py["torchvision"].specifier.contains("0.29.1")


def test_environment_python_matches_requires_python():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    version = py.split("=")[-1]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(requires).contains(version + ".0")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^\s*(make \w+)", readme, flags=re.M)
    assert "make test" in commands and "make book" in commands, commands
    assert re.search(r"^make test$", ci, flags=re.M), ".ci/run must call the README's test command verbatim"
