"""Joint attention with text: clean text tokens join the data sequence of `SelfFlowTransformer`.

Text tokens (frozen encoder features, see `selfflow.tokenizers.text`) are projected to the model width and
appended after the data tokens with position ids (0, 0, 0, l). They get their own entry in the conditioning table,
at level 0 (clean), attend and are attended to, and are dropped before the output head, so the flow and
representation losses see data tokens only. The text joins each attention group of the data tokens (the two noise
groups under attention separation) as a view of its own, so that no information crosses between groups through
it; padding (data or text) is never attended to. The pooled text vector is added to every conditioning vector. The
first `two_stream_blocks` blocks keep separate weights for the text stream (the two-stream design, attention still
joint); the blocks after them are single-stream.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfflow.models.attention import GroupMask, attention
from selfflow.models.embeddings import apply_rope
from selfflow.models.layers import TransformerBlock, gather_tokens, modulate
from selfflow.tokens import TextTokens

Joined = tuple[Tensor, Tensor, Tensor, Tensor, GroupMask | None]


def data_groups(data_mask: GroupMask | None, batch: int, num_data: int, device) -> Tensor:
    """[B, N] attention group of every data token, -1 on padding: the mask's groups, or one group without a mask."""
    if data_mask is None:
        return torch.zeros(batch, num_data, dtype=torch.long, device=device)
    if not isinstance(data_mask, GroupMask):
        raise TypeError("with text, attn_mask must be a GroupMask (the attention group of every data token) or None")
    return data_mask.groups


def text_view_groups(text_valid: Tensor, views: int) -> Tensor:
    """[B, views * T] group of every token of the text views: view g joins data group g; -1 on text padding."""
    view = torch.arange(views, device=text_valid.device).repeat_interleave(text_valid.shape[1])  # [views * T]
    return torch.where(text_valid.repeat(1, views), view, -1)


class TextStream(nn.Module):
    """The text side of the model: token and pooled projections, and the text weights of the two-stream blocks."""

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
        self.pooled_proj = nn.Sequential(nn.Linear(text_channels, width), nn.SiLU(), nn.Linear(width, width))
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
        model,
        h: Tensor,
        pos: Tensor,
        cond: Tensor,
        level_index: Tensor,
        attn_mask: GroupMask | None,
        labels: Tensor,
        text: TextTokens,
    ) -> Joined:
        """Append one view of the text per attention group of the data (G views, G = 1 unless the data is split
        into groups): h: [B, N, D] -> [B, N + G T, D], with positions, conditioning table [B, L + 1, D] (last
        entry: the clean text level), per-token indices [B, N + G T] and the joint mask (None: nothing masked)."""
        if text.batch_size != h.shape[0]:
            raise ValueError(f"text for {text.batch_size} samples given with a batch of {h.shape[0]}")
        b, n = h.shape[:2]
        valid = text.valid.to(h.device)
        groups = data_groups(attn_mask, b, n, h.device)  # [B, N]
        views = int(groups.max().clamp_min(0)) + 1
        pooled = self.pooled_proj(text.pooled.to(h.device))[:, None]  # [B, 1, D]
        first_labels = None if labels is None else labels if labels.dim() == 1 else labels[:, 0]
        clean = model.conditioning(torch.zeros(b, 1, device=h.device), first_labels)  # [B, 1, D] at level 0
        table = torch.cat([cond, clean], dim=1) + pooled  # [B, L + 1, D]
        text_index = torch.full((b, views * valid.shape[1]), cond.shape[1], dtype=torch.long, device=h.device)
        text_h = self.token_proj(text.x.to(h.device)).to(h.dtype).repeat(1, views, 1)  # [B, G T, D]
        mask = None
        if attn_mask is not None or not bool(valid.all()):
            mask = GroupMask(torch.cat([groups, text_view_groups(valid, views)], dim=1))
        return (
            torch.cat([h, text_h], dim=1),
            torch.cat([pos, text.pos.to(pos.device).repeat(1, views, 1)], dim=1),
            table,
            torch.cat([level_index, text_index], dim=1),
            mask,
        )

    def block(self, number: int, block: nn.Module, num_data: int):
        """The callable for 1-based block `number`: the two-stream form for the first blocks, else `block` itself."""
        if number > len(self.text_blocks):
            return block
        text_block = self.text_blocks[number - 1]

        def two_stream(x: Tensor, cond: Tensor, cond_index: Tensor, rope=None, mask=None) -> Tensor:
            return two_stream_forward(block, text_block, x, cond, cond_index, rope, mask, num_data)

        return two_stream


def two_stream_forward(
    data_block: nn.Module,
    text_block: nn.Module,
    x: Tensor,
    cond: Tensor,
    cond_index: Tensor,
    rope,
    mask: GroupMask | Tensor | None,
    num_data: int,
) -> Tensor:
    """A DiT block with separate weights per stream (data: x[:, :N], text: x[:, N:]) and one joint attention."""
    parts = []
    for block, xs, index in (
        (data_block, x[:, :num_data], cond_index[:, :num_data]),
        (text_block, x[:, num_data:], cond_index[:, num_data:]),
    ):
        mod = gather_tokens(block.adaLN_modulation(cond), index).chunk(6, dim=-1)
        parts.append((block, xs, mod, *block.attn.heads_of(modulate(block.norm1(xs), mod[0], mod[1]))))
    q, k, v = (torch.cat([p[i] for p in parts], dim=2) for i in (3, 4, 5))  # [B, H, N + T, Dh]
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    attended = attention(q, k, v, mask, data_block.attn.backend)  # [B, N + T, H Dh]
    out = []
    for (block, xs, mod, *_), a in zip(parts, (attended[:, :num_data], attended[:, num_data:])):
        xs = xs + mod[2] * block.attn.proj(a)
        out.append(xs + mod[5] * block.mlp(modulate(block.norm2(xs), mod[3], mod[4])))
    return torch.cat(out, dim=1)
