"""Whether a stored state dict fits a model, named precisely when it does not."""
from __future__ import annotations

from collections.abc import Mapping

import torch


def check_state_fits(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ValueError naming the first missing, mismatched or unexpected key (with both shapes)."""
    for key, value in own.items():
        if key not in state:
            raise ValueError(f"{source} does not fit this model: it has no entry for {key!r} (was it trained with "
                             f"another model or objective config?)")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{source} does not fit this model: {key!r} has shape {tuple(state[key].shape)} in the "
                             f"checkpoint but {tuple(value.shape)} in the model")
    extra = sorted(set(state) - set(own))
    if extra:
        raise ValueError(f"{source} does not fit this model: unexpected entry {extra[0]!r}")
