"""Multi-head self-attention with rotary positions, optional QK-norm, and SDPA or flash-attn kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from selfflow.models.embeddings import apply_rope

try:  # optional, GPU only
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = None

ATTENTION_BACKENDS = ("auto", "sdpa", "flash")


def flash_available() -> bool:
    return flash_attn_func is not None and torch.cuda.is_available()


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool = False, backend: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"model.width={width} must be divisible by model.heads={heads}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention={backend!r} is unknown; choose one of {ATTENTION_BACKENDS}")
        if backend == "flash" and flash_attn_func is None:
            raise ValueError("model.attention=flash needs flash-attn: pip install 'selfflow[flash]' on a CUDA machine")
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        head_dim = width // heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def _use_flash(self, x: Tensor, mask: Tensor | None) -> bool:
        if self.backend == "sdpa" or mask is not None or not x.is_cuda or flash_attn_func is None:
            return False
        return x.dtype in (torch.float16, torch.bfloat16)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None) -> Tensor:
        """x: [B, N, D]; mask: [B, 1, N, N] bool (True = may attend) or None."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self._use_flash(x, mask):
            q, k, v = (rearrange(a, "b h n d -> b n h d") for a in (q, k, v))
            out = rearrange(flash_attn_func(q, k, v), "b n h d -> b n (h d)")
        else:
            out = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "b h n d -> b n (h d)")
        return self.proj(out)
