"""A model rebuilt from a stored run config and its weights (a checkpoint's or an export's), and the
format version both kinds of file carry.

The lowest module of `selfflow.interop`: `checkpoint` (training checkpoints) and `export_folder`
(exports) both build on it, and neither imports the other's module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfflow.interop.state_check import check_state_fits
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.safe_config import StoredConfigError, instantiate_stored
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokenizers.pretrained import point_parts

CHECKPOINT_FORMAT = 1  # selfflow_format of the checkpoints this version writes and reads


@dataclass(kw_only=True)
class LoadedCheckpoint:
    """A run's model and tokenizers rebuilt from its checkpoint, with where they came from.

    Attributes:
        model: The transformer with the chosen weights, in eval mode, on CPU.
        tokenizers: Modality -> the run's tokenizer, in eval mode.
        config: The run's resolved config (an OmegaConf DictConfig).
        step: The training step the checkpoint was written at.
        path: What was loaded: a .ckpt file or an export folder.
        weights_file: The file holding the weights (its digest identifies them).
    """

    model: SelfFlowTransformer  # in eval mode, on CPU
    tokenizers: dict[str, Tokenizer]
    config: Any  # the run's resolved config (an OmegaConf DictConfig)
    step: int
    path: Path  # what was loaded: a .ckpt file or an export folder
    weights_file: Path  # the file holding the weights (its digest identifies them)


def check_format(version: Any, source: str) -> None:
    """A stored format version must be a whole number this selfflow can read.

    Args:
        version: The `selfflow_format` value read from the file.
        source: The file's name in the error message.

    Raises:
        ValueError: The version is not a whole number >= 0, or newer than CHECKPOINT_FORMAT.
    """
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        what = f"{source} has format {version!r}, which is not a format version"
        raise ValueError(f"{what}; the file is damaged or not selfflow's")
    if version > CHECKPOINT_FORMAT:
        what = f"{source} has format {version}, newer than this selfflow ({CHECKPOINT_FORMAT})"
        raise ValueError(f"{what}; upgrade selfflow")


def load_state_checked(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
) -> None:
    """load_state_dict that names the first missing, unexpected or mismatched key (shapes, dtypes).

    Args:
        module: The module to load into.
        state: The weights read from a file.
        source: The file's name in the error message.
    """
    check_state_fits(module.state_dict(), state, source)
    module.load_state_dict(state)


def model_from_state(config, state: Mapping[str, torch.Tensor], source: str, vae=None):
    """The run's tokenizers (in eval mode) and its model with `state` loaded (the class count read
    from the label table). vae: where the user says the run's VAE or autoencoder is (a path, or
    {modality: path} for several); a stored path is never loaded, and the part must have the stored
    fingerprint (`point_parts`).

    `config` came from a file: its tokenizers and model are built through the allow-list
    (`instantiate_stored`), and the model is first built on the meta device, so that a config whose
    sizes do not fit the stored weights is refused before any memory is allocated for it.

    Args:
        config (DictConfig): The run's stored config.
        state: The model's weights, keys without the checkpoint's prefix.
        source: The file's name in error messages.
        vae: The run's VAE or autoencoder, named by the user (a path, or {modality: path}); the
            path the stored config names is never loaded.

    Returns:
        tuple[SelfFlowTransformer, dict[str, Tokenizer]]: The model in eval mode and the tokenizers
            by modality.

    Raises:
        StoredConfigError: The stored model config is not a partial one.
    """
    point_parts(config, vae, source)  # VAEs, autoencoders: the user's paths, stored fingerprints
    tokenizers = {}
    for modality, spec in config.tokenizer.items():
        tokenizers[modality] = instantiate_stored(spec, source, f"tokenizer.{modality}").eval()
    if config.model.get("_partial_") is not True:
        raise StoredConfigError(
            f"{source}: model._partial_ must be true (the model is completed with the token "
            f"channels and class count); refusing to build it"
        )
    build = instantiate_stored(config.model, source, "model")
    label_rows = state.get("y_embedder.embedding_table.weight")
    has_labels = isinstance(label_rows, torch.Tensor) and label_rows.ndim == 2
    num_classes = label_rows.shape[0] - 1 if has_labels else 0
    sizes = {
        "token_channels": {m: t.token_channels for m, t in tokenizers.items()},
        "num_classes": num_classes,
    }
    with torch.device("meta"):
        check_state_fits(build(**sizes).state_dict(), state, source)
    model = build(**sizes)
    load_state_checked(model, state, source)
    return model.eval(), tokenizers
