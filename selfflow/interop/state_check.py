"""Whether a stored state dict fits a model, named precisely when it does not."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def check_state_fits(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise ValueError naming the first missing, mismatched or unexpected key (with both shapes
    or dtypes).

    A floating-point entry may be stored in another floating-point dtype (bf16 weights load into a
    float32 model); any other dtype must match exactly."""
    for key, value in own.items():
        if key not in state:
            raise ValueError(
                f"{source} does not fit this model: it has no entry for {key!r} (was it trained "
                f"with another model or objective config?)"
            )
        stored = state[key]
        if not isinstance(stored, torch.Tensor):
            raise ValueError(
                f"{source} does not fit this model: {key!r} is a "
                f"{type(stored).__name__}, not a tensor"
            )
        if tuple(stored.shape) != tuple(value.shape):
            raise ValueError(
                f"{source} does not fit this model: {key!r} has shape {tuple(stored.shape)} in the "
                f"checkpoint but {tuple(value.shape)} in the model"
            )
        if stored.dtype != value.dtype and not (
            stored.is_floating_point() and value.is_floating_point()
        ):
            raise ValueError(
                f"{source} does not fit this model: {key!r} has dtype {stored.dtype} in the "
                f"checkpoint but {value.dtype} in the model"
            )
    extra = sorted(map(str, set(state) - set(own)))
    if extra:
        raise ValueError(f"{source} does not fit this model: unexpected entry {extra[0]!r}")
