"""Loading a training checkpoint back into plain PyTorch objects for sampling, probing or fine-tuning."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfflow.interop.state_check import check_state_fits
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.objectives.selfflow import sampling_ema_key
from selfflow.safe_config import StoredConfigError, first_line, instantiate_stored, stored_config
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokenizers.pretrained import point_parts

CHECKPOINT_FORMAT = 1  # selfflow_format of the checkpoints this version writes and reads

WEIGHTS = ("ema", "online")  # and ema_<decay> for each of a run's objective.sampling_ema_decays
WEIGHT_PREFIXES = {"ema": "objective.teacher.module.", "online": "objective.model."}
SAMPLING_EMAS = "objective.sampling_emas."


@dataclass
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


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True: a file that needs arbitrary unpickling is refused, never executed.

    mmap: map the tensors instead of reading them (a cheap validity check of a large file).

    Args:
        path: The .ckpt file of a run.
        mmap: Map the tensors instead of reading them.

    Returns:
        The checkpoint's dictionary (state_dict, selfflow_config, global_step, ...).

    Raises:
        FileNotFoundError: `path` is not a file.
        ValueError: The file cannot be loaded without arbitrary unpickling, is not a selfflow
            checkpoint, or has a format this selfflow cannot read.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the path of a .ckpt file from a run's checkpoints/"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:
        raise ValueError(
            f"cannot load checkpoint {path} safely: {type(error).__name__}: {first_line(error)}"
        ) from error
    if not isinstance(checkpoint, dict) or "selfflow_config" not in checkpoint:
        raise ValueError(f"{path} is not a selfflow training checkpoint (it has no stored selfflow config)")
    check_format(checkpoint.get("selfflow_format", 0), str(path))
    return checkpoint


def check_format(version: Any, source: str) -> None:
    """A stored format version must be a whole number this selfflow can read.

    Args:
        version: The `selfflow_format` value read from the file.
        source: The file's name in the error message.

    Raises:
        ValueError: The version is not a whole number >= 0, or newer than CHECKPOINT_FORMAT.
    """
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(
            f"{source} has format {version!r}, which is not a format version; the file is damaged or not selfflow's"
        )
    if version > CHECKPOINT_FORMAT:
        raise ValueError(
            f"{source} has format {version}, newer than this selfflow ({CHECKPOINT_FORMAT}); upgrade selfflow"
        )


def load_state_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
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

    `config` came from a file: its tokenizers and model are built through the allow-list (`instantiate_stored`),
    and the model is first built on the meta device, so that a config whose sizes do not fit the stored weights is
    refused before any memory is allocated for it.

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
    tokenizers = {m: instantiate_stored(spec, source, f"tokenizer.{m}").eval() for m, spec in config.tokenizer.items()}
    if config.model.get("_partial_") is not True:
        raise StoredConfigError(
            f"{source}: model._partial_ must be true (the model is completed with the token "
            f"channels and class count); refusing to build it"
        )
    build = instantiate_stored(config.model, source, "model")
    label_rows = state.get("y_embedder.embedding_table.weight")
    num_classes = label_rows.shape[0] - 1 if isinstance(label_rows, torch.Tensor) and label_rows.ndim == 2 else 0
    sizes = {"token_channels": {m: t.token_channels for m, t in tokenizers.items()}, "num_classes": num_classes}
    with torch.device("meta"):
        check_state_fits(build(**sizes).state_dict(), state, source)
    model = build(**sizes)
    load_state_checked(model, state, source)
    return model.eval(), tokenizers


def weights_prefix(weights: str, state: Mapping[str, Any], source: str) -> str:
    """Where the `weights` (ema, online, or ema_<decay> of an extra sampling EMA) are in a checkpoint's state.

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
    keys = {k.split(".")[2] for k in state if isinstance(k, str) and k.startswith(SAMPLING_EMAS) and k.count(".") > 3}
    if isinstance(weights, str) and weights.startswith("ema_") and sampling_ema_key(weights) in keys:
        return f"{SAMPLING_EMAS}{sampling_ema_key(weights)}.module."
    extra = sorted("ema_" + key.removeprefix("ema_").replace("_", ".") for key in keys)
    hint = "" if extra else " (an extra EMA is kept when the run sets objective.sampling_ema_decays, e.g. [0.9999])"
    missing = "is not in" if isinstance(weights, str) and weights.startswith("ema_") else "is unknown; it is not in"
    raise ValueError(f"weights={weights!r} {missing} {source}; choose one of: {', '.join([*WEIGHTS, *extra])}{hint}")


def load_checkpoint(
    path: str | os.PathLike, weights: str = "ema", vae: str | os.PathLike | dict | None = None
) -> LoadedCheckpoint:
    """Rebuild the model and tokenizers a run trained, from its checkpoint alone; `weights`: ema (the teacher),
    online (the student) or ema_<decay> (an extra sampling EMA of objective.sampling_ema_decays).

    `path` may also be a folder written by `selfflow-export` (or its model.safetensors): EMA weights only;
    `hf://OWNER/NAME` is an export in huggingface_hub's local cache.

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
    if str(path).startswith("hf://"):
        from selfflow.interop.hub import resolve_pretrained

        path = resolve_pretrained(str(path))
    path = Path(path).expanduser()
    if path.is_dir() or path.suffix == ".safetensors":
        from selfflow.interop.export import load_exported

        folder = path if path.is_dir() else path.parent
        if weights != "ema":
            raise ValueError(
                f"weights={weights} asks for other weights, but {folder} is an export, which holds the "
                f"EMA weights only; use weights=ema, or the run's .ckpt file for the {weights} weights"
            )
        return load_exported(folder, vae)
    checkpoint = read_checkpoint(path)
    source = f"checkpoint {path}"
    config = stored_config(checkpoint["selfflow_config"], source)
    stored = checkpoint.get("state_dict")
    if not isinstance(stored, Mapping):
        raise ValueError(f"{path} has no state_dict; it is not a complete selfflow training checkpoint")
    prefix = weights_prefix(weights, stored, source)
    state = {k[len(prefix) :]: v for k, v in stored.items() if isinstance(k, str) and k.startswith(prefix)}
    model, tokenizers = model_from_state(config, state, f"{source} ({weights} weights)", vae)
    return LoadedCheckpoint(model, tokenizers, config, int(checkpoint.get("global_step", 0)), path, path)
