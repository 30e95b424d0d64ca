"""`selfflow-train --help`: every key of the run config and of the chosen option of each main group, with its value
and the one-line description its YAML comment gives (the comment after the key, or the comment lines right above it).

The `config_keys` resolver puts the list into Hydra's help template (conf/train.yaml, hydra.help.template).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf

MAIN_GROUPS = ("objective", "lr_schedule", "model", "trainer", "callbacks", "logger")
HIDDEN_KEYS = ("_target_", "_partial_", "defaults", "hydra")  # how a node is built, not what a user sets
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
    """(dotted key, description) of every key of a YAML config file, in file order; the description is the key's
    inline comment, else the comment lines directly above it, joined ("" when it has none)."""
    found: list[tuple[str, str]] = []
    parents: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    above: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = KEY_LINE.match(line)
        if not match:
            above = []
            continue
        indent = len(match["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = [key for _, key in parents] + [match["key"]]
        parents.append((indent, match["key"]))
        description = _inline_comment(match["rest"]) or " ".join(above)
        above = []
        if not any(part in HIDDEN_KEYS for part in path):
            found.append((".".join(path), description))
    return found


def _shown(value: Any) -> str:
    """A value as it is written on the command line."""
    return value if isinstance(value, str) else json.dumps(value)


def keys_help(cfg: DictConfig, choices: dict[str, str]) -> str:
    """One line per key: `key=value  description`, for the run config's own keys and those of each main group's
    chosen option (`choices`: group -> option), with the values of the composed `cfg` (uninterpolated)."""
    conf = resources.files("selfflow.conf")
    sources = [("", conf / "train.yaml")]
    sources += [(group, conf / group / f"{choices[group]}.yaml") for group in MAIN_GROUPS if choices.get(group)]
    lines = []
    for package, source in sources:
        for key, description in key_comments(source.read_text()):
            full = f"{package}.{key}" if package else key
            parent, _, name = full.rpartition(".")
            node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
            if not isinstance(node, DictConfig) or name not in node:
                continue  # left out by the composed config (an experiment removed it)
            value = OmegaConf.to_container(node, resolve=False)[name]
            entry = full if isinstance(value, dict) else f"{full}={_shown(value)}"
            lines.append(f"  {entry:<{VALUE_COLUMN}} {description}".rstrip())
    return "\n".join(lines)


def config_keys(*, _root_: DictConfig) -> str:
    """The resolver: keys_help of the config being described, for Hydra's help template ('$' escaped for it)."""
    from hydra.core.hydra_config import HydraConfig

    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    return keys_help(_root_, choices).replace("$", "$$")


def register_config_keys_resolver() -> None:
    if not OmegaConf.has_resolver("config_keys"):
        OmegaConf.register_new_resolver("config_keys", config_keys)


def register_train_resolvers() -> None:
    """The resolvers that train.yaml uses, for every command whose config builds on it (selfflow-train,
    selfflow-cache): `config_keys` for --help, `run_name` for sweep folders."""
    from selfflow.training.run_name import register_run_name_resolver

    register_config_keys_resolver()
    register_run_name_resolver()
