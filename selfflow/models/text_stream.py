"""Joint attention with text: clean text tokens join the data sequence of `SelfFlowTransformer`.

Text tokens (frozen encoder features, see `selfflow.tokenizers.text`) are projected to the model
width and appended after the data tokens with position ids (0, 0, 0, l). They get their own entry in
the conditioning table, at level 0 (clean), attend and are attended to, and are dropped before the
output head, so the flow and representation losses see data tokens only. The text joins each
attention group of the data tokens (the two noise groups under attention separation) as a view of
its own, so that no information crosses between groups through it; padding (data or text) is never
attended to. The pooled text vector is added to every conditioning vector. The first
`two_stream_blocks` blocks keep separate weights for the text stream (the two-stream design,
attention still joint): the shared `TransformerBlock` runs them, given the text block as its
`SecondStream`; the blocks after them are single-stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfflow.models.attention import GroupMask
from selfflow.models.layers import SecondStream, TransformerBlock
from selfflow.tokens import TextTokens


@dataclass
class JoinedText:
    """The data tokens with the text views appended (N data tokens, G views of T text tokens).

    Attributes:
        h: [B, N + G T, D] the joined tokens.
        pos: [B, N + G T, 4] their position ids.
        cond_index: [B, N + G T] long; the text tokens point at the conditioning table's last entry,
            the clean text level.
        mask: The joint attention groups; None when nothing is masked.
        pooled: [B, 1, D] the projected pooled text, added to every conditioning vector.
    """

    h: Tensor
    pos: Tensor
    cond_index: Tensor
    mask: GroupMask | None
    pooled: Tensor


def data_groups(data_mask: GroupMask | None, batch: int, num_data: int, device) -> Tensor:
    """[B, N] attention group of every data token, -1 on padding (one group without a mask).

    Args:
        data_mask: The data tokens' attention groups, or None for one group.
        batch: B, the rows.
        num_data: N, the data tokens per row.
        device (torch.device): Where the groups are made.

    Returns:
        [B, N] long group of each data token.

    Raises:
        TypeError: The mask is a dense tensor, which does not say the groups.
    """
    if data_mask is None:
        return torch.zeros(batch, num_data, dtype=torch.long, device=device)
    if not isinstance(data_mask, GroupMask):
        raise TypeError(
            "with text, attn_mask must be a GroupMask (each data token's attention group) or None",
        )
    return data_mask.groups


def text_view_groups(text_valid: Tensor, views: int) -> Tensor:
    """[B, views * T] group of every token of the text views: view g joins data group g.

    Args:
        text_valid: [B, T] bool, False on text padding.
        views: G, the attention groups of the data.

    Returns:
        [B, G T] long group of each text token; -1 on text padding.
    """
    view = torch.arange(views, device=text_valid.device).repeat_interleave(text_valid.shape[1])
    return torch.where(text_valid.repeat(1, views), view, -1)


class TextStream(nn.Module):
    """The text side of the model: token and pooled projections, and the text weights of the
    two-stream blocks.

    Args:
        text_channels: The text encoder's feature width.
        width: D, the model width.
        heads: Attention heads.
        mlp_ratio: The MLP's hidden width as a multiple of D.
        qk_norm: Normalise queries and keys.
        two_stream_blocks: How many first blocks keep separate text weights.
    """

    def __init__(
        self,
        text_channels: int,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        two_stream_blocks: int = 0,
    ):
        super().__init__()
        self.token_proj = nn.Linear(text_channels, width)
        self.pooled_proj = nn.Sequential(
            nn.Linear(text_channels, width),
            nn.SiLU(),
            nn.Linear(width, width),
        )
        self.text_blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio, qk_norm=qk_norm, attention="sdpa")
            for _ in range(two_stream_blocks)
        )

    def zero_init(self) -> None:
        """adaLN-Zero for the text weights, and a pooled projection that starts at zero."""
        for block in self.text_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.pooled_proj[-1].weight)
        nn.init.zeros_(self.pooled_proj[-1].bias)

    def join(
        self,
        h: Tensor,
        pos: Tensor,
        cond_index: Tensor,
        attn_mask: GroupMask | None,
        text: TextTokens,
        text_level: int,
    ) -> JoinedText:
        """Append one view of the text per attention group of the data (G views, G = 1 unless the
        data is split into groups).

        Args:
            h: [B, N, D] the embedded data tokens.
            pos: [B, N, 4] their position ids.
            cond_index: [B, N] long, each data token's entry in the conditioning table.
            attn_mask: The data tokens' attention groups, or None for one group.
            text: The batch's captions.
            text_level: The conditioning table's entry of the clean text level (its last).

        Returns:
            The joined tokens, positions, indices and mask, and the projected pooled text.

        Raises:
            ValueError: The captions are not one per row.
        """
        if text.batch_size != h.shape[0]:
            raise ValueError(
                f"text for {text.batch_size} samples given with a batch of {h.shape[0]}",
            )
        b, n = h.shape[:2]
        valid = text.valid.to(h.device)
        groups = data_groups(attn_mask, b, n, h.device)  # [B, N]
        views = int(groups.max().clamp_min(0)) + 1
        shape = (b, views * valid.shape[1])  # [B, G T]
        text_index = torch.full(shape, text_level, dtype=torch.long, device=h.device)
        text_h = self.token_proj(text.x.to(h.device)).to(h.dtype).repeat(1, views, 1)  # [B, G T, D]
        mask = None
        if attn_mask is not None or not bool(valid.all()):
            mask = GroupMask(torch.cat([groups, text_view_groups(valid, views)], dim=1))
        return JoinedText(
            h=torch.cat([h, text_h], dim=1),
            pos=torch.cat([pos, text.pos.to(pos.device).repeat(1, views, 1)], dim=1),
            cond_index=torch.cat([cond_index, text_index], dim=1),
            mask=mask,
            pooled=self.pooled_proj(text.pooled.to(h.device))[:, None],  # [B, 1, D]
        )

    def second_stream(self, number: int, start: int) -> SecondStream | None:
        """The text weights of 1-based block `number` (two-stream); None where it is one stream.

        Args:
            number: The block's 1-based number.
            start: The first text token of the joined sequence (N, the data tokens).

        Returns:
            The text block and where its tokens start, for `TransformerBlock.forward`.
        """
        if number > len(self.text_blocks):
            return None
        return SecondStream(self.text_blocks[number - 1], start)
