"""Multi-head self-attention with rotary positions, optional QK-norm, and one attention kernel
chosen per call.

- flash: flash-attn (a GPU with it installed), unmasked or with contiguous groups as variable-length
  sequences;
- flex: PyTorch's FlexAttention with a block mask built from the groups, so that blocks between
  different samples and blocks of padding cost nothing (compiled once per process on CUDA; on CPU
  the unfused reference, forward only);
- sdpa: PyTorch SDPA with a dense [B, 1, N, N] mask, which does the work of the whole N x N square.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from selfflow.models.embeddings import apply_rope

try:  # optional, GPU only
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except Exception:
    flash_attn_func = flash_attn_varlen_func = None

ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "flex")


@dataclass
class GroupMask:
    """Tokens attend only within their own group: a sample of a packed row, a noise group, or
    padding (-1).

    `contiguous` groups (packing, trailing padding) can run on flash-attn's variable-length kernel;
    any grouping runs on FlexAttention as a block mask or on SDPA as a dense boolean mask. `shared`
    tokens ([B, N] bool, e.g. joined text) belong to every group of their row: they attend to and
    are attended by every non-padding token.

    Attributes:
        groups: [B, N] long group of each token; -1 on padding.
        contiguous: Whether each group is one run of consecutive tokens (packing, trailing padding).
        shared: [B, N] bool, tokens of every group of their row (joined text); None for none.
    """

    groups: Tensor  # [B, N] long
    contiguous: bool = False
    shared: Tensor | None = None  # [B, N] bool

    @cached_property
    def dense(self) -> Tensor:
        """[B, 1, N, N] bool, True where attention is allowed (padding sees padding only, so no row
        is empty)."""
        q, k = self.groups[:, :, None], self.groups[:, None, :]
        allowed = q == k
        if self.shared is not None:
            shared = self.shared & (self.groups >= 0)
            allowed = allowed | (shared[:, :, None] & (k >= 0)) | (shared[:, None, :] & (q >= 0))
        return allowed[:, None]

    @cached_property
    def block_mask(self) -> BlockMask:
        """FlexAttention's block mask, built once per mask object (a batch reuses it in every
        block). Padding is never a key; a padding query sees nothing and gets a zero output."""
        groups, shared = self.groups, self.shared

        def same_group(b, h, q, k):
            return (groups[b, q] == groups[b, k]) & (groups[b, k] >= 0)

        def same_group_or_shared(b, h, q, k):
            either_shared = shared[b, q] | shared[b, k]
            allowed = same_group(b, h, q, k) | either_shared
            return allowed & (groups[b, q] >= 0) & (groups[b, k] >= 0)

        mask_mod = same_group if shared is None else same_group_or_shared
        return block_mask_for(mask_mod, *groups.shape, groups.device)

    @cached_property
    def one_run_per_group(self) -> bool:
        """True when every group is one contiguous run in its row (what the variable-length kernel
        needs)."""
        changes = (self.groups[:, 1:] != self.groups[:, :-1]).sum(dim=1) + 1  # runs per row
        distinct = torch.stack(
            [row.unique().numel() * torch.ones((), device=row.device) for row in self.groups],
        )
        return bool((changes == distinct).all())

    @property
    def fits_varlen(self) -> bool:
        """Whether flash-attn's variable-length kernel can run this mask: one contiguous run per
        group, no shared."""
        return self.contiguous and self.shared is None and self.one_run_per_group

    @cached_property
    def varlen(self) -> tuple[Tensor, int]:
        """(cu_seqlens [S + 1] int32, max_seqlen) over the flattened rows: a sequence per contiguous
        group run."""
        rows, n = self.groups.shape
        flat = self.groups.flatten()
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts[::n] = True  # every row starts a new sequence
        bounds = torch.cat([starts.nonzero().flatten(), flat.new_tensor([rows * n])])
        return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


def block_mask_for(mask_mod, rows: int, n: int, device: torch.device) -> BlockMask:
    """A FlexAttention block mask over `rows` rows of n tokens, one for every head.

    Args:
        mask_mod (Callable): `(b, h, q, k) -> bool tensor`, True where query q may attend to key k.
        rows: B, the rows.
        n: N, the tokens per row.
        device: Where the mask is built.

    Returns:
        The block mask.
    """
    return create_block_mask(mask_mod, rows, None, n, n, device=device)


def dense_block_mask(dense: Tensor) -> BlockMask:
    """The block mask of a dense [B, 1, N, N] bool mask (masks that come without a group
    description).

    Args:
        dense: [B, 1, N, N] bool, True where attention is allowed.

    Returns:
        The same mask as FlexAttention blocks.
    """
    rows, n = dense.shape[0], dense.shape[-1]
    return block_mask_for(lambda b, h, q, k: dense[b, 0, q, k], rows, n, dense.device)


def flash_available() -> bool:
    """Whether flash-attn is installed and a CUDA device is there to run it.

    Returns:
        True when the flash kernel can run.
    """
    return flash_attn_func is not None and torch.cuda.is_available()


def choose_kernel(
    backend: str,
    device_type: str,
    dtype: torch.dtype,
    mask: Tensor | GroupMask | None,
    flash_installed: bool,
) -> str:
    """ "flash", "flex" or "sdpa" for one call.

    auto takes flash-attn where it applies (CUDA, half precision, unmasked or contiguous groups),
    else FlexAttention for masked attention on CUDA (block-sparse), else SDPA. It never picks flex
    on CPU, where FlexAttention is the unfused reference (slower than SDPA, docs/performance.md) and
    has no backward. backend=flex forces FlexAttention for every masked call; unmasked attention has
    no block to skip and stays on SDPA.

    Args:
        backend: The `model.attention` setting: `auto`, `sdpa`, `flash` or `flex`.
        device_type: `cuda`, `cpu`, ... of the call's tensors.
        dtype: The queries' dtype (autocast included).
        mask: [B, 1, N, N] bool (True = may attend), a GroupMask, or None for full attention.
        flash_installed: Whether flash-attn imports.

    Returns:
        `flash`, `flex` or `sdpa`.
    """
    on_cuda = device_type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    flash_runs = backend != "sdpa" and flash_installed and on_cuda and half
    if flash_runs and (mask is None or (isinstance(mask, GroupMask) and mask.fits_varlen)):
        return "flash"
    if mask is not None and (backend == "flex" or (backend != "sdpa" and on_cuda)):
        return "flex"
    return "sdpa"


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process: the fused kernels (eager FlexAttention is the
    unfused reference)."""
    return torch.compile(flex_attention)


def run_flex(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | GroupMask) -> Tensor:
    """q, k, v: [B, H, N, Dh] -> [B, H, N, Dh] with FlexAttention; compiled on CUDA unless already
    being compiled.

    Args:
        q: [B, H, N, Dh] queries.
        k: [B, H, N, Dh] keys.
        v: [B, H, N, Dh] values.
        mask: [B, 1, N, N] bool (True = may attend) or a GroupMask.

    Returns:
        [B, H, N, Dh] the attention output.

    Raises:
        ValueError: Training on CPU, where FlexAttention has no backward.
    """
    if not q.is_cuda and q.requires_grad:
        raise ValueError(
            "model.attention=flex cannot train on CPU (PyTorch's FlexAttention has no CPU "
            "backward); use model.attention=auto or sdpa there"
        )
    block_mask = mask.block_mask if isinstance(mask, GroupMask) else dense_block_mask(mask)
    eager = not q.is_cuda or torch.compiler.is_compiling()
    kernel = flex_attention if eager else compiled_flex_attention()
    return kernel(q, k, v, block_mask=block_mask)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | GroupMask | None = None,
    backend: str = "auto",
) -> Tensor:
    """Multi-head attention on the kernel `choose_kernel` picks for this call (q's dtype, so
    autocast counts), the one function every block type calls. q, k, v: [B, H, N, Dh] -> [B, N, H *
    Dh]; mask: [B, 1, N, N] bool (True = may attend), a GroupMask, or None.

    Args:
        q: [B, H, N, Dh] queries.
        k: [B, H, N, Dh] keys.
        v: [B, H, N, Dh] values.
        mask: [B, 1, N, N] bool (True = may attend), a GroupMask, or None for full attention.
        backend: The `model.attention` setting: `auto`, `sdpa`, `flash` or `flex`.

    Returns:
        [B, N, H * Dh] the attention output, heads concatenated.
    """
    kernel = choose_kernel(backend, q.device.type, q.dtype, mask, flash_attn_func is not None)
    if kernel == "flex":
        return rearrange(run_flex(q, k, v, mask), "b h n d -> b n (h d)")
    if kernel == "sdpa":
        dense = mask.dense if isinstance(mask, GroupMask) else mask
        return rearrange(
            F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
            "b h n d -> b n (h d)",
        )
    q, k, v = (rearrange(a, "b h n d -> b n h d") for a in (q, k, v))
    if mask is None:
        out = flash_attn_func(q, k, v)
    else:  # packed rows: one variable-length sequence per sample, none on other samples or padding
        cu_seqlens, max_len = mask.varlen
        flat = [rearrange(a, "b n h d -> (b n) h d") for a in (q, k, v)]
        out = flash_attn_varlen_func(*flat, cu_seqlens, cu_seqlens, max_len, max_len)
        out = rearrange(out, "(b n) h d -> b n h d", b=q.shape[0])
    return rearrange(out, "b n h d -> b n (h d)")


class Attention(nn.Module):
    """Self-attention weights (qkv, output projection, optional QK-norm) around the `attention`
    function.

    Args:
        width: D, the model width.
        heads: H, divides `width`.
        qk_norm: RMS-normalise queries and keys per head.
        backend: The attention kernel: `auto`, `sdpa`, `flash` or `flex`.

    Raises:
        ValueError: `width` not divisible by `heads`, an unknown backend, or `flash` without
            flash-attn.
    """

    def __init__(self, width: int, heads: int, qk_norm: bool = False, backend: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"model.width={width} must be divisible by model.heads={heads}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"model.attention={backend!r} is unknown; choose one of {ATTENTION_BACKENDS}",
            )
        if backend == "flash" and flash_attn_func is None:
            install = "pip install 'selfflow[flash]' on a CUDA machine"
            raise ValueError(f"model.attention=flash needs flash-attn: {install}")
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        head_dim = width // heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def kernel_for(self, q: Tensor, mask: Tensor | GroupMask | None) -> str:
        """The kernel this module runs q and mask on (see `choose_kernel`).

        Args:
            q: [B, H, N, Dh] queries (their device and dtype count).
            mask: [B, 1, N, N] bool (True = may attend), a GroupMask, or None for full attention.

        Returns:
            `flash`, `flex` or `sdpa`.
        """
        installed = flash_attn_func is not None
        return choose_kernel(self.backend, q.device.type, q.dtype, mask, installed)

    def heads_of(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, N, D] -> q, k, v: [B, H, N, Dh], QK-normed (before rotary positions).

        Args:
            x: [B, N, D] tokens.

        Returns:
            (q, k, v), each [B, H, N, Dh].
        """
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.q_norm(q), self.k_norm(k), v

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | GroupMask | None = None,
    ) -> Tensor:
        """x: [B, N, D]; mask: [B, 1, N, N] bool (True = may attend), a GroupMask, or None.

        Args:
            x: [B, N, D] tokens.
            rope: (cos, sin) of the rotary embedding; None for none.
            mask: [B, 1, N, N] bool (True = may attend), a GroupMask, or None for full attention.

        Returns:
            [B, N, D] the attention output after the output projection.
        """
        return self.proj(self.attend(*self.heads_of(x), rope, mask))

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | GroupMask | None = None,
    ) -> Tensor:
        """Rotary positions, then attention on this module's kernel, before the output projection.

        Args:
            q: [B, H, N, Dh] queries (of one stream, or of joined streams).
            k: [B, H, N, Dh] keys.
            v: [B, H, N, Dh] values.
            rope: (cos, sin) of the rotary embedding over the N tokens; None for none.
            mask: [B, 1, N, N] bool (True = may attend), a GroupMask, or None for full attention.

        Returns:
            [B, N, H * Dh] the attention output, heads concatenated.
        """
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return attention(q, k, v, mask, self.backend)
