"""Loading a training checkpoint back into plain PyTorch objects for sampling, probing or fine-tuning."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from selfflow.models.transformer import SelfFlowTransformer
from selfflow.tokenizers.base import Tokenizer
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


def load_checkpoint(path: str | os.PathLike, weights: str = "ema") -> LoadedCheckpoint:
    """Rebuild the model and tokenizers a run trained, from its checkpoint alone; `weights`: ema or online."""
    from hydra.utils import instantiate

    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is unknown; choose one of {WEIGHTS}")
    checkpoint = read_checkpoint(path)
    config = OmegaConf.create(checkpoint["selfflow_config"])
    tokenizers = {m: instantiate(spec) for m, spec in config.tokenizer.items()}
    prefix = "objective.teacher.module." if weights == "ema" else "objective.model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    label_rows = state.get("y_embedder.embedding_table.weight")
    num_classes = label_rows.shape[0] - 1 if label_rows is not None else 0
    model = instantiate(config.model)(token_channels={m: t.token_channels for m, t in tokenizers.items()},
                                      num_classes=num_classes)
    load_state_checked(model, state, f"checkpoint {path} ({weights} weights)")
    return LoadedCheckpoint(model.eval(), tokenizers, config, int(checkpoint.get("global_step", 0)), Path(path))
