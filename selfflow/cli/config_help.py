"""`selfflow-train --help`: every key of the run config and of the chosen option of each main group,
with its value and the one-line description its YAML comment gives (the comment after the key, or
the comment lines right above it).

The `config_keys` resolver puts the list into Hydra's help template (conf/train.yaml,
hydra.help.template).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf

BUILDS_ON_TRAIN = ("cache",)  # on train.yaml, and --help lists its keys (reference: its own only)
MAIN_GROUPS = ("objective", "lr_schedule", "model", "trainer", "callbacks", "logger")
HIDDEN_KEYS = (
    "_target_",
    "_partial_",
    "defaults",
    "hydra",
)  # how a node is built, not what a user sets
KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w]*)\s*:(?P<rest>.*)$")
VALUE_COLUMN = 36  # where the descriptions start (longer key=value entries push theirs further)


def _inline_comment(rest: str) -> str:
    """The comment of `value  # comment` (a '#' inside quotes is part of the value)."""
    quote = None
    for i, char in enumerate(rest):
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (i == 0 or rest[i - 1].isspace()):
            return rest[i + 1 :].strip()
    return ""


def key_comments(text: str) -> list[tuple[str, str]]:
    """(dotted key, description) of every key of a YAML config file, in file order; the
    description is the key's inline comment, else the comment lines directly above it, joined (""
    when it has none)."""
    found: list[tuple[str, str]] = []
    parents: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    above: list[str] = []
    inline_at = (
        None  # the column of the previous key's inline comment: deeper comment lines continue it
    )
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment = stripped.lstrip("#").strip()
            if inline_at is not None and len(line) - len(line.lstrip()) >= inline_at:
                found[-1] = (found[-1][0], f"{found[-1][1]} {comment}")
            else:
                above.append(comment)
                inline_at = None
            continue
        inline_at = None
        match = KEY_LINE.match(line)
        if not match:
            above = []
            continue
        indent = len(match["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = [key for _, key in parents] + [match["key"]]
        parents.append((indent, match["key"]))
        inline = _inline_comment(match["rest"])
        description = inline or " ".join(above)
        above = []
        if not any(part in HIDDEN_KEYS for part in path):
            found.append((".".join(path), description))
            inline_at = line.index("#", len(line) - len(match["rest"])) if inline else None
    return found


def _shown(value: Any) -> str:
    """A value as it is written on the command line."""
    return value if isinstance(value, str) else json.dumps(value)


def help_sources(config_name: str, choices: dict[str, str]) -> list[tuple[str, Any]]:
    """(package, YAML file) of the keys `--help` lists: the command's own config, train.yaml for the
    configs that build on it (selfflow-cache), and the chosen option of each main group of a
    training config."""
    conf = resources.files("selfflow.conf")
    sources = [("", conf / f"{config_name}.yaml")]
    if config_name in BUILDS_ON_TRAIN:
        sources.append(("", conf / "train.yaml"))
    if config_name == "train" or config_name in BUILDS_ON_TRAIN:
        sources += [
            (group, conf / group / f"{choices[group]}.yaml")
            for group in MAIN_GROUPS
            if choices.get(group)
        ]
    return sources


def keys_help(cfg: DictConfig, choices: dict[str, str], config_name: str = "train") -> str:
    """One line per key: `key=value  description`, for the command's own keys and those of each main
    group's chosen option (`choices`: group -> option), with the values of the composed `cfg`
    (uninterpolated).

    Args:
        cfg: the composed config whose values are shown.
        choices: the option chosen for each config group.
        config_name: the command's config (train, sample, probe, eval, cache, reference, ...).

    Returns:
        The lines, one per key, joined by newlines.
    """
    lines = []
    for package, source in help_sources(config_name, choices):
        for key, description in key_comments(source.read_text()):
            full = f"{package}.{key}" if package else key
            parent, _, name = full.rpartition(".")
            node = (
                OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
            )
            if not isinstance(node, DictConfig) or name not in node.keys():  # noqa: SIM118 (??? values)
                continue  # left out by the composed config (an experiment removed it)
            value = OmegaConf.to_container(node, resolve=False)[name]
            entry = full if isinstance(value, dict) else f"{full}={_shown(value)}"
            lines.append(f"  {entry:<{VALUE_COLUMN}} {description}".rstrip())
    return "\n".join(dict.fromkeys(lines))


def config_keys(*, _root_: DictConfig) -> str:
    """The resolver: keys_help of the config being described, for Hydra's help template ('$' escaped
    for it)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return keys_help(_root_, {}).replace("$", "$$")
    hydra = HydraConfig.get()
    return keys_help(_root_, dict(hydra.runtime.choices), hydra.job.config_name).replace("$", "$$")


def register_config_keys_resolver() -> None:
    if not OmegaConf.has_resolver("config_keys"):
        OmegaConf.register_new_resolver("config_keys", config_keys)


def register_train_resolvers() -> None:
    """The resolvers of the commands' configs: `config_keys` for --help, `run_name` for
    sweep folders."""
    from selfflow.training.run_name import register_run_name_resolver

    register_config_keys_resolver()
    register_run_name_resolver()
