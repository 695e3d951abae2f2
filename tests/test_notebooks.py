"""nbval over every notebook at the smoke profile: a second execution reproduces the first's outputs.

The first execution is the smoke run of the book runner (papermill, ``profile = "smoke"`` injected;
shared with test_book.py, see _book_smoke.py). nbval then re-executes each executed copy in a fresh
kernel and compares every output cell by cell: printed text, tables and glued values must be
identical. What legitimately varies is sanitized (tests/nbval_sanitize.cfg: durations, clock
times, progress bars, memory addresses, temporary paths), and a cell whose glued values are wall
times (glue keys naming seconds, hours, wall time or throughput) has its output ignored. Images are
not compared (nbval's default); test_book.py checks they exist.

The second execution reuses the artifacts the first one stored (in the run's temporary artifacts
folder), so it checks that a notebook rendered from stored artifacts shows exactly what it showed
when it computed them. ``HAWQ_NBVAL_FORCE=1`` makes the second execution recompute everything
instead, which checks bit-identical recomputation at twice the cost.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from hawqlib.repro import book

from _book_smoke import ROOT, smoke_book

SANITIZE = Path(__file__).with_name("nbval_sanitize.cfg")
#: Glue keys whose values are measured times or speeds: their cell's output is not compared.
TIME_KEY = re.compile(r"(^|_)(wall|time|times|timing|seconds|elapsed|speed|throughput|machine)(_|$)|_(s|h|ms|min)$"
                      r"|per_s")


def time_cells(nb) -> list[int]:
    """Indices of code cells that glue a time-like key."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        names = [o.get("metadata", {}).get("scrapbook", {}).get("name", "") for o in cell.get("outputs", [])]
        if any(n and TIME_KEY.search(n) for n in names):
            out.append(i)
    return out


def test_time_key_pattern():
    for key in ("baseline_wall_h", "baseline_epoch_s", "baseline_images_per_s", "hessian_time_total",
                "ablation_machine"):
        assert TIME_KEY.search(key), key
    for key in ("baseline_top1", "hessian_lambda_max", "bit_allocation_sizes", "resnet20_cifar10_table"):
        assert not TIME_KEY.search(key), key


def _sanitize(text: str) -> str:
    from nbval.plugin import get_sanitize_patterns

    patterns = get_sanitize_patterns(SANITIZE.read_text())
    assert len(patterns) >= 8
    for regex, replace in patterns:
        text = re.sub(regex, replace, text)
    return text


def test_sanitize_hides_what_varies_and_keeps_results():
    varies = ("trained in 0.01 h on 2 CPU cores; epoch 32.1 s, 12 ms per batch, finished 2026-11-26T23:23:22Z\n"
              "train:  45%|####5     | 9/20 [00:04<00:05,  2.10it/s]\n"
              "<function f at 0x7f3a2b1c9d30> wrote /tmp/pytest-of-root/x/y.pt\n"
              '<style>#T_1a2b3_row0_col0 {}</style><table id="T_1a2b3">')
    a = _sanitize(varies)
    b = _sanitize(varies.replace("0.01 h", "0.02 h").replace("32.1 s", "30.9 s").replace("12 ms", "13 ms")
                  .replace("23:23:22", "23:59:01").replace("45%|####5  ", "50%|#####  ")
                  .replace("0x7f3a2b1c9d30", "0x7f00deadbeef").replace("pytest-of-root/x", "pytest-of-root/z")
                  .replace("1a2b3", "9f8e7"))
    assert a == b
    keeps = "test top-1 17.80%, lambda 0.5618, 20 blocks, 13.1x smaller, 4 bits, S_i 1.2e-05"
    assert _sanitize(keeps) == keeps
    # a glued figure's base64 payload (one long line) is replaced as a whole, before the other patterns
    png = "iVBORw0KGgo" + "AbCd0123+/" * 20000
    assert _sanitize(png) == "BASE64-DATA" == _sanitize(png.replace("AbCd", "XyZw"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, cifar_root):
    return smoke_book(tmp_path_factory.mktemp("smoke_book"), cifar_root)


@pytest.mark.parametrize("name", book.NOTEBOOKS)
def test_notebook_reproduces_its_outputs(name, smoke, tmp_path):
    if name not in book.available(ROOT / "notebooks"):
        pytest.skip(f"notebooks/{name}.ipynb does not exist yet")
    executed = smoke.executed / f"{name}.ipynb"
    assert executed.is_file(), f"the smoke run did not execute {name}:\n{smoke.output[-4000:]}"
    nb = nbformat.read(executed, as_version=4)
    assert nb.metadata["papermill"]["parameters"] == {"profile": "smoke"}
    for i in time_cells(nb):
        tags = nb.cells[i].metadata.setdefault("tags", [])
        if "nbval-ignore-output" not in tags:
            tags.append("nbval-ignore-output")
    copy = tmp_path / f"{name}.ipynb"
    nbformat.write(nb, copy)
    env = dict(smoke.env)
    if os.environ.get("HAWQ_NBVAL_FORCE", "") not in ("", "0"):
        env["FORCE"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
                           "--nbval-current-env", "--nbval-sanitize-with", str(SANITIZE),
                           "--nbval-cell-timeout", "1200", str(copy)],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"nbval found differences or errors in {name}:\n{proc.stdout[-8000:]}"
    assert re.search(r"\d+ passed", proc.stdout)


def _documented_glue_keys(text: str) -> set[str]:
    """The keys notebooks/GLUE.md lists: first cell of each table row, ``a / _b`` rows abbreviating
    ``<section>_b`` and ``x_{p,q}_y`` rows standing for ``x_p_y`` and ``x_q_y``."""
    keys, section = set(), None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        m = re.match(r"\|\s*([^|]+?)\s*\|", line)
        if not m or section is None:
            continue
        for part in m.group(1).split(" / "):
            part = part.strip().strip("`")
            part = section + part if part.startswith("_") else part
            brace = re.search(r"\{([^}]*)\}", part)
            alts = brace.group(1).split(",") if brace else [""]
            keys |= {part[:brace.start()] + a.strip() + part[brace.end():] if brace else part for a in alts}
    return keys


def test_every_glued_key_is_documented_in_glue_md():
    """A key a notebook glues is listed in notebooks/GLUE.md (a key built in an f-string: some listed key
    of that shape), so the book's authors can find what each one means."""
    documented = _documented_glue_keys((ROOT / "notebooks" / "GLUE.md").read_text())
    undocumented = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        keys = re.findall(r'glue\(\s*(f?)"([A-Za-z0-9_{}.\[\]\'-]+)"', code)
        assert keys, f"{path.name} glues nothing: the pattern no longer finds its glue calls"
        for is_f, key in keys:
            if is_f and "{" in key:  # f"ablation_allocation_{pol}_top1": some documented key of that shape
                shape = re.compile("^" + re.sub(r"\\\{[^}]*\\\}", "[a-z0-9_]+", re.escape(key)) + "$")
                ok = any(shape.match(k) for k in documented)
            else:
                ok = key in documented
            if not ok:
                undocumented.append(f"{path.name}: {key}")
    assert not undocumented, f"glue keys missing from notebooks/GLUE.md: {undocumented}"
