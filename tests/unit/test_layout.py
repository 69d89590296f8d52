"""Packaging invariants: kernels ship as ascend_edit.kernels, never as a top-level `kernels`."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_transformers_sees_no_kernels_package_from_repo_root():
    # From the repository root, kernels/ is importable as a plain folder (cwd is on sys.path);
    # transformers must still not believe Hugging Face's `kernels` package is installed.
    try:
        importlib.metadata.version("kernels")
        pytest.skip("Hugging Face's kernels package is installed here")
    except importlib.metadata.PackageNotFoundError:
        pass
    code = "from transformers.utils.import_utils import is_kernels_available; print(is_kernels_available())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_distribution_installs_a_top_level_kernels_module():
    dist = importlib.metadata.distribution("ascend_edit")
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert "kernels" not in top_level


def test_kernels_and_conf_are_package_modules():
    import ascend_edit.conf
    import ascend_edit.kernels

    assert Path(ascend_edit.kernels.__file__).parent == REPO / "kernels"
    assert (Path(ascend_edit.conf.__file__).parent / "config.yaml").exists()


def test_package_import_has_no_device_side_effects():
    code = "import sys, ascend_edit; print('torch_npu' in sys.modules, 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
