"""Code versions in artifact keys follow results, not source text (``result_cases.py`` explains the rule).

A computation cannot change under an unchanged version (each version's fixed case is recomputed and compared
with the numbers recorded beside the version's value), and every committed key is still the one the code computes
(so no stored result is orphaned, or recomputed, by accident).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import result_cases as rc

from hawqlib import quant
from hawqlib.repro import artifacts, cached_quantize, damage, pipeline
from hawqlib.repro.baseline import TRAIN_CODE_VERSION

ROOT = Path(__file__).resolve().parents[1]
RECORD = json.loads(rc.RECORD.read_text())
REFRESH = ".venv/bin/python tests/result_cases.py"


def test_every_version_has_a_recorded_case():
    assert set(RECORD) == set(rc.CASES), f"re-record with `{REFRESH}`"


@pytest.mark.parametrize("constant", sorted(rc.CASES))
def test_a_computation_cannot_change_under_an_unchanged_version(constant):
    recorded = RECORD[constant]
    now = rc.value(constant)
    assert recorded["value"] == now, (f"{constant} was bumped ({recorded['value']!r} -> {now!r}): re-record its case "
                                      f"with `{REFRESH}` and commit tests/result_records.json")
    diffs = rc.differences(recorded["outputs"], rc.compute(constant))
    assert not diffs, (f"what {constant} versions computes something else at an unchanged version {now!r}: bump it "
                       f"(its stored artifacts are then recomputed) or undo the change. First differences:\n  "
                       + "\n  ".join(diffs[:10]))


def test_the_comparison_tells_a_changed_number_from_rounding():
    rec = {"a": [1.0, 2.0], "b": {"c": 3, "d": "x"}}
    assert rc.differences(rec, {"a": [1.0 + 1e-9, 2.0], "b": {"c": 3, "d": "x"}}) == []
    assert rc.differences(rec, {"a": [1.001, 2.0], "b": {"c": 3, "d": "x"}}) == [".a[0]: recorded 1.0, now 1.001"]
    assert rc.differences(rec, {"a": [1.0], "b": {"c": 4, "d": "x"}}) == [".a: 2 values recorded, 1 now",
                                                                         ".b.c: recorded 3, now 4"]
    assert rc.differences(rec, {"a": [1.0, 2.0], "b": {"c": 3}}) == [".b.d: only in the record"]


def _code_of(kind: str):
    if kind.startswith("baseline_"):
        return TRAIN_CODE_VERSION
    if kind in ("spectrum", "traces", "landscape"):
        return pipeline._hessian_code()
    if kind == "finetune":
        return pipeline._finetune_code()
    if kind == cached_quantize.KIND:
        return cached_quantize.code_versions()
    if kind in ("damage", "calibrated"):
        return {"step": damage.DAMAGE_STEP_VERSION, "quant": quant.CODE_VERSION}
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
