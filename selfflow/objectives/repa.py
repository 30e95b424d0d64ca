"""REPA: representation alignment of a student layer to a frozen external encoder's patch features.

REPA (Yu et al.) adds to flow matching `lambda * mean(-cos(projector(h_l), z))` over tokens, where
`h_l` is the output of student block l (8 of 28 for SiT-XL), the projector an MLP D -> 2048 -> 2048
-> z_dim with SiLU, `z` the frozen encoder's patch features of the clean image at the matching
resolution, and lambda 0.5. Here it is a part of `SelfFlowObjective` (`objective=repa`: one noise
level per sample, no self-distillation), so that REPA, Self-Flow and vanilla flow matching share
model, data, schedules, EMA, sampler and evaluation.

Images only: the encoder sees pixels (the batch's own, or the clean latents decoded by the VAE for a
latent cache). The encoder is never stored in checkpoints; the run records its fingerprint."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.objectives.external_encoder import ExternalEncoder
from selfflow.tokens import Tokens

REPA_DEPTH_FRACTION = 8 / 28  # REPA aligns the output of block 8 of SiT-XL's 28


def default_alignment_layer(depth: int) -> int:
    """REPA's layer scaled by depth: 8 of 28 (1-based block output)."""
    return max(1, round(REPA_DEPTH_FRACTION * depth))


def repa_projector(width: int, hidden: int, out: int) -> nn.Sequential:
    """REPA's projector: Linear D -> hidden, SiLU, Linear hidden -> hidden, SiLU,
    Linear hidden -> z_dim."""
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, out),
    )


class REPAAlignment(nn.Module):
    """REPA's alignment loss; built by `SelfFlowObjective` with the model's width and depth.

    Args:
        width: the student's hidden size D.
        depth: the student's blocks (for the default layer).
        encoder: a local folder with a `transformers` Dinov2Model.
        fingerprint: the encoder a checkpoint was trained with (None: computed; another one is
            refused).
        weight: lambda, the loss weight (REPA: 0.5).
        layer: the 1-based student block whose output is aligned (None: 8 of 28, scaled by depth).
        projector_dim: the projector's hidden width (REPA: 2048).
        encoder_resolution: the encoder's input side in pixels (None: its patch size x the
            student's grid).
    """

    def __init__(
        self,
        width: int,
        depth: int,
        encoder: str | os.PathLike,
        fingerprint: str | None = None,
        weight: float = 0.5,
        layer: int | None = None,
        projector_dim: int = 2048,
        encoder_resolution: int | None = None,
    ):
        super().__init__()
        if weight < 0:
            raise ValueError(f"objective.alignment.weight={weight} must be >= 0")
        self.layer = default_alignment_layer(depth) if layer is None else int(layer)
        if not 1 <= self.layer <= depth:
            raise ValueError(
                f"objective.alignment.layer={layer} must be in 1..{depth} (the model depth)",
            )
        self.weight = float(weight)
        self.encoder = ExternalEncoder(encoder, fingerprint, encoder_resolution)
        self.projector = repa_projector(width, projector_dim, self.encoder.feature_dim)

    def forward(self, hidden: Tensor, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """hidden: [B, N, D] student block output; images: [B, C, H, W] clean, in [0, 1]; grid: the
        student's (gh, gw) with gh * gw = N -> per-token loss [B, N]: -cos(projector(hidden), z)."""
        target = self.encoder(images, grid)  # [B, N, z], no gradient
        if target.shape[1] != hidden.shape[1]:
            raise ValueError(
                f"REPA: the student has {hidden.shape[1]} tokens but its grid {grid} gives "
                f"{target.shape[1]}; REPA needs unpacked, unpadded image batches"
            )
        projected = self.projector(hidden).float()
        return -F.cosine_similarity(projected, target, dim=-1)


def token_grid(tokens: Tokens) -> tuple[int, int]:
    """(gh, gw) of an image batch's tokens, from their (t, h, w, l) position ids."""
    pos = tokens.pos[0]
    return int(pos[:, 1].max()) + 1, int(pos[:, 2].max()) + 1


def clean_images(data: Tensor, tokens: Tokens, tokenizer) -> Tensor:
    """[B, C, H, W] in [0, 1]: the batch's own pixels, or (a latent cache batch) its clean latents
    decoded.

    Args:
        data: the batch's `data` (images, or cached latents).
        tokens: the batch's clean tokens.
        tokenizer: the image tokenizer (its `decode` turns clean tokens back into pixels).

    Returns:
        Images for the external encoder.
    """
    size = tuple(getattr(tokenizer, "image_size", ()))
    if data.dim() == 4 and data.shape[1] in (1, 3) and tuple(data.shape[-2:]) == size:
        return data
    return tokenizer.decode(tokens.x)


def check_stored_encoder(
    alignment: REPAAlignment | None,
    stored: Mapping[str, Any] | None,
    source: str,
) -> None:
    """Resuming: the run's encoder must be the one the checkpoint's run aligned to (by
    fingerprint)."""
    theirs = (((stored or {}).get("objective") or {}).get("alignment") or {}).get("fingerprint")
    if alignment is None or not theirs or theirs == alignment.encoder.fingerprint:
        return
    raise ValueError(
        f"{source} was trained with another REPA encoder (fingerprint {theirs[:16]}) than "
        f"objective.encoder={alignment.encoder.path} "
        f"({alignment.encoder.fingerprint[:16]}); point it at the encoder the run was trained with"
    )
