"""The package, kernels/ and benchmarks/ use their dependencies' public APIs only (issue 15).

A private module or attribute of a dependency (`from torch._x import ...`, `import transformers._y`,
`torch._dynamo....`, a `_name` imported from a dependency module) can change or vanish in any release.
The scan reads the source (AST), follows names bound by imports, and lists every private use it finds.
`ALLOWED` holds the few uses no public API replaces, each with the reason; keep it minimal.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("ascend_edit", "kernels", "benchmarks")
OWN_PACKAGES = {"ascend_edit", "kernels", "benchmarks", "tests", "conf", "__future__"}

# (file relative to the repository, the private use as written): why no public API serves.
ALLOWED = {
    ("ascend_edit/attention/cache_layers.py", "torch._dynamo.mark_static_address"):
        "fixed cache addresses for compiled / CUDA-graph decode: torch.compiler has no public equivalent "
        "(torch 2.13), and transformers' own static cache layers mark their tensors the same way",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _chain(node: ast.AST) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None when the chain does not start at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def private_uses(source: str) -> list[str]:
    """Every private module or attribute of a dependency that `source` imports or reads."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> the dependency's dotted module or attribute it names
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OWN_PACKAGES:
                    continue
                if any(_private(part) for part in alias.name.split(".")):
                    found.append(f"import {alias.name}")
                local = alias.asname or alias.name.split(".")[0]
                bound[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom):
            if node.level or not node.module or node.module.split(".")[0] in OWN_PACKAGES:
                continue
            for alias in node.names:
                if any(_private(part) for part in [*node.module.split("."), alias.name]):
                    found.append(f"from {node.module} import {alias.name}")
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue  # whole chains only, from their outermost attribute
        chain = _chain(node)
        if chain and chain[0] in bound and any(_private(part) for part in chain[1:]):
            found.append(".".join([bound[chain[0]], *chain[1:]]))
    return found


def _scanned_files() -> list[Path]:
    return sorted(path for root in SCANNED for path in (REPO / root).rglob("*.py"))


def test_no_private_dependency_internals():
    problems = []
    for path in _scanned_files():
        relative = path.relative_to(REPO).as_posix()
        problems += [f"{relative}: {use}" for use in private_uses(path.read_text())
                     if (relative, use) not in ALLOWED]
    assert not problems, "private internals of dependencies (use a public API):\n" + "\n".join(problems)


def test_allowed_uses_still_exist():
    # A stale allowance would silently permit the use again elsewhere in that file.
    present = {(path.relative_to(REPO).as_posix(), use) for path in _scanned_files()
               for use in private_uses(path.read_text())}
    assert set(ALLOWED) <= present, sorted(set(ALLOWED) - present)


@pytest.mark.parametrize("source, expected", [
    ("from torch._dynamo import config", ["from torch._dynamo import config"]),
    ("import transformers._private.x as x", ["import transformers._private.x"]),
    ("from transformers.utils import _helper", ["from transformers.utils import _helper"]),
    ("import torch\ntorch._inductor.config.x = 1", ["torch._inductor.config.x"]),
    ("import torch.nn.functional as F\nF._pad(1)", ["torch.nn.functional._pad"]),
    ("from deepspeed import zero\nzero._hidden()", ["deepspeed.zero._hidden"]),
    ("import torch\ntorch.compiler.is_compiling(); torch.__version__", []),
    ("from ascend_edit.x import _own\nself._x = 1", []),
])
def test_scan_finds_private_uses(source, expected):
    assert private_uses(source) == expected
