"""Fingerprints of the code behind each code version that enters an artifact key.

Each version constant (``VERSIONS``) versions some source: whole files (globs allowed) or single top-level
definitions (``file:name``). Its fingerprint is the SHA-256 of that source parsed and unparsed with docstrings
dropped (``ast``: comments and formatting go too), so editing prose never trips it. ``code_fingerprints.json``
records, for each constant, its value and that fingerprint; ``test_code_versions.py`` fails when the code
changed while the value did not. Then either

- the change alters results: bump the constant (every artifact it keys is then recomputed), or
- it does not (a refactor, a new check, a message): refresh the record with ``.venv/bin/python tests/fingerprints.py``

and commit ``tests/code_fingerprints.json`` with the change. Values are read from the source (``NAME = <literal>``),
so the refresh imports nothing.
"""
from __future__ import annotations

import ast
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).with_name("code_fingerprints.json")
REFRESH = ".venv/bin/python tests/fingerprints.py"

_PIPE = "hawqlib/pipeline.py"
#: version constant ("module.NAME") -> what it versions; the constant's module is where its value is read.
VERSIONS: dict[str, list[str]] = {
    "hawqlib.baseline.TRAIN_CODE_VERSION": [
        "hawqlib/train.py", "hawqlib/data.py", "hawqlib/batches.py", "hawqlib/models/*.py", "hawqlib/sources.py",
        "hawqlib/baseline.py"],
    "hawqlib.pipeline.HESSIAN_STEP_VERSION": [
        "hawqlib/hessian/*.py", "hawqlib/surface.py", "hawqlib/blocks.py", "hawqlib/models/*.py", "hawqlib/imagenet.py",
        "hawqlib/data.py:sample_batch", "hawqlib/sources.py", f"{_PIPE}:hessian_batch", f"{_PIPE}:_sample_key",
        f"{_PIPE}:_SPECTRUM_KEYS", f"{_PIPE}:spectrum", f"{_PIPE}:block_traces", f"{_PIPE}:landscape"],
    "hawqlib.pipeline.FINETUNE_STEP_VERSION": [
        "hawqlib/finetune.py", "hawqlib/size.py", "hawqlib/train.py:evaluate", "hawqlib/sources.py",
        f"{_PIPE}:_FT_KEYS", f"{_PIPE}:_FT_OPTIONAL", f"{_PIPE}:FinetuneResult", f"{_PIPE}:finetuned", f"{_PIPE}:finetune_epochs",
        "hawqlib/distill.py"],
    "hawqlib.quant.CODE_VERSION": ["hawqlib/quant/*.py", "hawqlib/bitconfig.py"],
    "hawqlib.export.CODE_VERSION": ["hawqlib/export.py"],
    "hawqlib.cached_quantize.STEP_VERSION": [
        "hawqlib/cached_quantize.py", "hawqlib/workflow.py", "hawqlib/allocate.py", "hawqlib/order.py",
        "hawqlib/sensitivity.py"],
}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _defined(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


def _source(entry: str) -> list[tuple[str, str]]:
    """``(name, normalized source)`` of each file or definition ``entry`` names; an entry matching nothing raises."""
    path, _, name = entry.partition(":")
    files = sorted(ROOT.glob(path))
    if not files:
        raise FileNotFoundError(f"{entry}: no such file (edit VERSIONS in tests/fingerprints.py)")
    out = []
    for f in files:
        tree = _strip_docstrings(ast.parse(f.read_text(), filename=str(f)))
        rel = f.relative_to(ROOT).as_posix()
        if not name:
            out.append((rel, ast.unparse(tree)))
            continue
        nodes = [n for n in tree.body if name in _defined(n)]
        if not nodes:
            raise LookupError(f"{entry}: no top-level {name!r} in {rel} (edit VERSIONS in tests/fingerprints.py)")
        out.append((f"{rel}:{name}", "\n".join(ast.unparse(n) for n in nodes)))
    return out


def fingerprint(constant: str) -> str:
    """SHA-256 of the docstring-free source that ``constant`` versions."""
    h = hashlib.sha256()
    for entry in VERSIONS[constant]:
        for name, text in _source(entry):
            h.update(f"{name}\n{text}\n".encode())
    return h.hexdigest()


def value(constant: str):
    """The literal value assigned to ``constant`` at the top level of its module's source."""
    module, _, name = constant.rpartition(".")
    rel = module.replace(".", "/")
    f = ROOT / f"{rel}.py" if (ROOT / f"{rel}.py").is_file() else ROOT / rel / "__init__.py"
    for node in ast.parse(f.read_text()).body:
        if name in _defined(node):
            return ast.literal_eval(node.value)
    raise LookupError(f"{constant}: no top-level assignment in {f.relative_to(ROOT)}")


def current() -> dict:
    """Every constant's value and fingerprint as the code stands."""
    return {c: {"value": value(c), "sha256": fingerprint(c), "sources": VERSIONS[c]} for c in VERSIONS}


def refresh() -> None:
    RECORD.write_text(json.dumps(current(), indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    refresh()
    print(f"wrote {RECORD.relative_to(ROOT)}: {', '.join(VERSIONS)}", file=sys.stderr)
