"""Exports: the EMA weights of a checkpoint as `model.safetensors` plus `config.json` and a
`README.md` model card, a pickle-free folder a model hub accepts (loaded back by
`selfflow.interop.export_folder`).

config.json stores the sha256 of the weights file, so that a truncated or changed file is refused by
name, and no path of the machine that exported it (`hub.without_machine_paths`).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from selfflow.interop.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from selfflow.interop.export_folder import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    MAX_CONFIG_BYTES,
    load_exported,
    read_export_config,
)
from selfflow.interop.hub import MODEL_CARD, model_card, without_machine_paths
from selfflow.io.digests import file_digest
from selfflow.io.safe_files import replace_atomically, write_bytes_atomically, write_json_atomically

# the export folder's names are re-exported: exports are written and read through this module
__all__ = [
    "EXPORT_CONFIG",
    "EXPORT_WEIGHTS",
    "MAX_CONFIG_BYTES",
    "check_export_target",
    "export_weights",
    "load_exported",
    "read_export_config",
    "replace_file",
]


def check_export_target(folder: Path, overwrite: bool) -> None:
    """Refuse to write onto a file, or into a folder that already holds something,
    unless `overwrite`."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(
            f"{folder} exists and is not a folder; choose a new folder for the export"
        )
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
