"""What every tokenizer returns, and the interface it implements."""

from __future__ import annotations

import torch
from torch import Tensor

from selfflow.tokens import Tokens


class Tokenizer(torch.nn.Module):
    """Turns raw samples of one modality into `Tokens` and back.

    Subclasses set `modality`, `token_channels` and implement `encode`, `decode` and `positions`.
    A module so that latent tokenizers can hold (frozen) autoencoder weights and follow the device.
    """

    modality: str = ""
    token_channels: int = 0

    def encode(self, data: Tensor) -> Tokens:
        raise NotImplementedError

    def decode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def positions(self, batch_size: int, device=None) -> Tensor:
        """[B, N, 4] position ids of a full-size sample (what generation starts from)."""
        raise NotImplementedError
