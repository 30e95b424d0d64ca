"""Loading a training checkpoint back into plain PyTorch objects for sampling, probing or
fine-tuning.

`load_checkpoint` also takes an export folder (`export_folder`) or a hub repo id (`hub`); the model
itself is rebuilt by `stored_model`, which both kinds of file share.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from selfflow.interop.export_folder import load_exported
from selfflow.interop.hub import HUB_PREFIX, resolve_pretrained
from selfflow.interop.stored_model import (
    CHECKPOINT_FORMAT,
    LoadedCheckpoint,
    check_format,
    load_state_checked,
    model_from_state,
)
from selfflow.objectives.selfflow import sampling_ema_key
from selfflow.safe_config import first_line, stored_config

# the stored-model names are re-exported: callers load checkpoints from this module
__all__ = [
    "CHECKPOINT_FORMAT",
    "LoadedCheckpoint",
    "check_format",
    "load_checkpoint",
    "load_state_checked",
    "model_from_state",
    "read_checkpoint",
    "weights_prefix",
]

WEIGHTS = ("ema", "online")  # and ema_<decay> for each of a run's objective.sampling_ema_decays
WEIGHT_PREFIXES = {"ema": "objective.teacher.module.", "online": "objective.model."}
SAMPLING_EMAS = "objective.sampling_emas."


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True: a file that needs arbitrary unpickling is refused, never
    executed.

    Args:
        path: The .ckpt file of a run.
        mmap: Map the tensors instead of reading them (a cheap validity check of a large file).

    Returns:
        The checkpoint's dictionary (state_dict, selfflow_config, global_step, ...).

    Raises:
        FileNotFoundError: `path` is not a file.
        ValueError: The file cannot be loaded without arbitrary unpickling, is not a selfflow
            checkpoint, or has a format this selfflow cannot read.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = f"checkpoint {path} does not exist"
        raise FileNotFoundError(f"{what}; pass the path of a .ckpt file from a run's checkpoints/")
    mapped = mmap and zipfile.is_zipfile(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except Exception as error:
        raise ValueError(
            f"cannot load checkpoint {path} safely: {type(error).__name__}: {first_line(error)}"
        ) from error
    if not isinstance(checkpoint, dict) or "selfflow_config" not in checkpoint:
        what = f"{path} is not a selfflow training checkpoint"
        raise ValueError(f"{what} (it has no stored selfflow config)")
    check_format(checkpoint.get("selfflow_format", 0), str(path))
    return checkpoint


def weights_prefix(weights: str, state: Mapping[str, Any], source: str) -> str:
    """Where the `weights` (ema, online, or ema_<decay> of an extra sampling EMA) are in a
    checkpoint's state.

    Args:
        weights: `ema`, `online` or `ema_<decay>`.
        state: The checkpoint's state_dict.
        source: The file's name in the error message.

    Returns:
        The key prefix of those weights in `state`.

    Raises:
        ValueError: The weights are unknown or not in this checkpoint (the message lists those that
            are).
    """
    if weights in WEIGHT_PREFIXES:
        return WEIGHT_PREFIXES[weights]
    emas = [k for k in state if isinstance(k, str) and k.startswith(SAMPLING_EMAS)]
    keys = {k.split(".")[2] for k in emas if k.count(".") > 3}
    extra_ema = isinstance(weights, str) and weights.startswith("ema_")
    if extra_ema and sampling_ema_key(weights) in keys:
        return f"{SAMPLING_EMAS}{sampling_ema_key(weights)}.module."
    extra = sorted("ema_" + key.removeprefix("ema_").replace("_", ".") for key in keys)
    setting = "objective.sampling_ema_decays, e.g. [0.9999]"
    hint = "" if extra else f" (an extra EMA is kept when the run sets {setting})"
    missing = "is not in" if extra_ema else "is unknown; it is not in"
    choices = ", ".join([*WEIGHTS, *extra])
    raise ValueError(f"weights={weights!r} {missing} {source}; choose one of: {choices}{hint}")


def load_checkpoint(
    path: str | os.PathLike, weights: str = "ema", vae: str | os.PathLike | dict | None = None
) -> LoadedCheckpoint:
    """Rebuild the model and tokenizers a run trained, from its checkpoint alone; `weights`: ema
    (the teacher), online (the student) or ema_<decay> (an extra sampling EMA of
    objective.sampling_ema_decays).

    `path` may also be a folder written by `selfflow-export` (or its model.safetensors): EMA weights
    only; `hf://OWNER/NAME` is an export in huggingface_hub's local cache.

    Args:
        path: A run's .ckpt file, an export folder, or an export's model.safetensors.
        weights: `ema` (the teacher), `online` (the student) or `ema_<decay>`; exports hold `ema`
            only.
        vae: The run's VAE or autoencoder, named by the user (a path, or {modality: path});
            required when the run used one, since the path its config stores is never loaded
            (checked by fingerprint).

    Returns:
        The model, tokenizers, config and step of the run.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: Other weights than `ema` from an export, or a file that is not a complete
            checkpoint.
    """
    if str(path).startswith(HUB_PREFIX):
        path = resolve_pretrained(str(path))
    path = Path(path).expanduser()
    if path.is_dir() or path.suffix == ".safetensors":
        folder = path if path.is_dir() else path.parent
        if weights != "ema":
            asked = f"weights={weights} asks for other weights, but {folder} is an export"
            fix = f"use weights=ema, or the run's .ckpt file for the {weights} weights"
            raise ValueError(f"{asked}, which holds the EMA weights only; {fix}")
        return load_exported(folder, vae)
    checkpoint = read_checkpoint(path)
    source = f"checkpoint {path}"
    config = stored_config(checkpoint["selfflow_config"], source)
    stored = checkpoint.get("state_dict")
    if not isinstance(stored, Mapping):
        what = f"{path} has no state_dict"
        raise ValueError(f"{what}; it is not a complete selfflow training checkpoint")
    prefix = weights_prefix(weights, stored, source)
    ours = {k: v for k, v in stored.items() if isinstance(k, str) and k.startswith(prefix)}
    state = {k[len(prefix) :]: v for k, v in ours.items()}
    model, tokenizers = model_from_state(config, state, f"{source} ({weights} weights)", vae)
    return LoadedCheckpoint(
        model=model,
        tokenizers=tokenizers,
        config=config,
        step=int(checkpoint.get("global_step", 0)),
        path=path,
        weights_file=path,
    )
