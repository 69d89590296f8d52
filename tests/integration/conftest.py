"""Integration fixtures: small *trained* teachers, built once per test session.

A teacher pre-trained for a few hundred CPU steps on the synthetic corpus has real attention
patterns (copying, counting, agreement), so "distillation lowered the loss" is a signal here,
where random weights would give one that means little. Each checkpoint directory holds the HF
model, its character tokenizer and `corpus.txt` (documents separated by blank lines).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

TEACHER_TRAIN_STEPS = 200  # ~10 s on one CPU thread; the teacher reaches held-out perplexity ~1.3
# Threads for these tiny models. Their matrices are too small to split; on a busy 2-core machine a second
# intra-op thread only spins waiting for a core. Measured with other jobs running: building the teacher
# 11 s on 1 thread vs 87-91 s on 2; 20 stage-1 steps in the CLI 0.3 s vs 10-27 s.
CPU_THREADS = 1


@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def few_cpu_threads() -> Iterator[None]:
    """Opt in per module (`pytestmark = pytest.mark.usefixtures("few_cpu_threads")`), not for the directory:
    the real-weights and ZeRO tests here have larger matrices."""
    with cpu_threads(CPU_THREADS):
        yield


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained dense Qwen3 (4 layers, hidden 64, 4 query / 2 KV heads of dim 16)."""
    with cpu_threads(CPU_THREADS):
        return make_tiny_checkpoint(tmp_path_factory.mktemp("trained_qwen3"), arch="qwen3",
                                    train_steps=TEACHER_TRAIN_STEPS)


@pytest.fixture(scope="session")
def trained_moe_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same, as a Qwen3-MoE (4 experts, 2 per token): about as cheap to build as the dense one."""
    with cpu_threads(CPU_THREADS):
        return make_tiny_checkpoint(tmp_path_factory.mktemp("trained_qwen3_moe"), arch="qwen3_moe",
                                    train_steps=TEACHER_TRAIN_STEPS)
