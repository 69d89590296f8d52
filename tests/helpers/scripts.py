"""Load a script of benchmarks/ (not a package) as a module, for tests of its pure-Python parts."""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@contextmanager
def benchmark_script(name: str, module_name: str | None = None) -> Iterator[ModuleType]:
    """`benchmarks/<name>.py` as a module registered under `module_name` (default `name`) while in use:
    its dataclasses resolve their annotations through `sys.modules`."""
    module_name = module_name or name
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(module_name, None)
