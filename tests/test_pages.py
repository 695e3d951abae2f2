"""The per-seed table and the missing-run note every result page shares (hawqlib.repro.pages)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hawqlib.repro import pages
from hawqlib.repro.pages import SEED_COLUMNS, missing_runs, run_minutes, seeds_table


@dataclass
class _Run:  # the fields of hawqlib.repro.experiments' results the page helpers read
    top1: float
    packed_top1: float
    wall_s: float
    folder: Path
    history: dict = field(default_factory=dict)


def test_seeds_table_lists_every_seed_stored_or_not(tmp_path):
    runs = {"hawq": {0: _Run(91.75, 91.75, 3600.0, tmp_path / "finetune-aaa"), 1: None},
            "order-reverse": {0: _Run(92.12, 92.10, 5400.0, tmp_path / "finetune-bbb")}}
    frame = seeds_table(runs, level="method").data
    assert list(frame.index.names) == ["method", "seed"] and tuple(frame.columns) == SEED_COLUMNS
    assert list(frame.index) == [("hawq", 0), ("hawq", 1), ("order-reverse", 0)]
    assert frame.loc[("hawq", 1), "artifact"] == "not stored yet"
    assert frame.loc[("order-reverse", 0), "wall time (min)"] == 90.0
    assert frame.loc[("order-reverse", 0), "from packed file (%)"] == 92.10
    assert frame.loc[("hawq", 0), "artifact"] == "finetune-aaa"
    html = seeds_table(runs).to_html()
    assert "91.75" in html and "not stored yet" in html and "60.0" in html
    # the machine and threads are the provenance page's, not the argument's
    assert "threads" not in html
    # the run labels may wrap (the folder names then fit the text column); the folder names may not
    assert re.search(r"tbody th\.level0 \{\s*white-space: normal;", html)
    assert re.search(r"_col3 \{[^}]*white-space: nowrap;\s*\}", html)


def test_missing_runs_names_the_seeds_the_command_and_the_measured_time(tmp_path):
    done = _Run(91.75, 91.75, 3600.0, tmp_path)
    assert missing_runs({"hawq": {0: done}}, "cpu") == ""
    note = missing_runs({"hawq": {0: done, 2: None}, "alloc-reverse": {1: None},
                         "order-reverse": {0: _Run(92.1, 92.1, 7200.0, tmp_path)}}, "cpu")
    assert "hawq (seed 2), alloc-reverse (seed 1)." in note
    assert "`python -m hawqlib finetune --profile cpu hawq alloc-reverse`" in note
    assert "the stored runs take 60 to 120 minutes each" in note
    assert note.endswith("(the wall times in the table also count any time a run was paused).")
    one = missing_runs({"hawq": {0: done, 1: None}}, "smoke", what="them (each longer)")
    assert one.startswith("**Not stored yet, so not in the tables:** hawq (seed 1).")
    assert "computes them (each longer) and this page then loads them; at its median epoch time here, the " \
           "stored run takes 60 minutes" in one
    assert "minutes" not in missing_runs({"hawq": {0: None}}, "cpu")


def test_run_minutes_is_the_median_epoch_times_the_epochs_so_a_pause_does_not_count(tmp_path):
    # three 2-minute epochs (training 100 s + evaluation 20 s) and one that was paused for half an hour
    epochs = [{"wall_s": 100.0, "eval_s": 20.0}] * 3 + [{"wall_s": 1900.0, "eval_s": 20.0}]
    paused = _Run(92.0, 92.0, 2280.0, tmp_path, {"epochs": epochs})
    assert run_minutes(paused) == 8.0  # 4 epochs of 2 minutes, not the 38 minutes the manifest sums
    assert run_minutes(_Run(92.0, 92.0, 2280.0, tmp_path)) == 38.0  # no history: the summed wall time
    note = missing_runs({"hawq": {0: paused, 1: None}}, "cpu")
    assert "takes 8 minutes" in note and "38" not in note


def test_smoke_note_marks_smoke_pages_only_and_is_written_once():
    from hawqlib.repro import profiles

    assert pages.smoke_note(profiles.get("smoke")).startswith("*Smoke profile")
    assert pages.smoke_note(profiles.get("smoke")).rstrip().endswith("not results.*")
    assert pages.smoke_note(profiles.get("cpu")) == "" == pages.smoke_note(profiles.get("paper"))
    # the notebooks take it from here, not from a copy of their own
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    users = [nb.name for nb in notebooks.glob("*.ipynb") if "smoke_note(P)" in nb.read_text()]
    assert len(users) >= 4 and not [nb.name for nb in notebooks.glob("*.ipynb") if "Smoke profile" in nb.read_text()]
