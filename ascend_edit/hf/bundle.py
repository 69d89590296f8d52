"""Bundle the package's modeling code into an exported checkpoint, self-contained.

A checkpoint exported with `auto_map` must load where ascend_edit is not installed, so the code it
ships may import only torch, transformers and the standard library. Rather than keep a second,
hand-written copy of the attention math, the bundler copies the package's own modules: starting from
`ascend_edit.hf.modeling` it follows every `from ascend_edit... import` (and relative import), writes
each module as a flat sibling file (`ascend_edit.attention.mla` -> `ascend_edit_attention_mla.py`)
with those imports rewritten to `from .ascend_edit_attention_mla import ...`, and adds the entry file
`modeling_ascend_edit.py` holding the two classes bound to the teacher's architecture. transformers'
remote-code loader copies a module's relative imports along with it, so the whole set loads as one.
Module boundaries and comments are kept as they are: no name can clash, and the code stays readable.

What is checked rather than trusted (a `BundleError` names the module):
* an `ascend_edit` import whose names appear only in annotations (a config dataclass in a type hint)
  is removed instead of followed: it would otherwise drag in Hydra;
* a module may import only torch, transformers and the standard library (imports inside `try:` are
  optional and allowed, as transformers allows them);
* `ascend_edit` imports must be top-level `from ... import` statements, so every one is rewritten.

`SUBSTITUTES` swaps a module for a bundle-specific one with the same interface: the kernel registry
(lazy, device-specific backends) becomes `ascend_edit.hf.kernels` (portable backends).

Why not transformers' own `custom_object_save` / `register_for_auto_class` (checked against the pinned
transformers 5.x source): it copies the file that defines the class plus the files named by its *relative*
imports, resolved as siblings in the same directory (`<dir>/<name>.py`), and copies nothing an absolute
import names. The modeling code here spans several sub-packages (`hf/`, `attention/`, `kernels/`) with
absolute imports, and an annotation-only import of a config dataclass would drag in Hydra; saved that way, the
checkpoint would ship one file that imports `ascend_edit` and fail to load where it is not installed. Turning
every import into a same-directory relative one would mean flattening the package itself. What transformers
does do is load the result: the flat files written here use exactly the sibling relative imports its
remote-code loader follows, and `auto_map` is written as it expects.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT_MODULE = "ascend_edit.hf.modeling"
MODELING_FILE = "modeling_ascend_edit.py"
MODEL_TYPE = "ascend_edit"
CONFIG_CLASS = "AscendEditConfig"
CAUSAL_LM_CLASS = "AscendEditForCausalLM"
PACKAGE = "ascend_edit"
# Third-party packages bundled code may import outside `try:`; everything else must be the standard library.
ALLOWED_PACKAGES = frozenset({"torch", "transformers"})
SUBSTITUTES = {"ascend_edit.kernels.registry": "ascend_edit.hf.kernels"}


class BundleError(RuntimeError):
    """The package source cannot be bundled into a self-contained checkpoint."""


def flat_file_stem(module: str) -> str:
    """`ascend_edit.attention.mla` -> `ascend_edit_attention_mla` (checkpoint files are flat)."""
    return module.replace(".", "_")


@dataclass
class _Module:
    name: str
    source: str
    tree: ast.Module
    # top-level ascend_edit imports: node -> absolute module it must import from (None: drop it)
    rewrites: dict[int, tuple[ast.ImportFrom, str | None]]


def _annotation_only(tree: ast.Module) -> dict[str, bool]:
    """For every Name in the module: True if it only ever appears inside annotations."""
    in_annotation: set[int] = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            annotations += [node.returns] + [a.annotation for a in [*args.posonlyargs, *args.args,
                                                                      *args.kwonlyargs, args.vararg, args.kwarg] if a]
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in filter(None, annotations):
            in_annotation.update(id(sub) for sub in ast.walk(annotation))
    only: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            only[node.id] = only.get(node.id, True) and id(node) in in_annotation
    return only


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _try_bodies(tree: ast.Module) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for stmt in node.body:
                inside.update(id(sub) for sub in ast.walk(stmt))
    return inside


def _read_module(name: str) -> _Module:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise BundleError(f"cannot find the Python source of module {name}")
    source = Path(spec.origin).read_text()
    tree = ast.parse(source, filename=spec.origin)
    is_package = spec.submodule_search_locations is not None
    annotation_only, optional = _annotation_only(tree), _try_bodies(tree)
    top_level = {id(node) for node in tree.body}
    rewrites: dict[int, tuple[ast.ImportFrom, str | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                _check_external(alias.name, name, optional=id(node) in optional)
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        target = _absolute(node, name, is_package)
        if target.split(".")[0] != PACKAGE:
            if target != "__future__":
                _check_external(target, name, optional=id(node) in optional)
            continue
        if id(node) not in top_level:
            raise BundleError(f"{name}: '{ast.unparse(node)}' is not a top-level import and cannot be rewritten")
        if all(annotation_only.get(alias.asname or alias.name, True) for alias in node.names):
            rewrites[id(node)] = (node, None)  # type hints only: unevaluated under postponed annotations
        else:
            rewrites[id(node)] = (node, SUBSTITUTES.get(target, target))
    return _Module(name, source, tree, rewrites)


def _check_external(module: str, importer: str, optional: bool) -> None:
    top = module.split(".")[0]
    if top == PACKAGE:
        raise BundleError(f"{importer}: 'import {module}' cannot be rewritten; use 'from {module} import ...'")
    if not optional and top not in ALLOWED_PACKAGES and top not in sys.stdlib_module_names:
        raise BundleError(f"{importer} imports '{top}': an exported checkpoint may depend only on "
                          f"{sorted(ALLOWED_PACKAGES)} and the standard library")


def _rewritten_source(module: _Module) -> str:
    lines = module.source.splitlines()
    for node, target in sorted(module.rewrites.values(), key=lambda item: -item[0].lineno):
        replacement = []
        if target is not None:
            names = ", ".join(ast.unparse(alias) for alias in node.names)
            replacement = [f"from .{flat_file_stem(target)} import {names}"]
        lines[node.lineno - 1: node.end_lineno] = replacement
    header = f"# {module.name}, bundled by `ascend-edit export` (package imports made relative)."
    return "\n".join([header, *lines]) + "\n"


def bundled_modules(root: str = ROOT_MODULE) -> dict[str, str]:
    """Every module the root needs (package imports rewritten), as {flat file name: source}."""
    files: dict[str, str] = {}
    pending = [root]
    while pending:
        name = pending.pop()
        file_name = flat_file_stem(name) + ".py"
        if file_name in files:
            continue
        module = _read_module(name)
        files[file_name] = _rewritten_source(module)
        pending += [target for _, target in module.rewrites.values() if target is not None]
    return files


def _entry_source(config_cls: type, causal_lm_cls: type) -> str:
    from ascend_edit import __version__

    mixin_file = flat_file_stem(ROOT_MODULE)
    return f'''"""Modeling code of an ascend_edit export: {causal_lm_cls.__name__} with converted attention layers.

Generated by ascend_edit {__version__}; the `ascend_edit_*.py` files beside this one are the package's own
modules with their imports made relative. Needs only torch and transformers. Regenerate with
`ascend-edit export` rather than editing.
"""
from {config_cls.__module__} import {config_cls.__name__} as _TeacherConfig
from {causal_lm_cls.__module__} import {causal_lm_cls.__name__} as _TeacherForCausalLM

from .{mixin_file} import AscendEditCausalLMMixin


class {CONFIG_CLASS}(_TeacherConfig):
    """`{config_cls.__name__}` plus the per-layer conversion plan, in the `ascend_edit` attribute."""

    model_type = "{MODEL_TYPE}"


class {CAUSAL_LM_CLASS}(AscendEditCausalLMMixin, _TeacherForCausalLM):
    """`{causal_lm_cls.__name__}` with the converted attention modules in the layers the plan lists."""

    config_class = {CONFIG_CLASS}
'''


def write_modeling_code(directory: Path, config_cls: type, causal_lm_cls: type) -> dict[str, str]:
    """Write the entry file and the bundled modules into `directory`; returns the config's `auto_map`."""
    files = {MODELING_FILE: _entry_source(config_cls, causal_lm_cls), **bundled_modules()}
    for file_name, source in files.items():
        compile(source, file_name, "exec")  # a syntax error here is a bundler bug: fail before writing
    for file_name, source in files.items():
        (Path(directory) / file_name).write_text(source)
    stem = MODELING_FILE.removesuffix(".py")
    return {"AutoConfig": f"{stem}.{CONFIG_CLASS}", "AutoModelForCausalLM": f"{stem}.{CAUSAL_LM_CLASS}"}
