"""Every command the README prints runs as printed: each line of its ```bash blocks (and each inline
`selfflow-...` / `python -m tools...` command, and the usage lines of the tools' docstrings) is
split into words as a POSIX shell splits it, then parsed as the program would
parse it (tests/helpers/commands.py): Hydra composes the overrides of selfflow-train, -sample and
-probe (an unknown key, option or a value Hydra cannot parse fails), the tools' argparse accepts
their flags. Placeholders such as DIR or /path/to/... are fine as values; nothing is run. The
project files that the README links and the configs' comments cite exist."""

import re

import pytest

from tests.helpers.commands import (
    ROOT,
    check_command,
    documents,
    readme_commands,
    shell_commands,
    tool_usage_lines,
)


@pytest.mark.parametrize("line", readme_commands() + tool_usage_lines())
def test_the_readme_commands_parse_as_printed(line, monkeypatch):
    for words in shell_commands(line):
        check_command(words, monkeypatch)


def test_the_checker_finds_the_commands_and_catches_what_a_shell_does_to_them(monkeypatch):
    lines = readme_commands()
    assert len(lines) > 40 and any(line.startswith("torchrun") for line in lines)
    assert "selfflow-train" in [words[0] for line in lines for words in shell_commands(line)]
    # unquoted braces reach Hydra without the quotes the shell removed: a parse error, not a pattern
    with pytest.raises(Exception, match="no viable alternative at input '{digit}'"):
        check_command(
            shell_commands(
                "selfflow-train experiment=audio_digits data=audio_folder data.root=DIR "
                "data.dataset.name_pattern='{digit}_{speaker}'"
            )[0],
            monkeypatch,
        )
    with pytest.raises(
        Exception, match="feature_extractor"
    ):  # a key missing from the config needs +
        check_command(["selfflow-sample", "ckpt=x", "feature_extractor._target_=a.B"], monkeypatch)
    with pytest.raises(SystemExit):  # a flag the tool does not know
        check_command(["selfflow-export", "CKPT", "OUT", "--fast"], monkeypatch)


def cited_files() -> list[str]:
    """Project files linked from the README, CONTRIBUTING.md and docs/ (relative to the page that
    links them), and cited in the comments of conf/**/*.yaml."""
    cited = []
    for page in documents():
        for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in link:
                cited.append(str((page.parent / link).resolve().relative_to(ROOT)))
    citation = r"\b((?:selfflow|tools|docs|tests|conf)/[\w./-]*\w|[A-Z][A-Za-z_]*\.md)\b"
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        comments = "\n".join(line.partition("#")[2] for line in path.read_text().splitlines())
        cited += re.findall(citation, comments)
    return sorted(set(cited))


def test_the_files_the_docs_and_the_configs_cite_exist():
    cited = cited_files()
    expected = {
        "docs/reliability.md",
        "selfflow/tokenizers/latent.py",
        "tests/test_distributed.py",
        "LICENSE",
    }
    assert expected <= set(cited)
    assert [path for path in cited if not (ROOT / path).exists()] == []


NOT_COMMANDS = {"selfflow-shard-index", "selfflow-store"}  # a file format's name, a thread name


def test_every_command_the_package_names_exists():
    """Error messages, help texts and config comments name only console scripts that are installed
    with selfflow (no stale `tools/...py` script either)."""
    named: dict[str, str] = {}
    for path in [*(ROOT / "selfflow").rglob("*.py"), *(ROOT / "conf").rglob("*.yaml")]:
        text = path.read_text()
        for name in re.findall(r"\bselfflow-[a-z]+(?:-[a-z]+)*", text):
            named.setdefault(name, str(path.relative_to(ROOT)))
        for script in re.findall(r"tools/[a-z_]+\.py", text):
            assert (ROOT / script).is_file(), (
                f"{path.relative_to(ROOT)} names {script}, which does not exist"
            )
    installed = {
        e.name
        for e in __import__("importlib.metadata").metadata.entry_points(group="console_scripts")
    }
    missing = {name: where for name, where in named.items() if name not in installed | NOT_COMMANDS}
    assert not missing, f"commands named but not installed: {missing}"
    assert {"selfflow-train", "selfflow-export", "selfflow-shards", "selfflow-reference"} <= set(
        named
    )


RUN_AS_PRINTED = (
    "README.md",
    "architecture.md",
)  # pages whose Python examples need no data of yours


def python_blocks(run: bool) -> list[str]:
    """The ```python blocks of the pages that run as printed (`run`), or of the others."""
    return [
        block
        for page in documents()
        if (page.name in RUN_AS_PRINTED) == run
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    ]


@pytest.mark.parametrize("block", python_blocks(run=True))
def test_the_readme_python_examples_run_as_printed(block):
    """Each ```python block of the README and docs/architecture.md runs in a fresh namespace (the
    public API as shown)."""
    exec(compile(block, "docs", "exec"), {})


@pytest.mark.parametrize("block", python_blocks(run=False))
def test_the_other_python_examples_of_the_docs_are_valid_python(block):
    """The other pages' examples read your data (a shard folder, a hub id): they compile."""
    compile(block, "docs", "exec")
