"""The released Self-Flow architecture re-stated from the facts of its layout (SiT-XL/2 style DiT
with per-token adaLN, learn_sigma, (p q c) output, 1 - t, negated output): random weights in its
layout and an independent forward."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WIDTH, DEPTH, HEADS, GRID, PATCH, LATENT = 32, 2, 2, 4, 2, 4


def numpy_sincos_grid(width: int, grid: int) -> np.ndarray:
    """The MAE/DiT 2D sin-cos table: first half from the column coordinate, second from the row,
    (sin, cos)."""

    def one_axis(dim, coords):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", coords.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_axis(width // 2, cols), one_axis(width // 2, rows)], axis=1)


def namespace(**children: nn.Module) -> nn.Module:
    module = nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


class ReleasedDiT(nn.Module):
    """The released SelfFlowPerTokenDiT's parameter layout (learn_sigma, sin-cos pos_embed,
    projector) re-stated, with `reference_forward` as its forward: what the released code loads
    with strict=True."""

    def __init__(
        self,
        width=WIDTH,
        depth=DEPTH,
        grid=GRID,
        patch=PATCH,
        latent=LATENT,
        classes=1000,
        heads=HEADS,
    ):
        super().__init__()
        self.heads, self.patch, self.latent = heads, patch, latent
        self.x_embedder = namespace(proj=nn.Linear(latent * patch * patch, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, width), requires_grad=False)
        self.t_embedder = namespace(
            mlp=nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        )
        self.y_embedder = namespace(embedding_table=nn.Embedding(classes + 1, width))
        self.blocks = nn.ModuleList(
            namespace(
                attn=namespace(qkv=nn.Linear(width, 3 * width), proj=nn.Linear(width, width)),
                mlp=namespace(fc1=nn.Linear(width, 4 * width), fc2=nn.Linear(4 * width, width)),
                adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width)),
            )
            for _ in range(depth)
        )
        self.final_layer = namespace(
            linear=nn.Linear(width, 2 * latent * patch * patch),
            adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width)),
        )
        self.projector = namespace(
            linear1=nn.Linear(width, 2 * width), linear2=nn.Linear(2 * width, width)
        )

    def forward(self, x, t, y):
        return reference_forward(self.state_dict(), x, t, y, self.heads, self.patch, self.latent)


def released_state_dict(
    width=WIDTH, depth=DEPTH, grid=GRID, patch=PATCH, latent=LATENT, classes=1000, seed=0
):
    """Random weights in the released layout; adaLN and final layers non-zero so every path
    is exercised."""
    g = torch.Generator().manual_seed(seed)
    layout = ReleasedDiT(width, depth, grid, patch, latent, classes).state_dict()
    state = {key: torch.randn(value.shape, generator=g) * 0.2 for key, value in layout.items()}
    state["pos_embed"] = torch.from_numpy(numpy_sincos_grid(width, grid)).float()[None]
    return state


def reference_forward(state, x, t, y, heads=HEADS, patch=PATCH, latent=LATENT):
    """The released forward, written plainly: modulation MLPs on every token, explicit
    softmax attention."""
    b, n, _ = x.shape
    width = state["x_embedder.proj.weight"].shape[0]
    levels = 1 - (t[:, None].expand(b, n) if t.dim() == 1 else t)  # the released model embeds 1 - t
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = levels[..., None] * freqs
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], -1)
    t_emb = F.linear(
        F.silu(F.linear(t_freq, state["t_embedder.mlp.0.weight"], state["t_embedder.mlp.0.bias"])),
        state["t_embedder.mlp.2.weight"],
        state["t_embedder.mlp.2.bias"],
    )
    c = t_emb + state["y_embedder.embedding_table.weight"][y][:, None, :]
    h = (
        F.linear(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"])
        + state["pos_embed"]
    )

    def norm(v):
        return F.layer_norm(v, (width,), eps=1e-6)

    for i in range(1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))):
        p = f"blocks.{i}."
        mod = F.linear(
            F.silu(c), state[p + "adaLN_modulation.1.weight"], state[p + "adaLN_modulation.1.bias"]
        )
        sa, ca, ga, sm, cm, gm = mod.chunk(6, -1)
        a = norm(h) * (1 + ca) + sa
        qkv = F.linear(a, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), -1)
        attn = (weights @ v).transpose(1, 2).reshape(b, n, width)
        h = h + ga * F.linear(attn, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        m = norm(h) * (1 + cm) + sm
        m = F.linear(
            F.gelu(
                F.linear(m, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]),
                approximate="tanh",
            ),
            state[p + "mlp.fc2.weight"],
            state[p + "mlp.fc2.bias"],
        )
        h = h + gm * m
    shift, scale = F.linear(
        F.silu(c),
        state["final_layer.adaLN_modulation.1.weight"],
        state["final_layer.adaLN_modulation.1.bias"],
    ).chunk(2, -1)
    out = F.linear(
        norm(h) * (1 + scale) + shift,
        state["final_layer.linear.weight"],
        state["final_layer.linear.bias"],
    )
    out = (
        out.reshape(b, n, patch, patch, 2 * latent).permute(0, 1, 4, 2, 3).reshape(b, n, -1)
    )  # (p q c) -> (c p q)
    return -out[
        ..., : latent * patch * patch
    ]  # learn_sigma: the first half; the released forward negates


def inputs(batch=3, seed=1):
    """Latent tokens [B, N, C], levels [B] and class labels (999: the last class, 1000: the
    null one)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, GRID * GRID, LATENT * PATCH * PATCH, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.tensor([3, 999, 1000][:batch])
    return x, t, y
