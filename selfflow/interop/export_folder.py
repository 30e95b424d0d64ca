"""An export folder's files (`model.safetensors`, `config.json`) and loading one back: safetensors
runs no code while reading, and the stored config goes through the allow-list.

config.json stores the sha256 of the weights file, so that a truncated or changed file is refused by
name. Writing an export is `selfflow.interop.export`'s job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from selfflow.interop.stored_model import LoadedCheckpoint, check_format, model_from_state
from selfflow.io.digests import file_digest
from selfflow.safe_config import first_line, stored_config

EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"
MAX_CONFIG_BYTES = 16 << 20  # an export's config.json is a few KB; a larger one is not read


def read_export_config(path: Path) -> dict:
    """config.json of an export, bounded in size and checked to be a JSON object with a stored
    config.

    Args:
        path: The export's config.json.

    Returns:
        The document.

    Raises:
        ValueError: Too large, not JSON, no stored config, or an unreadable format version.
    """
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        what = f"{path} is {size} bytes; an export's config is a few KB"
        raise ValueError(f"{what}, so this is not one (refusing to read it)")
    try:
        meta = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({first_line(error)}); the export is truncated or damaged: "
            f"export it again with selfflow-export"
        ) from error
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path} holds no stored run config; it is not a selfflow export")
    check_format(meta.get("selfflow_format", 0), str(path))
    return meta


def load_exported(folder: str | os.PathLike, vae=None) -> LoadedCheckpoint:
    """The model of a `selfflow-export` folder; a truncated, changed or mismatched file is refused
    in one line.

    Args:
        folder: The export folder.
        vae: The run's VAE or autoencoder, named by the user (see `model_from_state`).

    Returns:
        LoadedCheckpoint: The model (EMA weights), tokenizers, config and step.
    """
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    weights, meta_path = folder / EXPORT_WEIGHTS, folder / EXPORT_CONFIG
    if not weights.is_file() or not meta_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not an exported model: it needs {EXPORT_WEIGHTS} and {EXPORT_CONFIG} "
            f"(write them with selfflow-export CKPT {folder})"
        )
    meta = read_export_config(meta_path)
    source = f"exported model {folder}"
    expected = meta.get("weights_sha256")
    if expected is not None and file_digest(weights) != expected:
        raise ValueError(
            f"{weights} does not match the sha256 in {meta_path}: it was truncated or changed "
            f"after the export; get the export again"
        )
    config = stored_config(meta["config"], source)
    try:
        state = load_file(str(weights))
    except Exception as error:
        damaged = f"cannot read {weights}: {first_line(error)}; the file is truncated or damaged"
        raise ValueError(damaged) from error
    step = meta.get("step", 0)
    model, tokenizers = model_from_state(config, state, source, vae)
    return LoadedCheckpoint(
        model=model,
        tokenizers=tokenizers,
        config=config,
        step=step if isinstance(step, int) else 0,
        path=folder,
        weights_file=weights,
    )
