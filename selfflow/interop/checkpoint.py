"""Loading a training checkpoint back into plain PyTorch objects for sampling, probing or fine-tuning."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfflow.data.vae_folder import check_fingerprint, point_vae_keys
from selfflow.interop.state_check import check_state_fits
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.objectives.selfflow import sampling_ema_key
from selfflow.safe_config import StoredConfigError, first_line, instantiate_stored, stored_config
from selfflow.tokenizers.base import Tokenizer

CHECKPOINT_FORMAT = 1  # selfflow_format of the checkpoints this version writes and reads

WEIGHTS = ("ema", "online")  # and ema_<decay> for each of a run's objective.sampling_ema_decays
WEIGHT_PREFIXES = {"ema": "objective.teacher.module.", "online": "objective.model."}
SAMPLING_EMAS = "objective.sampling_emas."


@dataclass
class LoadedCheckpoint:
    model: SelfFlowTransformer  # in eval mode, on CPU
    tokenizers: dict[str, Tokenizer]
    config: Any  # the run's resolved config (an OmegaConf DictConfig)
    step: int
    path: Path  # what was loaded: a .ckpt file or an export folder
    weights_file: Path  # the file holding the weights (its digest identifies them)


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True: a file that needs arbitrary unpickling is refused, never executed.

    mmap: map the tensors instead of reading them (a cheap validity check of a large file).
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
    """A stored format version must be a whole number this selfflow can read."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(
            f"{source} has format {version!r}, which is not a format version; the file is damaged or not selfflow's"
        )
    if version > CHECKPOINT_FORMAT:
        raise ValueError(
            f"{source} has format {version}, newer than this selfflow ({CHECKPOINT_FORMAT}); upgrade selfflow"
        )


def load_state_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names the first missing, unexpected or mismatched key (shapes, dtypes)."""
    check_state_fits(module.state_dict(), state, source)
    module.load_state_dict(state)


def model_from_state(config, state: Mapping[str, torch.Tensor], source: str, vae: str | None = None):
    """The run's tokenizers (in eval mode) and its model with `state` loaded (the class count read from the label
    table). vae: a folder replacing the stored one of a latent tokenizer (its fingerprint must still match).

    `config` came from a file: its tokenizers and model are built through the allow-list (`instantiate_stored`),
    and the model is first built on the meta device, so that a config whose sizes do not fit the stored weights is
    refused before any memory is allocated for it."""
    if vae is not None:  # the VAE moved: every config node that names it (tokenizer, latent-cache data) follows
        point_vae_keys(config, vae)
    for spec in config.tokenizer.values():
        if "vae" in spec and spec.vae is None:  # exports name no folder of the exporting machine
            raise ValueError(
                f"{source} was trained on the latents of a VAE (fingerprint "
                f"{str(spec.get('fingerprint'))[:16]}); "
                f"name that VAE's local folder: vae=FOLDER (selfflow-sample, selfflow-probe) or "
                f"from_pretrained(..., vae=FOLDER)"
            )
        if "vae" in spec:  # a latent tokenizer: its VAE must be the one the run trained with
            check_fingerprint(spec.vae, spec.get("fingerprint"), "vae")
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
    """Where the `weights` (ema, online, or ema_<decay> of an extra sampling EMA) are in a checkpoint's state."""
    if weights in WEIGHT_PREFIXES:
        return WEIGHT_PREFIXES[weights]
    keys = {k.split(".")[2] for k in state if isinstance(k, str) and k.startswith(SAMPLING_EMAS) and k.count(".") > 3}
    if isinstance(weights, str) and weights.startswith("ema_") and sampling_ema_key(weights) in keys:
        return f"{SAMPLING_EMAS}{sampling_ema_key(weights)}.module."
    extra = sorted("ema_" + key.removeprefix("ema_").replace("_", ".") for key in keys)
    hint = "" if extra else " (an extra EMA is kept when the run sets objective.sampling_ema_decays, e.g. [0.9999])"
    missing = "is not in" if isinstance(weights, str) and weights.startswith("ema_") else "is unknown; it is not in"
    raise ValueError(f"weights={weights!r} {missing} {source}; choose one of: {', '.join([*WEIGHTS, *extra])}{hint}")


def load_checkpoint(path: str | os.PathLike, weights: str = "ema", vae: str | None = None) -> LoadedCheckpoint:
    """Rebuild the model and tokenizers a run trained, from its checkpoint alone; `weights`: ema
    (the teacher), online (the student) or ema_<decay> (an extra sampling EMA of
    objective.sampling_ema_decays).

    `path` may also be a folder written by `selfflow-export` (or its model.safetensors): EMA weights
    only. vae: where the run's VAE is now, when it moved (checked by fingerprint). `hf://OWNER/NAME`
    is an export in huggingface_hub's local cache.
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
