"""Loading a training checkpoint back into plain PyTorch objects for sampling, probing or fine-tuning."""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from selfflow.models.transformer import SelfFlowTransformer
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokenizers.vae_folder import check_fingerprint, point_vae_keys
from selfflow.training.module import CHECKPOINT_FORMAT
from selfflow.training.state_check import check_state_fits

WEIGHTS = ("ema", "online")


@dataclass
class LoadedCheckpoint:
    model: SelfFlowTransformer  # in eval mode, on CPU
    tokenizers: dict[str, Tokenizer]
    config: Any  # the run's resolved config (an OmegaConf DictConfig)
    step: int
    path: Path


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True: a file that needs arbitrary unpickling is refused, never executed.

    mmap: map the tensors instead of reading them (a cheap validity check of a large file).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .ckpt file from a run's checkpoints/")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 - corrupt or unsafe files end here
        raise ValueError(f"cannot load checkpoint {path} safely: {type(error).__name__}: {error}") from error
    if not isinstance(checkpoint, dict) or "selfflow_config" not in checkpoint:
        raise ValueError(f"{path} is not a selfflow training checkpoint (it has no stored selfflow config)")
    if checkpoint.get("selfflow_format", 0) > CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {checkpoint['selfflow_format']}, newer than this selfflow "
                         f"({CHECKPOINT_FORMAT}); upgrade selfflow")
    return checkpoint


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names the first missing, unexpected or mismatched key and both shapes."""
    check_state_fits(module.state_dict(), state, source)
    module.load_state_dict(state)


def model_from_state(config, state: dict[str, torch.Tensor], source: str, vae: str | None = None):
    """The run's tokenizers (in eval mode) and its model with `state` loaded (the class count read from the label
    table). vae: a folder replacing the stored one of a latent tokenizer (the fingerprint must still match)."""
    from hydra.utils import instantiate

    if vae is not None:  # the VAE moved: every config node that names it (tokenizer, latent-cache data) follows
        point_vae_keys(config, vae)
    for spec in config.tokenizer.values():
        if "vae" in spec:  # a latent tokenizer: its VAE must be the one the run trained with
            check_fingerprint(spec.vae, spec.get("fingerprint"), "vae")
    tokenizers = {m: instantiate(spec).eval() for m, spec in config.tokenizer.items()}
    label_rows = state.get("y_embedder.embedding_table.weight")
    num_classes = label_rows.shape[0] - 1 if label_rows is not None else 0
    model = instantiate(config.model)(token_channels={m: t.token_channels for m, t in tokenizers.items()},
                                      num_classes=num_classes)
    load_state_checked(model, state, source)
    return model.eval(), tokenizers


def load_checkpoint(path: str | os.PathLike, weights: str = "ema", vae: str | None = None) -> LoadedCheckpoint:
    """Rebuild the model and tokenizers a run trained, from its checkpoint alone; `weights`: ema or online.

    `path` may also be a folder written by `export_weights` (or its model.safetensors): EMA weights only.
    vae: where the run's VAE is now, when it moved (checked by fingerprint).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is unknown; choose one of {WEIGHTS}")
    path = Path(path).expanduser()
    if path.is_dir() or path.suffix == ".safetensors":
        return load_exported(path if path.is_dir() else path.parent, vae)
    checkpoint = read_checkpoint(path)
    config = OmegaConf.create(checkpoint["selfflow_config"])
    prefix = "objective.teacher.module." if weights == "ema" else "objective.model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model, tokenizers = model_from_state(config, state, f"checkpoint {path} ({weights} weights)", vae)
    return LoadedCheckpoint(model, tokenizers, config, int(checkpoint.get("global_step", 0)), path)


EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"


def export_weights(checkpoint_path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """The EMA weights of a checkpoint as `folder/model.safetensors` plus the run config as `folder/config.json`:
    a pickle-free pair to share (load it back with `load_checkpoint(folder)`)."""
    from safetensors.torch import save_file

    loaded = load_checkpoint(checkpoint_path, weights="ema")
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in loaded.model.state_dict().items()}
    save_file(state, str(folder / EXPORT_WEIGHTS), metadata={"weights": "ema", "step": str(loaded.step)})
    meta = {"selfflow_format": CHECKPOINT_FORMAT, "step": loaded.step, "weights": "ema",
            "config": OmegaConf.to_container(loaded.config, resolve=True)}
    (folder / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_exported(folder: str | os.PathLike, vae: str | None = None) -> LoadedCheckpoint:
    """The model of an `export_weights` folder (safetensors: no code can run while loading)."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    weights, meta_path = folder / EXPORT_WEIGHTS, folder / EXPORT_CONFIG
    if not weights.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not an exported model: it needs {EXPORT_WEIGHTS} and {EXPORT_CONFIG} "
                                f"(write them with tools/export_weights.py)")
    meta = json.loads(meta_path.read_text())
    if meta.get("selfflow_format", 0) > CHECKPOINT_FORMAT:
        raise ValueError(f"{folder} has format {meta['selfflow_format']}, newer than this selfflow "
                         f"({CHECKPOINT_FORMAT}); upgrade selfflow")
    config = OmegaConf.create(meta["config"])
    model, tokenizers = model_from_state(config, load_file(str(weights)), f"exported weights {weights}", vae)
    return LoadedCheckpoint(model, tokenizers, config, int(meta.get("step", 0)), folder)
