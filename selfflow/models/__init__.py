"""The backbone: per-modality input projections, transformer blocks with per-token adaLN, multi-axis
RoPE, attention (SDPA, FlexAttention, flash-attn), text conditioning, per-modality output heads.

Imports `selfflow.tokens` only.
"""
