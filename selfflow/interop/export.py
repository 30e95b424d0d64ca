"""Exports: the EMA weights of a checkpoint as `model.safetensors` plus `config.json` and a
`README.md` model card, a pickle-free folder a model hub accepts, and loading such a folder back
(safetensors: no code runs while reading; the config goes through the allow-list).

config.json stores the sha256 of the weights file, so that a truncated or changed file is refused by
name, and no path of the machine that exported it (`hub.without_machine_paths`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from selfflow.interop.checkpoint import (
    CHECKPOINT_FORMAT,
    LoadedCheckpoint,
    check_format,
    load_checkpoint,
    model_from_state,
)
from selfflow.io.digests import file_digest
from selfflow.io.safe_files import replace_atomically, write_bytes_atomically, write_json_atomically
from selfflow.safe_config import first_line, stored_config

EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"
MAX_CONFIG_BYTES = 16 << 20  # an export's config.json is a few KB; a larger one is not read


def check_export_target(folder: Path, overwrite: bool) -> None:
    """Refuse to write onto a file, or into a folder that already holds something, unless `overwrite`."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; choose a new folder for the export")
    if not overwrite and folder.is_dir() and any(folder.iterdir()):
        raise FileExistsError(
            f"{folder} already exists and is not empty; choose a new folder, or pass --overwrite "
            f"to replace its {EXPORT_WEIGHTS}, {EXPORT_CONFIG} and README.md"
        )


def replace_file(path: Path, write) -> None:
    """write(temporary file), then rename it over `path`: a failed export never leaves half a file
    by that name, and a link planted under the name is replaced, never written through
    (`replace_atomically`)."""
    with replace_atomically(path, sync=True) as file:
        write(file)


def export_weights(
    checkpoint_path: str | os.PathLike,
    folder: str | os.PathLike,
    overwrite: bool = False,
    vae=None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write an export folder a model hub accepts; load it back with
    `selfflow.from_pretrained(folder)`.

    Args:
        checkpoint_path: a .ckpt written by selfflow-train (or an export folder).
        folder: a new (or empty) folder.
        overwrite: replace the export files of a folder that holds some.
        vae: the run's VAE or autoencoder, named by the user, as `load_checkpoint`'s.
        metrics: measured results for the model card (e.g. {"fid50k": 2.3}).

    Returns:
        The folder, holding model.safetensors (EMA weights), config.json (the run config
        without machine paths, the weights' sha256) and README.md (the model card).
    """
    from safetensors.torch import save

    from selfflow.interop.hub import MODEL_CARD, model_card, without_machine_paths

    folder = Path(folder).expanduser()
    check_export_target(folder, overwrite)
    loaded = load_checkpoint(checkpoint_path, weights="ema", vae=vae)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in loaded.model.state_dict().items()}
    weights = folder / EXPORT_WEIGHTS
    metadata = {"weights": "ema", "step": str(loaded.step)}
    replace_file(weights, lambda file: file.write(save(state, metadata=metadata)))
    meta = {
        "selfflow_format": CHECKPOINT_FORMAT,
        "step": loaded.step,
        "weights": "ema",
        "weights_sha256": file_digest(weights),
        "config": without_machine_paths(OmegaConf.to_container(loaded.config, resolve=True)),
    }
    write_json_atomically(folder / EXPORT_CONFIG, meta, sync=True)
    write_bytes_atomically(folder / MODEL_CARD, model_card(meta, metrics).encode(), sync=True)
    return folder


def read_export_config(path: Path) -> dict:
    """config.json of an export, bounded in size and checked to be a JSON object with a stored config."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{path} is {size} bytes; an export's config is a few KB, so this is not one (refusing to read it)"
        )
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
    """The model of a `selfflow-export` folder; a truncated, changed or mismatched file is refused in one line."""
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
            f"{weights} does not match the sha256 in {meta_path}: it was truncated or changed after "
            f"the export; get the export again"
        )
    config = stored_config(meta["config"], source)
    try:
        state = load_file(str(weights))
    except Exception as error:
        raise ValueError(f"cannot read {weights}: {first_line(error)}; the file is truncated or damaged") from error
    step = meta.get("step", 0)
    model, tokenizers = model_from_state(config, state, source, vae)
    return LoadedCheckpoint(model, tokenizers, config, step if isinstance(step, int) else 0, folder, weights)
