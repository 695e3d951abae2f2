"""The two floors: the method (hawqlib) imports nothing of the companion (hawqlib.repro), and nothing imports in a
cycle. Read from the source (every import statement, at the top of a module or inside a function), and checked
once more in a fresh interpreter."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hawqlib"
COMPANION = "hawqlib.repro"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports() -> dict[str, set[str]]:
    """Every hawqlib module and the hawqlib modules it imports (submodules named in ``from x import y`` count)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = _module(path)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.split(".")[0] == "hawqlib"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "hawqlib":
                    continue
                subs = {f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")}
                out |= subs or {target}
                if len(subs) < len(node.names):
                    out.add(target)
        graph[mod] = out - {mod}
    return graph


def _floor(mod: str) -> str:
    return "companion" if mod == COMPANION or mod.startswith(COMPANION + ".") else "method"


def test_the_method_imports_nothing_of_the_companion():
    bad = sorted(f"{m} imports {t}" for m, ts in imports().items() if _floor(m) == "method"
                 for t in ts if _floor(t) == "companion")
    # __main__ is the one-line shim of `python -m hawqlib`, which is the companion's command line
    bad = [b for b in bad if not b.startswith("hawqlib.__main__ ")]
    assert not bad, "the method floor must not import the companion floor:\n  " + "\n  ".join(bad)


def test_no_import_cycle():
    graph = imports()
    # a package's __init__ importing its own submodules is how packages work; a submodule importing its package
    # back is not followed (it only reads names the __init__ has already bound)
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            visit(t)
        stack.pop()

    for m in sorted(edges):
        visit(m)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_importing_hawqlib_loads_no_companion_module():
    code = "import json, sys, hawqlib; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = [m for m in json.loads(out.stdout) if m.startswith("hawqlib")]
    assert "hawqlib.workflow" in loaded and not [m for m in loaded if _floor(m) == "companion"], loaded


def test_the_import_reader_sees_a_forbidden_import(tmp_path, monkeypatch):
    (tmp_path / "hawqlib" / "repro").mkdir(parents=True)
    (tmp_path / "hawqlib" / "__init__.py").write_text("")
    (tmp_path / "hawqlib" / "repro" / "__init__.py").write_text("")
    (tmp_path / "hawqlib" / "repro" / "cache.py").write_text("from .. import core\n")
    (tmp_path / "hawqlib" / "core.py").write_text("def f():\n    from .repro import cache\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "hawqlib")
    graph = imports()
    assert graph["hawqlib.core"] == {"hawqlib.repro.cache"} and graph["hawqlib.repro.cache"] == {"hawqlib.core"}


#: The method's core as the README counts it (the front door, Hessian, quantizers, allocation, order, staged
#: fine-tuning, size, export), what goes beyond the paper (the exact Gauss-Newton route and its proof,
#: distillation, the successors' allocations and the damage predictors), its support, the models and the companion.
BEYOND = ["hessian/gauss_newton.py", "hessian/identity.py", "hessian/proof.py", "distill.py", "allocators.py",
          "predictors.py"]
PARTS = {
    "METHOD": ["__init__.py", "workflow.py", "hessian/*.py", "quant/*.py", "bitconfig.py", "blocks.py",
               "sensitivity.py", "allocate.py", "order.py", "finetune.py", "size.py", "export.py"],
    "BEYOND": BEYOND,
    "SUPPORT": ["train.py", "distributed.py", "surface.py", "files.py", "packfile.py", "progress.py", "__main__.py"],
    "MODEL": ["models/*.py"],
    "COMPANION": ["repro/**/*.py"],
}


def _files(part: str) -> set:
    files = {p for g in PARTS[part] for p in PACKAGE.glob(g)}
    if part == "METHOD":  # beyond the paper is counted apart
        files -= {p for g in BEYOND for p in PACKAGE.glob(g)}
    return files


def line_counts() -> dict[str, int]:
    return {part: sum(len(p.read_text().splitlines()) for p in _files(part)) for part in PARTS}


def test_every_module_is_counted_once_and_the_core_stays_small():
    counted = [p for part in PARTS for p in _files(part)]
    assert sorted(counted) == sorted(set(counted)) == sorted(PACKAGE.rglob("*.py"))
    assert line_counts()["METHOD"] <= 5000, "the method's core grew past 5,000 lines: split what is not the method"


def test_the_readme_gives_the_line_counts_of_the_files():
    readme = (ROOT / "README.md").read_text()
    missing = [f"**{n:,} lines**" if part == "METHOD" else f"**{n:,}**" for part, n in line_counts().items()
               if (f"**{n:,} lines**" if part == "METHOD" else f"**{n:,}**") not in readme]
    assert not missing, f"README.md's layout section should say {missing} (the line counts of the files today)"


if __name__ == "__main__":  # print the figures for README.md
    print(line_counts())
