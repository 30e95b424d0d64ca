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
        """Raw samples -> tokens with their position ids.

        Args:
            data: A batch of raw samples (images, clips or waveforms; each subclass says its shape).

        Returns:
            Tokens of this tokenizer's modality.
        """
        raise NotImplementedError

    def decode(self, x: Tensor) -> Tensor:
        """Tokens back to raw samples a person can look at or listen to.

        Args:
            x: [B, N, C] token features of a full-size sample.

        Returns:
            The raw samples, in the layout `encode` takes.
        """
        raise NotImplementedError

    def positions(self, batch_size: int, device=None) -> Tensor:
        """[B, N, 4] position ids of a full-size sample (what generation starts from).

        Args:
            batch_size: B, the number of samples.
            device (torch.device | str | None): Where the ids are made; None for the default device.

        Returns:
            [B, N, 4] long ids over (t, h, w, l).
        """
        raise NotImplementedError
