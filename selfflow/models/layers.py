"""The layers of the backbone: per-token modulation gathered from a few distinct conditioning
vectors, the DiT block (which also runs two-stream text), and the final adaLN layer. Imported by the
transformer and by the text stream (no import cycle)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.models.attention import Attention


class GatherRows(torch.autograd.Function):
    """torch.gather of table rows per token whose backward is a one-hot matrix product.

    The plain gather's backward is a scatter-add of N token gradients into L << N rows: atomics
    that contend on a GPU (it made per-token conditioning slower than the naive per-token MLP
    there). The product [B, L, N] @ [B, N, K] sums the same terms in a tensor-core kernel; the
    forward stays an exact copy.
    """

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor) -> Tensor:
        """Gather one row of `table` per token.

        Args:
            ctx (FunctionCtx): The autograd context.
            table: [B, L, K] the distinct rows.
            index: [B, N] long, the row of each token.

        Returns:
            [B, N, K] each token's row.
        """
        ctx.save_for_backward(index)
        ctx.rows = table.shape[1]
        return torch.gather(table, 1, index[..., None].expand(-1, -1, table.shape[-1]))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        """Sum the tokens' gradients into their rows with one batched matrix product.

        Args:
            ctx (FunctionCtx): The autograd context.
            grad: [B, N, K] the gradient of each token's row.

        Returns:
            ([B, L, K] the gradient of the table, None for the index).
        """
        (index,) = ctx.saved_tensors
        one_hot = F.one_hot(index, ctx.rows).to(grad.dtype)  # [B, N, L]
        return torch.bmm(one_hot.transpose(1, 2), grad), None  # [B, L, K]


def gather_tokens(table: Tensor, index: Tensor) -> Tensor:
    """table: [B, L, K], index: [B, N] -> [B, N, K]; a broadcast view when L == 1.

    Args:
        table: [B, L, K] the distinct rows (e.g. modulations of the distinct conditioning vectors).
        index: [B, N] long, the row of each token.

    Returns:
        [B, N, K] each token's row.
    """
    if table.shape[1] == 1:
        return table.expand(-1, index.shape[1], -1)
    return GatherRows.apply(table, index)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x * (1 + scale) + shift.

    Args:
        x: [B, N, D] normalised tokens.
        shift: [B, N, D] per-token shift.
        scale: [B, N, D] per-token scale.

    Returns:
        [B, N, D] the modulated tokens.
    """
    return x * (1 + scale) + shift


def split_streams(tokens: Tensor, sizes: list[int]) -> tuple[Tensor, ...]:
    """[B, N, ...] -> one view per stream along the token axis (the tensor itself for one stream).

    Args:
        tokens: [B, N, ...] values of the joined sequence.
        sizes: The tokens of each stream, summing to N.

    Returns:
        [B, n_i, ...] per stream.
    """
    return (tokens,) if len(sizes) == 1 else tokens.split(sizes, dim=1)


@dataclass(frozen=True)
class SecondStream:
    """The tail of a joined sequence that runs on another block's weights (two-stream text).

    Attention stays joint over the whole sequence; only the weights differ per stream.

    Attributes:
        block: The block whose weights the tokens x[:, start:] use (a `TransformerBlock`, so the
            computation is the same).
        start: The first token of the second stream.
    """

    block: TransformerBlock
    start: int


class TransformerBlock(nn.Module):
    """DiT block: LN -> modulate -> attention -> gated residual, LN -> modulate -> MLP -> gated
    residual.

    The one block of every model: with two-stream text (`SecondStream`) the same forward runs the
    text tokens on the text block's weights, so a change here reaches text models too.

    Args:
        width: D, the model width.
        heads: Attention heads.
        mlp_ratio: The MLP's hidden width as a multiple of D.
        qk_norm: Normalise queries and keys.
        attention: The attention kernel: `auto`, `sdpa`, `flash` or `flex`.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        attention: str = "auto",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qk_norm=qk_norm, backend=attention)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, width),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        cond_index: Tensor,
        rope=None,
        mask: Tensor | None = None,
        second: SecondStream | None = None,
    ) -> Tensor:
        """x: [B, N, D]; cond: [B, L, D] distinct conditioning vectors; cond_index: [B, N] into L.

        Args:
            x: [B, N, D] tokens.
            cond: [B, L, D] the distinct conditioning vectors.
            cond_index: [B, N] long, which of them each token uses.
            rope (tuple[Tensor, Tensor] | None): (cos, sin) of the rotary embedding; None for none.
            mask: The attention mask (a GroupMask or [B, 1, N, N] bool); None for full attention.
            second: The tail of x that runs on another block's weights (two-stream text); None:
                every token uses this block's weights.

        Returns:
            [B, N, D] the block's output.
        """
        sizes = [x.shape[1]] if second is None else [second.start, x.shape[1] - second.start]
        blocks = [self] if second is None else [self, second.block]
        streams = list(zip(blocks, split_streams(x, sizes), split_streams(cond_index, sizes)))
        mods = [block.modulation(cond, index) for block, _, index in streams]  # 6 x [B, n, D] each
        heads = []  # per stream: q, k, v, each [B, H, n, Dh]
        for (block, xs, _), mod in zip(streams, mods):
            heads.append(block.attn.heads_of(modulate(block.norm1(xs), mod[0], mod[1])))
        q, k, v = (torch.cat(parts, dim=2) if len(parts) > 1 else parts[0] for parts in zip(*heads))
        attended = self.attn.attend(q, k, v, rope, mask)  # [B, N, D]: one attention, all streams
        out = []
        for (block, xs, _), mod, a in zip(streams, mods, split_streams(attended, sizes)):
            xs = xs + mod[2] * block.attn.proj(a)
            out.append(xs + mod[5] * block.mlp(modulate(block.norm2(xs), mod[3], mod[4])))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def modulation(self, cond: Tensor, cond_index: Tensor) -> tuple[Tensor, ...]:
        """Per-token shift, scale and gate of the attention and the MLP.

        Args:
            cond: [B, L, D] the distinct conditioning vectors.
            cond_index: [B, N] long, which of them each token uses.

        Returns:
            (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m), each [B, N, D].
        """
        return gather_tokens(self.adaLN_modulation(cond), cond_index).chunk(6, dim=-1)


class FinalLayer(nn.Module):
    """Per-token adaLN then a linear map to the modality's token channels.

    Args:
        width: D, the model width.
        out_channels: C, the modality's token channels.
    """

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, cond: Tensor, cond_index: Tensor) -> Tensor:
        """Map the last block's tokens to the modality's velocity.

        Args:
            x: [B, N, D] tokens.
            cond: [B, L, D] the distinct conditioning vectors.
            cond_index: [B, N] long, which of them each token uses.

        Returns:
            [B, N, C] the velocity.
        """
        shift, scale = gather_tokens(self.adaLN_modulation(cond), cond_index).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))
