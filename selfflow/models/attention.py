"""Multi-head self-attention with rotary positions, optional QK-norm, and SDPA or flash-attn kernels."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from selfflow.models.embeddings import apply_rope

try:  # optional, GPU only
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = flash_attn_varlen_func = None

ATTENTION_BACKENDS = ("auto", "sdpa", "flash")


@dataclass
class GroupMask:
    """Tokens attend only within their own group: a sample of a packed row, a noise group, or padding (-1).

    `contiguous` groups (packing, trailing padding) can run on flash-attn's variable-length kernel; any grouping
    runs on SDPA as a dense boolean mask.
    """

    groups: Tensor  # [B, N] long
    contiguous: bool = False

    @cached_property
    def dense(self) -> Tensor:
        """[B, 1, N, N] bool, True where attention is allowed."""
        return (self.groups[:, :, None] == self.groups[:, None, :])[:, None]

    @cached_property
    def one_run_per_group(self) -> bool:
        """True when every group is one contiguous run in its row (what the variable-length kernel needs)."""
        changes = (self.groups[:, 1:] != self.groups[:, :-1]).sum(dim=1) + 1  # runs per row
        distinct = torch.stack([row.unique().numel() * torch.ones((), device=row.device) for row in self.groups])
        return bool((changes == distinct).all())

    @cached_property
    def varlen(self) -> tuple[Tensor, int]:
        """(cu_seqlens [S + 1] int32, max_seqlen) over the flattened rows: a sequence per contiguous group run."""
        rows, n = self.groups.shape
        flat = self.groups.flatten()
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts[::n] = True  # every row starts a new sequence
        bounds = torch.cat([starts.nonzero().flatten(), flat.new_tensor([rows * n])])
        return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


def dense_mask(mask: Tensor | GroupMask | None) -> Tensor | None:
    """The [B, 1, N, N] bool form of any attention mask (None stays None)."""
    return mask.dense if isinstance(mask, GroupMask) else mask


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

    def _use_flash(self, q: Tensor, mask: Tensor | GroupMask | None) -> bool:
        """flash-attn on a GPU when installed, in half precision (q's dtype, so autocast counts), for unmasked
        attention or packed rows (one variable-length sequence per sample instead of a dense N x N mask).

        Without flash-attn packed rows take the dense mask: SDPA on jagged nested tensors was measured 2.5-3.3x
        slower than it on an H200 (docs/performance.md)."""
        if self.backend == "sdpa" or not q.is_cuda or flash_attn_func is None:
            return False
        if mask is not None and not (isinstance(mask, GroupMask) and mask.contiguous and mask.one_run_per_group):
            return False
        return q.dtype in (torch.float16, torch.bfloat16)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                mask: Tensor | GroupMask | None = None) -> Tensor:
        """x: [B, N, D]; mask: [B, 1, N, N] bool (True = may attend), a GroupMask, or None."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self._use_flash(q, mask):
            q, k, v = (rearrange(a, "b h n d -> b n h d") for a in (q, k, v))
            if mask is None:
                out = flash_attn_func(q, k, v)
            else:  # packed rows: one variable-length sequence per sample, no compute on other samples or padding
                cu_seqlens, max_len = mask.varlen
                flat = [rearrange(a, "b n h d -> (b n) h d") for a in (q, k, v)]
                out = flash_attn_varlen_func(*flat, cu_seqlens, cu_seqlens, max_len, max_len)
                out = rearrange(out, "(b n) h d -> b n h d", b=x.shape[0])
            out = rearrange(out, "b n h d -> b n (h d)")
        else:
            out = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(mask)), "b h n d -> b n (h d)")
        return self.proj(out)
