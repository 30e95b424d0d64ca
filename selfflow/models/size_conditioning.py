"""Size and crop conditioning for multi-aspect training: original size, crop offsets and target size
-> a vector.

Each of the six numbers (original h, w, crop top, left, target h, w, in pixels) gets sinusoidal
features; an MLP maps their concatenation to the model width, and the result is added to every
conditioning vector of the sample. The last layer starts at zero, so a model trained without it
starts out unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

from selfflow.models.embeddings import sinusoidal_embedding

SIZE_FIELDS = ("original_h", "original_w", "crop_top", "crop_left", "target_h", "target_w")


class SizeEmbedder(nn.Module):
    def __init__(self, width: int, frequency_dim: int = 64):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(len(SIZE_FIELDS) * frequency_dim, width),
            nn.SiLU(),
            nn.Linear(width, width),
        )

    def zero_init(self) -> None:
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, sizes: Tensor) -> Tensor:
        """sizes: [B, 6] in SIZE_FIELDS order -> [B, D]."""
        if sizes.dim() != 2 or sizes.shape[1] != len(SIZE_FIELDS):
            expected = f"[B, {len(SIZE_FIELDS)}] values {SIZE_FIELDS}"
            raise ValueError(f"size conditioning expects {expected}, got {list(sizes.shape)}")
        features = sinusoidal_embedding(sizes.float(), self.frequency_dim).flatten(1)  # [B, 6 F]
        return self.mlp(features.to(self.mlp[0].weight.dtype))
