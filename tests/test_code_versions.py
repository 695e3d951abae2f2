"""Code versions in artifact keys: code cannot change silently under an old version, and every committed key
is still the one the code computes (so no stored result is orphaned or recomputed by accident)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import fingerprints
import pytest

from hawqlib import artifacts, cached_quantize, pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_code_cannot_change_under_an_unchanged_version():
    record = json.loads(fingerprints.RECORD.read_text())
    problems = []
    for constant in fingerprints.VERSIONS:
        now = {"value": fingerprints.value(constant), "sha256": fingerprints.fingerprint(constant)}
        old = record.get(constant)
        module, _, name = constant.rpartition(".")
        if old is None:
            problems.append(f"{constant} has no recorded fingerprint: run `{fingerprints.REFRESH}`")
        elif old["value"] != now["value"]:
            problems.append(f"{constant} was bumped ({old['value']!r} -> {now['value']!r}): record the new code "
                            f"with `{fingerprints.REFRESH}` and commit tests/code_fingerprints.json")
        elif old["sha256"] != now["sha256"] or old.get("sources") != fingerprints.VERSIONS[constant]:
            problems.append(
                f"the code that {name} (in {module}) versions changed ({', '.join(fingerprints.VERSIONS[constant])}) "
                f"but {name} is still {now['value']!r}. If the change alters stored results, bump {name} "
                f"(its artifacts are then recomputed); if it does not, refresh the fingerprint with "
                f"`{fingerprints.REFRESH}` and commit tests/code_fingerprints.json")
    stale = sorted(set(record) - set(fingerprints.VERSIONS))
    if stale:
        problems.append(f"recorded but no longer versioned: {stale}; run `{fingerprints.REFRESH}`")
    assert not problems, "\n".join(problems)


def test_recorded_values_are_the_ones_the_package_reads():
    for constant in fingerprints.VERSIONS:
        module, _, name = constant.rpartition(".")
        assert getattr(importlib.import_module(module), name) == fingerprints.value(constant), constant


def test_docstrings_and_comments_do_not_change_a_fingerprint(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text('"""doc"""\nX = 1\n\n\ndef f(a):\n    """doc"""\n    return a + 1  # why\n')
    monkeypatch.setattr(fingerprints, "ROOT", tmp_path)
    monkeypatch.setitem(fingerprints.VERSIONS, "m.X", ["m.py"])
    monkeypatch.setitem(fingerprints.VERSIONS, "m.Y", ["m.py:f"])
    a, fa = fingerprints.fingerprint("m.X"), fingerprints.fingerprint("m.Y")
    (tmp_path / "m.py").write_text('"""other prose"""\nX = 1\n\n\ndef f(a):\n    """more"""\n\n    return (a + 1)\n')
    assert fingerprints.fingerprint("m.X") == a and fingerprints.fingerprint("m.Y") == fa
    assert fingerprints.value("m.X") == 1
    (tmp_path / "m.py").write_text('X = 1\n\n\ndef f(a):\n    return a + 2\n')
    assert fingerprints.fingerprint("m.X") != a and fingerprints.fingerprint("m.Y") != fa


def _code_of(kind: str):
    if kind.startswith("baseline_"):
        return pipeline.TRAIN_CODE_VERSION
    if kind in ("spectrum", "traces", "landscape"):
        return pipeline._hessian_code()
    if kind == "finetune":
        return pipeline._finetune_code()
    if kind == cached_quantize.KIND:
        return cached_quantize.code_versions()
    raise AssertionError(f"no code version known for artifacts of kind {kind!r}: add it here")


def test_every_committed_artifact_key_is_what_the_code_computes():
    manifests = sorted((ROOT / "data" / "artifacts").glob(f"*/{artifacts.MANIFEST}"))
    if not manifests:
        pytest.skip("no committed artifacts in this checkout")
    for m in manifests:
        kind, _, key = m.parent.name.rpartition("-")
        params = json.loads(m.read_text())["params"]
        assert params["code"] == _code_of(kind), f"{m.parent.name}: its key was made by other code versions"
        assert artifacts.config_hash({**params, "code": _code_of(kind)}) == key, m.parent.name
