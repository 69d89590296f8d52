"""Integration fixtures: small *trained* teachers, built once per test session.

A teacher pre-trained for a few hundred CPU steps on the synthetic corpus has real attention
patterns (copying, counting, agreement), so "distillation lowered the loss" is a signal here,
where random weights would give one that means little. Each checkpoint directory holds the HF
model, its character tokenizer and `corpus.txt` (documents separated by blank lines).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

TEACHER_TRAIN_STEPS = 200  # ~10 s on 2 CPU cores; the teacher reaches held-out perplexity ~1.3


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained dense Qwen3 (4 layers, hidden 64, 4 query / 2 KV heads of dim 16)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("trained_qwen3"), arch="qwen3",
                                train_steps=TEACHER_TRAIN_STEPS)


@pytest.fixture(scope="session")
def trained_moe_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same, as a Qwen3-MoE (4 experts, 2 per token): about as cheap to build as the dense one."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("trained_qwen3_moe"), arch="qwen3_moe",
                                train_steps=TEACHER_TRAIN_STEPS)
