"""The README command checker: command lines found in Markdown bash blocks and tool docstrings,
split as a POSIX shell splits them, then parsed as each program would parse them (Hydra composes the
overrides of the commands in CONFIG_OF, argparse parses the other console scripts and `python -m
tools.X`); nothing is run."""

import argparse
import ast
import itertools
import re
import shlex
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from selfflow.training.validate import tokenizer_configs

ROOT = Path(__file__).resolve().parents[2]
CONFIG_OF = {
    "selfflow-train": "train",
    "selfflow-sample": "sample",
    "selfflow-probe": "probe",
    "selfflow-eval": "eval",
    "selfflow-cache": "cache",
    "selfflow-reference": "reference",
    "selfflow-prompt-following": "prompt_following",
    "selfflow.cli.train": "train",
    "selfflow.cli.sample": "sample",
    "selfflow.cli.probe": "probe",
    "selfflow.cli.cache": "cache",
    "selfflow.cli.reference": "reference",
}
HYDRA_FLAGS = {"--help"}
SHELL_TOOLS = {
    "mkdir",
    "cd",
    "cp",
    "mv",
    "ls",
    "for",
    "curl",
    "wget",
    "sha256sum",
    "rsync",
    "export",
}
SHELL_TOOLS |= {"tensorboard", "wandb"}
MULTIRUN_FLAGS = {"-m", "--multirun"}
COMMAND_START = r"(?:selfflow-[a-z-]+(?![:\w-])|python -m tools\.)"


def logical_lines(block: str) -> list[str]:
    """A shell script's lines with `\\` continuations joined."""
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def documents() -> list[Path]:
    """The pages a user reads commands from: the README, CONTRIBUTING.md and every page of docs/."""
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands(pages: list[Path] | None = None) -> list[str]:
    """Each command line of the ```bash blocks of `pages` (default: all), and each inline
    `selfflow-...` command of the README (the other pages name commands inline in prose too)."""
    commands = []
    for page in pages or documents():
        text = page.read_text()
        commands += [
            line
            for block in re.findall(r"```bash\n(.*?)```", text, re.S)
            for line in logical_lines(block)
        ]
        if page.name == "README.md" and page.parent == ROOT:
            commands += re.findall(rf"(?<!`)`({COMMAND_START}[^`]*)`", text)
    return commands


def tool_usage_lines() -> list[str]:
    """The command lines (`python -m tools....`, `selfflow-...`) in the docstrings of tools/*.py and
    of the console scripts (selfflow/cli/*.py)."""
    lines = []
    for path in sorted([*(ROOT / "tools").glob("*.py"), *(ROOT / "selfflow" / "cli").glob("*.py")]):
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        lines += [
            line.strip()
            for line in logical_lines(docstring)
            if re.match(COMMAND_START, line.strip())
        ]
    return lines


def shell_commands(line: str) -> list[list[str]]:
    """The words of each command of a line (split at `&&`), as the shell gives them to the program;
    `$VAR` is replaced by a number as the shell would expand it (e.g. $SLURM_NNODES)."""
    words = shlex.split(re.sub(r"\$\{?[A-Z_]+\}?", "1", line), comments=True)
    commands, current = [], []
    for word in words:
        if word == "&&":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [c for c in [*commands, current] if c]


def compose_overrides(config: str, overrides: list[str]):
    """Hydra composes `config` with the overrides, hydra.* ones included, or raises naming the bad
    one; a multirun (`-m`) composes each of its jobs."""
    flags = [o for o in overrides if o.startswith("-")]
    assert set(flags) <= HYDRA_FLAGS | MULTIRUN_FLAGS, f"unknown flags {flags}"
    overrides = [o for o in overrides if not o.startswith("-")]
    jobs = sweep_jobs(overrides) if set(flags) & MULTIRUN_FLAGS else [overrides]
    for job in jobs:
        with initialize_config_module("selfflow.conf", version_base="1.3"):
            cfg = compose(config, overrides=job, return_hydra_config=True)
        if config == "train":
            tokenizer_configs(cfg)  # the data's modalities have tokenizers (the start-up check)
    return cfg


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The overrides of each job of a multirun, as Hydra's basic sweeper splits `key=a,b` values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in parsed
    ]
    return [list(job) for job in itertools.product(*choices)]


class Parsed(Exception):
    """Raised with the parsed namespace instead of running a tool."""


def console_scripts() -> dict:
    """selfflow's argparse console scripts (the Hydra ones are in CONFIG_OF): name ->
    entry point."""
    from importlib.metadata import entry_points

    return {
        e.name: e
        for e in entry_points(group="console_scripts")
        if e.name.startswith("selfflow-") and e.name not in CONFIG_OF
    }


def parse_only(monkeypatch, argv: list[str], entry) -> None:
    """Run `entry` with `argv` until its argparse has parsed (nothing else runs)."""
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(Parsed):
        entry()


def parse_console_script(program: str, args: list[str], monkeypatch) -> None:
    """The script's argparse accepts `args` (nothing is run)."""
    parse_only(monkeypatch, [program, *args], console_scripts()[program].load())


def parse_tool(words: list[str], monkeypatch) -> None:
    """`python -m tools.NAME ARGS`: the module exists and its argparse accepts ARGS."""
    import importlib

    module = importlib.import_module(words[2])
    parse_only(monkeypatch, [words[2], *words[3:]], module.main)


def check_command(words: list[str], monkeypatch) -> None:
    program = words[0]
    if program == "srun":
        return check_command(words[1:], monkeypatch)
    if program == "torchrun":
        module = words.index("-m") + 1
        return compose_overrides(CONFIG_OF[words[module]], words[module + 1 :])
    if program in CONFIG_OF:
        return compose_overrides(CONFIG_OF[program], words[1:])
    if (
        (words[:2] == ["python", "-m"] and words[2] == "pytest")
        or words[:2] == ["pip", "install"]
        or program == "ruff"
    ):
        return None
    if (
        program in SHELL_TOOLS
        or words[:2] == ["python", "-c"]
        or re.fullmatch(r"[A-Z_]+=\S*", program)
    ):
        return None  # the shell's own tools, set-up steps and variables of the docs' scripts
    if words[:2] == ["python", "-m"] and words[2].startswith("tools."):
        return parse_tool(words, monkeypatch)
    if program in console_scripts():
        return parse_console_script(program, words[1:], monkeypatch)
    raise AssertionError(
        f"a README command this test does not know how to check: {' '.join(words)}"
    )
