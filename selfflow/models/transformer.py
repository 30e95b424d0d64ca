"""The flow-matching transformer: per-modality input and output, shared blocks with per-token
adaLN-Zero.

Per-token conditioning is computed on the distinct conditioning vectors only: a sample carries a
few noise levels (`levels: [B, L]`, L = 1 at inference, 2 in Self-Flow training) and each token
points at one of them (`level_index: [B, N]`). The modulation MLPs run on the [B, L] table and the
result is gathered per token, so the outputs equal those of running the MLPs on every token at
close to plain-DiT cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from selfflow.models.attention import GroupMask
from selfflow.models.embeddings import LabelEmbedder, MultiAxisRoPE, TimestepEmbedder, sincos_2d
from selfflow.models.layers import FinalLayer, SecondStream, TransformerBlock
from selfflow.models.size_conditioning import SizeEmbedder
from selfflow.models.text_stream import TextStream
from selfflow.tokens import NO_LABEL, TEXT, Condition, PackedTokens, TokenModalities, Tokens

# sincos: the fixed 2D grid of the released ImageNet model, images only
POSITION_EMBEDDINGS = ("rope", "sincos")


@dataclass
class ModelOutput:
    """What a forward returns: the velocity and the hidden states asked for.

    Attributes:
        velocity: [B, N, C] the predicted velocity of the data tokens; None when the forward stopped
            early.
        hidden: Block number (1-based) -> [B, N, D] that block's output on the data tokens.
    """

    velocity: Tensor | None  # [B, N, C]; None when the forward stopped early
    hidden: dict[int, Tensor] = field(default_factory=dict)  # block number (1-based) -> [B, N, D]


def check_backbone(
    token_channels: dict[str, int],
    text_channels: int | None,
    sizes: dict[str, int],
    pos_embed: str,
    text_stream_blocks: int,
) -> None:
    """The checks of `SelfFlowTransformer`'s arguments, each naming its config key.

    Args:
        token_channels: Channels per generated modality (text excluded).
        text_channels: The text encoder's width, or None without text.
        sizes: {"depth": ..., "width": ..., "heads": ...}.
        pos_embed: `rope` or `sincos`.
        text_stream_blocks: The two-stream text blocks.

    Raises:
        ValueError: The first argument out of range.
    """
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{key}={value!r} must be an integer >= 1")
    width, heads, depth = sizes["width"], sizes["heads"], sizes["depth"]
    if width % heads:
        raise ValueError(f"model.width={width} must be a multiple of model.heads={heads}")
    if pos_embed not in POSITION_EMBEDDINGS:
        raise ValueError(
            f"model.pos_embed={pos_embed!r} is unknown; choose one of {POSITION_EMBEDDINGS}",
        )
    if not token_channels:
        raise ValueError(
            "token_channels is empty: the model needs at least one modality's tokenizer",
        )
    without_grid = sorted(set(token_channels) - {"image"}) + ([TEXT] if text_channels else [])
    if pos_embed == "sincos" and without_grid:
        raise ValueError(
            f"model.pos_embed=sincos encodes the (h, w) grid of images only, not the time axis or "
            f"the text positions of {without_grid}; use model.pos_embed=rope for this model"
        )
    if not 0 <= text_stream_blocks <= depth:
        raise ValueError(
            f"model.text_stream_blocks={text_stream_blocks} must be in 0..{depth} (the depth)",
        )


class SelfFlowTransformer(nn.Module):
    """Shared transformer with per-modality input projections and output heads.

    Args:
        token_channels: Channels of one token per modality, e.g. {"image": 12}; a "text" entry (the
            text encoder's feature width) adds joint attention with text tokens
            (`selfflow.models.text_stream`).
        width: D, the hidden width of every block.
        depth: The number of transformer blocks.
        heads: Attention heads; divides `width`.
        mlp_ratio: Hidden width of a block's MLP, as a multiple of `width`.
        num_classes: Class labels (0 = unconditional); label `num_classes` is the null label.
        pos_embed: `rope` (multi-axis rotary over (t, h, w, l)) or `sincos` (the released ImageNet
            model's fixed 2D grid, images only).
        rope_axes: Rotary sizes per axis (t, h, w, l), even and summing to the head width; None
            splits it.
        rope_theta: The rotary base frequency.
        qk_norm: Normalise queries and keys before attention.
        attention: The attention kernel: `auto`, `sdpa`, `flash` or `flex`.
        time_scale: Noise levels are multiplied by it before their sinusoidal embedding.
        activation_checkpointing: Recompute each block in the backward pass to save memory.
        compile: `torch.compile` each block.
        text_stream_blocks: With text, how many first blocks keep separate text weights
            (two-stream); the blocks after them are single-stream.
        size_conditioning: Embed (original size, crop offsets, target size) into the conditioning
            (multi-aspect training).
        modality_embedding: Learn an embedding per modality added after its input projection;
            False keeps it zero and frozen (the released layout has none, so a model in it has
            exactly the released parameters).

    Raises:
        ValueError: A size is not a positive integer, `width` is not a multiple of `heads`, an
            unknown `pos_embed`, `sincos` with non-image modalities or text, no modality, or
            `text_stream_blocks` outside 0..depth.
    """

    def __init__(
        self,
        token_channels: dict[str, int],
        width: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        pos_embed: str = "rope",
        rope_axes: list[int] | None = None,
        rope_theta: float = 10000.0,
        qk_norm: bool = False,
        attention: str = "auto",
        time_scale: float = 1000.0,
        activation_checkpointing: bool = False,
        compile: bool = False,
        text_stream_blocks: int = 0,
        size_conditioning: bool = False,
        modality_embedding: bool = True,
    ):
        super().__init__()
        # text conditions the model; it is not a modality it generates
        text_channels = token_channels.get(TEXT)
        token_channels = {m: c for m, c in token_channels.items() if m != TEXT}
        sizes = {"depth": depth, "width": width, "heads": heads}
        check_backbone(token_channels, text_channels, sizes, pos_embed, text_stream_blocks)
        self.width, self.depth, self.heads = width, depth, heads
        self.num_classes, self.pos_embed = num_classes, pos_embed
        self.token_channels = dict(token_channels)
        self.activation_checkpointing = activation_checkpointing
        self.input_proj = nn.ModuleDict({m: nn.Linear(c, width) for m, c in token_channels.items()})
        learn = modality_embedding  # False: zero and frozen
        self.modality_embed = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(width), requires_grad=learn) for m in token_channels},
        )
        self.t_embedder = TimestepEmbedder(width, scale=time_scale)
        self.y_embedder = LabelEmbedder(num_classes, width)
        self.rope = None
        if pos_embed == "rope":
            self.rope = MultiAxisRoPE(width // heads, rope_axes, rope_theta)
        block = {"qk_norm": qk_norm, "attention": attention}
        self.blocks = nn.ModuleList(
            [TransformerBlock(width, heads, mlp_ratio, **block) for _ in range(depth)],
        )
        self.final_layers = nn.ModuleDict(
            {m: FinalLayer(width, c) for m, c in token_channels.items()},
        )
        text_args = (width, heads, mlp_ratio, qk_norm, text_stream_blocks)
        self.text_stream = TextStream(text_channels, *text_args) if text_channels else None
        self.size_embedder = SizeEmbedder(width) if size_conditioning else None
        self.initialize_weights()
        if compile:  # per block: one graph serves every block, and early stops need no recompile
            for block in self.blocks:
                block.compile()

    def initialize_weights(self) -> None:
        """Xavier linears, small embeddings, and adaLN-Zero: modulations and output layers start at
        zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for final in self.final_layers.values():
            for linear in (final.adaLN_modulation[-1], final.linear):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
        for extra in (self.text_stream, self.size_embedder):
            if extra is not None:
                extra.zero_init()

    @property
    def null_class(self) -> int:
        return self.y_embedder.null_class

    def label_ids(self, labels: Tensor | None, levels: Tensor) -> Tensor:
        """Labels [B] or [B, S] (one per sample; each sample's levels are consecutive in `levels`
        [B, L]) -> [B, L] embedding ids, the null class where there is no label (None, NO_LABEL, or
        an unconditional model).

        Args:
            labels: [B] or [B, S] class ids (NO_LABEL for none), or None for no labels at all.
            levels: [B, L] the distinct noise levels the ids pair with.

        Returns:
            [B, L] long label-embedding ids.
        """
        if labels is None:
            return torch.full(levels.shape, self.null_class, dtype=torch.long, device=levels.device)
        labels = labels[:, None] if labels.dim() == 1 else labels
        if labels.shape[1] not in (1, levels.shape[1]):
            labels = labels.repeat_interleave(levels.shape[1] // labels.shape[1], dim=1)
        return torch.where(labels <= NO_LABEL, self.null_class, labels)

    def conditioning(self, levels: Tensor, labels: Tensor | None) -> Tensor:
        """levels: [B, L], labels: see `label_ids` -> distinct conditioning vectors [B, L, D].

        Args:
            levels: [B, L] the distinct noise levels of each sample.
            labels: [B] or [B, S] class ids, or None (see `label_ids`).

        Returns:
            [B, L, D] the timestep embedding plus the label embedding of each distinct level.
        """
        return self.t_embedder(levels) + self.y_embedder(self.label_ids(labels, levels))

    def embed_tokens(self, tokens: Tokens | PackedTokens) -> Tensor:
        """Input projections: [B, N, C] -> [B, N, D], each token through its own modality's.

        Args:
            tokens: The batch (packed rows: each token's own channels first).

        Returns:
            [B, N, D] the embedded tokens with their modality embedding.

        Raises:
            KeyError: A modality the model has no input projection for.
        """
        h = tokens.modalities.per_token(lambda name: self._project_in(tokens.x, name))
        if self.pos_embed == "sincos":
            h = h + sincos_2d(tokens.pos, self.width).to(h.dtype)
        return h

    def _project_in(self, x: Tensor, modality: str) -> Tensor:
        if modality not in self.input_proj:
            known = list(self.input_proj)
            raise KeyError(
                f"modality {modality!r} has no input projection; this model knows {known}",
            )
        own = x[..., : self.token_channels[modality]]
        return self.input_proj[modality](own) + self.modality_embed[modality]

    def project_out(
        self,
        h: Tensor,
        cond: Tensor,
        cond_index: Tensor,
        modalities: TokenModalities,
    ) -> Tensor:
        """Output heads: [B, N, D] -> [B, N, C] (packed rows: each token's own channels first,
        zeros after).

        Args:
            h: [B, N, D] the last block's output on the data tokens.
            cond: [B, L, D] the distinct conditioning vectors.
            cond_index: [B, N] long, which of the L vectors each token uses.
            modalities: Which modality each token is (`Tokens.modalities`).

        Returns:
            [B, N, C] velocities (C_max for packed rows).
        """
        if modalities.single is not None:
            return self.final_layers[modalities.single](h, cond, cond_index)
        width = max(self.token_channels[m] for m in modalities.masks)
        out = h.new_zeros(*h.shape[:2], width)
        for m, sel in modalities.masks.items():
            head = self.final_layers[m](h, cond, cond_index)
            own = out[..., : head.shape[-1]]
            out[..., : head.shape[-1]] = torch.where(sel[..., None], head, own)
        return out

    def forward(
        self,
        tokens: Tokens | PackedTokens,
        levels: Tensor,
        level_index: Tensor | None,
        condition: Condition,
        *,
        attn_mask: GroupMask | Tensor | None = None,
        hidden_layers: tuple[int, ...] = (),
        stop_after: int | None = None,
    ) -> ModelOutput:
        """Velocity of the noised tokens at per-token levels `levels[b, level_index[b, n]]`.

        Args:
            tokens: The noised batch: x [B, N, C], pos [B, N, 4], and which modality each token is
                (one modality, or packed rows with a block-diagonal `attn_mask`).
            levels: [B, L] the distinct noise levels of each sample.
            level_index: [B, N] long, which of the L levels each token has; None when L == 1.
            condition: Labels ([B], or [B, S] per sample of a packed row), text (captions to attend
                to: never noised) and sizes ([B, 6] size and crop conditioning).
            attn_mask: The tokens' attention groups (a GroupMask, the form text needs), a [B, 1, N,
                N] bool mask, or None for full attention.
            hidden_layers: 1-based block numbers whose outputs to return.
            stop_after: Run only the first k blocks and skip the output head (the teacher's
                forward); None runs them all.

        Returns:
            The velocity [B, N, C] of the data tokens (None after `stop_after`) and the hidden
            states asked for, each [B, N, D] on the data tokens.

        Raises:
            ValueError: L > 1 without `level_index`, `stop_after` outside 0..depth, or text or sizes
                given to a model built without them.
        """
        level_index = self._checked_index(tokens, levels, level_index)
        last = self._blocks_to_run(stop_after)
        cond = self.conditioning(levels, condition.labels)  # [B, L, D]
        h = self.embed_tokens(tokens)  # [B, N, D]
        num_data, pos, text = h.shape[1], tokens.pos, condition.text
        if text is not None:  # joint attention: clean text tokens after the data tokens
            joined = self._join_text(h, pos, cond, level_index, attn_mask, condition)
            h, pos, cond, level_index, attn_mask = joined
        if condition.sizes is not None:  # onto every entry of the table, the text's too
            cond = cond + self._size_embedding(condition.sizes)
        rope = self.rope(pos) if self.rope is not None else None
        hidden: dict[int, Tensor] = {}
        for number, block in enumerate(self.blocks[:last], start=1):
            # two-stream blocks run the text tokens on the text weights
            second = None if text is None else self.text_stream.second_stream(number, num_data)
            h = self._run_block(block, h, cond, level_index, rope, attn_mask, second)
            if number in hidden_layers:
                hidden[number] = h[:, :num_data]
        if stop_after is not None:
            return ModelOutput(velocity=None, hidden=hidden)
        data_index = level_index[:, :num_data]
        velocity = self.project_out(h[:, :num_data], cond, data_index, tokens.modalities)
        return ModelOutput(velocity=velocity, hidden=hidden)

    @staticmethod
    def _checked_index(tokens: Tokens | PackedTokens, levels: Tensor, level_index: Tensor | None):
        """[B, N] long level of each token; None stands for every token at the one level."""
        if level_index is not None:
            return level_index
        if levels.shape[1] != 1:
            raise ValueError("level_index is required when a sample has more than one level")
        return torch.zeros(tokens.x.shape[:2], dtype=torch.long, device=tokens.x.device)

    def _blocks_to_run(self, stop_after: int | None) -> int:
        """How many first blocks a forward runs: all, or `stop_after`."""
        last = self.depth if stop_after is None else stop_after
        if not 0 <= last <= self.depth:
            raise ValueError(
                f"stop_after={stop_after} is outside the model's 1..{self.depth} blocks",
            )
        return last

    def _size_embedding(self, sizes: Tensor) -> Tensor:
        """[B, 6] size and crop conditioning -> [B, 1, D]."""
        if self.size_embedder is None:
            raise ValueError("sizes given to a model built without model.size_conditioning=true")
        return self.size_embedder(sizes)[:, None]

    def _join_text(
        self,
        h: Tensor,
        pos: Tensor,
        cond: Tensor,
        level_index: Tensor,
        attn_mask: GroupMask | None,
        condition: Condition,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, GroupMask | None]:
        """Append the text tokens and a clean-level entry (label and pooled text) to the table."""
        if self.text_stream is None:
            raise ValueError(
                "text given to a model built without text conditioning (no 'text' token channels)",
            )
        text_level = cond.shape[1]  # the clean text entry is appended last
        joined = self.text_stream.join(h, pos, level_index, attn_mask, condition.text, text_level)
        labels = condition.labels
        first_labels = None if labels is None else labels if labels.dim() == 1 else labels[:, 0]
        zero = torch.zeros(h.shape[0], 1, device=h.device)
        clean = self.conditioning(zero, first_labels)  # [B, 1, D] at level 0
        table = torch.cat([cond, clean], dim=1) + joined.pooled  # [B, L + 1, D]
        return joined.h, joined.pos, table, joined.cond_index, joined.mask

    def _run_block(
        self,
        block: TransformerBlock,
        h: Tensor,
        cond: Tensor,
        level_index: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        attn_mask: GroupMask | Tensor | None,
        second: SecondStream | None,
    ) -> Tensor:
        """One block, recomputed in the backward pass under activation checkpointing."""
        args = (h, cond, level_index, rope, attn_mask)
        kwargs = {} if second is None else {"second": second}
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def velocity(
        self,
        x: Tensor,
        t: Tensor,
        pos: Tensor,
        condition: Condition,
        modality: str,
    ) -> Tensor:
        """Plain flow-matching inference: one level per sample, t: [B].

        Args:
            x: [B, N, C] tokens at level t.
            t: [B] one noise level per sample.
            pos: [B, N, 4] position ids.
            condition: What the samples are generated from (labels, text, sizes).
            modality: The tokens' modality.

        Returns:
            [B, N, C] the predicted velocity x1 - x0.
        """
        return self.forward(Tokens(x, pos, modality), t[:, None], None, condition).velocity
