"""Every `ascend-edit ...` command written in the README, docs/, conf/ comments and the launcher
headers composes against today's configs: a renamed key or group breaks CI, not a user.

Commands are only composed and validated against the typed schemas (no model, no data, no training).
Multirun commands (`-m`) compose their first job (the first value of every comma-separated sweep)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from ascend_edit.cli import _split_subcommand
from ascend_edit.config import register_configs, to_typed

REPO = Path(__file__).resolve().parents[2]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md")), *sorted((REPO / "docker").glob("*.md")),
             *sorted((REPO / "conf").glob("**/*.yaml")), *sorted((REPO / "launch").glob("*"))]
# Everything after the launcher script name is passed to `ascend-edit` as overrides.
LAUNCHER = re.compile(r"launch/(?:torchrun\.sh|deepspeed\.sh|msrun\.sh|slurm\.sbatch)\b")
# Hydra flags that only print or sweep: what follows them still has to compose.
PRINT_FLAGS = {"--help", "-h", "--hydra-help", "--resolve"}
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i"}
# Shell text that ends a command on a line.
END_TOKENS = {"#", "&&", "||", "|", ";", "\\", ">", "2>&1"}


def _command_tail(line: str) -> str | None:
    """The text after `ascend-edit` (or after a launcher script and its own flags) on a line."""
    match = re.search(r"(?<![\w/-])ascend-edit(?=\s|`|$)", line)
    if match:
        return line[match.end():]
    match = LAUNCHER.search(line)
    if match and not line.lstrip("# ").startswith(("source", "REPO_DIR", "exec")):
        return line[match.end():]
    return None


SHELL_ASSIGNMENT = re.compile(r'^\s*([A-Z][A-Z0-9_]*)="([^"]*)"\s*$')
PLACEHOLDER = re.compile(r"<[^>]*>?|…|^\.\.\.$")


def _arguments(tail: str, shell_vars: dict[str, str]) -> list[str]:
    tail = tail.split("`")[0]  # inline code ends at the backtick
    tail = re.sub(r"\$\{?([A-Z][A-Z0-9_]*)\}?", lambda m: shell_vars.get(m.group(1), m.group(0)), tail)
    try:
        tokens = shlex.split(tail, comments=False)
    except ValueError:
        tokens = tail.split()
    args = []
    for token in tokens:
        if token in END_TOKENS or token.startswith("#"):
            break
        args.append(token.rstrip(",;:)"))
    return [a for a in args if a and a not in ("--dry-run", "--no_local_rank")]


def _is_command(args: list[str], subcommands: set[str]) -> bool:
    """True when every token is a flag, a flag's value, an override or a subcommand (else it is prose)."""
    after_flag = False
    for token in args:
        if after_flag or token.startswith("-") or "=" in token or token in subcommands:
            after_flag = token in FLAGS_WITH_VALUE
            continue
        return False
    return bool(args)


def documented_commands() -> list[tuple[str, list[str]]]:
    from ascend_edit.cli import SUBCOMMAND_ALIASES, TASKS

    subcommands = set(TASKS) | set(SUBCOMMAND_ALIASES)
    found = []
    for path in DOC_FILES:
        if not path.is_file():
            continue
        shell_vars: dict[str, str] = {}
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            assignment = SHELL_ASSIGNMENT.match(line)
            if assignment:
                shell_vars[assignment.group(1)] = assignment.group(2)
            tail = _command_tail(line)
            if tail is None:
                continue
            args = _arguments(tail, shell_vars)
            # Prose such as "`ascend-edit` builds ..." names the tool without running it.
            if _is_command(args, subcommands):
                found.append((f"{path.relative_to(REPO)}:{number}", args))
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_commands():
    # The extractor must keep finding the README's own commands, or this file tests nothing.
    readme = [args for where, args in COMMANDS if where.startswith("README.md")]
    assert ["experiment=smollm2_mla"] in readme
    assert len(COMMANDS) >= 20


def _overrides(args: list[str]) -> list[str]:
    """Hydra overrides of a command: subcommand -> task=..., flags dropped, sweeps cut to their first value."""
    args = _split_subcommand(args)
    overrides, skip = [], False
    for token in args:
        if skip:
            skip = False
            continue
        if token in FLAGS_WITH_VALUE:
            skip = True
            continue
        if token.startswith("-"):
            continue
        key, _, value = token.partition("=")
        if key.lstrip("+~").startswith("hydra") and "/" in key:  # e.g. hydra/launcher=slurm: Hydra's own group
            continue
        if PLACEHOLDER.search(value) and "/" not in value:
            continue  # a template such as experiment=<name>: the reader fills it in
        if "," in value and not value.startswith(("[", "{")):
            value = value.split(",")[0]
        overrides.append(f"{key}={value}")
    return overrides


@pytest.mark.parametrize("where, args", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_composes(where, args):
    register_configs()
    overrides = [o for o in _overrides(args) if not o.lstrip("+~").startswith("hydra.")]
    with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "output_dir=."])
    to_typed(cfg)
