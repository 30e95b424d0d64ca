"""The released Self-Flow checkpoint converter against an independent reference forward written from the facts of
the released layout (SiT-XL/2 style DiT with per-token adaLN, learn_sigma, (p q c) output, 1 - t, negated output).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfflow.tokens import Condition
from selfflow.interop.official import load_official, output_rows, time_flip_matrix
from selfflow.models.embeddings import sinusoidal_embedding

WIDTH, DEPTH, HEADS, GRID, PATCH, LATENT = 32, 2, 2, 4, 2, 4


def numpy_sincos_grid(width: int, grid: int) -> np.ndarray:
    """The MAE/DiT 2D sin-cos table: first half from the column coordinate, second from the row, (sin, cos)."""

    def one_axis(dim, coords):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", coords.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_axis(width // 2, cols), one_axis(width // 2, rows)], axis=1)


def released_state_dict(width=WIDTH, depth=DEPTH, grid=GRID, patch=PATCH, latent=LATENT, classes=1000, seed=0):
    """Random weights in the released layout; adaLN and final layers non-zero so every path is exercised."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    tokens_in, out = latent * patch * patch, 2 * latent * patch * patch
    state = {
        "x_embedder.proj.weight": rand(width, tokens_in), "x_embedder.proj.bias": rand(width),
        "pos_embed": torch.from_numpy(numpy_sincos_grid(width, grid)).float()[None],
        "t_embedder.mlp.0.weight": rand(width, 256), "t_embedder.mlp.0.bias": rand(width),
        "t_embedder.mlp.2.weight": rand(width, width), "t_embedder.mlp.2.bias": rand(width),
        "y_embedder.embedding_table.weight": rand(classes + 1, width),
        "final_layer.linear.weight": rand(out, width), "final_layer.linear.bias": rand(out),
        "final_layer.adaLN_modulation.1.weight": rand(2 * width, width),
        "final_layer.adaLN_modulation.1.bias": rand(2 * width),
        "projector.linear1.weight": rand(2 * width, width), "projector.linear1.bias": rand(2 * width),
        "projector.linear2.weight": rand(width, 2 * width), "projector.linear2.bias": rand(width),
    }
    for i in range(depth):
        for name, shape in (("attn.qkv", (3 * width, width)), ("attn.proj", (width, width)),
                            ("mlp.fc1", (4 * width, width)), ("mlp.fc2", (width, 4 * width)),
                            ("adaLN_modulation.1", (6 * width, width))):
            state[f"blocks.{i}.{name}.weight"] = rand(*shape)
            state[f"blocks.{i}.{name}.bias"] = rand(shape[0])
    return state


def reference_forward(state, x, t, y, heads=HEADS, patch=PATCH, latent=LATENT):
    """The released forward, written plainly: modulation MLPs on every token, explicit softmax attention."""
    b, n, _ = x.shape
    width = state["x_embedder.proj.weight"].shape[0]
    levels = 1 - (t[:, None].expand(b, n) if t.dim() == 1 else t)  # the released model embeds 1 - t
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = levels[..., None] * freqs
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], -1)
    t_emb = F.linear(F.silu(F.linear(t_freq, state["t_embedder.mlp.0.weight"], state["t_embedder.mlp.0.bias"])),
                     state["t_embedder.mlp.2.weight"], state["t_embedder.mlp.2.bias"])
    c = t_emb + state["y_embedder.embedding_table.weight"][y][:, None, :]
    h = F.linear(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"]) + state["pos_embed"]

    def norm(v):
        return F.layer_norm(v, (width,), eps=1e-6)

    for i in range(1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))):
        p = f"blocks.{i}."
        mod = F.linear(F.silu(c), state[p + "adaLN_modulation.1.weight"], state[p + "adaLN_modulation.1.bias"])
        sa, ca, ga, sm, cm, gm = mod.chunk(6, -1)
        a = norm(h) * (1 + ca) + sa
        qkv = F.linear(a, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), -1)
        attn = (weights @ v).transpose(1, 2).reshape(b, n, width)
        h = h + ga * F.linear(attn, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        m = norm(h) * (1 + cm) + sm
        m = F.linear(F.gelu(F.linear(m, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]), approximate="tanh"),
                     state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        h = h + gm * m
    shift, scale = F.linear(F.silu(c), state["final_layer.adaLN_modulation.1.weight"],
                            state["final_layer.adaLN_modulation.1.bias"]).chunk(2, -1)
    out = F.linear(norm(h) * (1 + scale) + shift, state["final_layer.linear.weight"], state["final_layer.linear.bias"])
    out = out.reshape(b, n, patch, patch, 2 * latent).permute(0, 1, 4, 2, 3).reshape(b, n, -1)  # (p q c) -> (c p q)
    return -out[..., : latent * patch * patch]  # learn_sigma: the first half; the released forward negates


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, GRID * GRID, LATENT * PATCH * PATCH, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.tensor([3, 999, 1000][:batch])
    return x, t, y


def test_converted_model_matches_the_reference_forward_per_sample_levels():
    state = released_state_dict()
    model = load_official(state, heads=HEADS)
    x, t, y = inputs()
    with torch.no_grad():
        ours, reference = model(x, t, y), reference_forward(state, x, t, y)
    assert reference.abs().mean() > 0.1  # a non-trivial output, so the comparison means something
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)


def test_converted_model_matches_the_reference_forward_per_token_levels():
    state = released_state_dict(seed=2)
    model = load_official(state, heads=HEADS)
    x, _, y = inputs()
    t = torch.rand(3, GRID * GRID, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_forward(state, x, t, y), atol=2e-5, rtol=1e-5)


def test_time_flip_matrix_maps_features_of_t_to_features_of_one_minus_t():
    t = torch.rand(50, dtype=torch.float64)
    flip = time_flip_matrix(256)
    torch.testing.assert_close(sinusoidal_embedding(t, 256).double() @ flip.T,
                               sinusoidal_embedding(1 - t, 256).double(), atol=1e-6, rtol=0)


def test_output_rows_keep_the_first_channels_in_c_p_q_order():
    rows = output_rows(patch_size=2, out_channels=8, keep_channels=4)
    # (p q c) index of (c, p, q) is (p * 2 + q) * 8 + c
    expected = [(p * 2 + q) * 8 + c for c in range(4) for p in range(2) for q in range(2)]
    assert rows.tolist() == expected


def test_loads_from_a_file_with_wrappers_and_module_prefixes_and_keeps_the_projector(tmp_path):
    state = released_state_dict(seed=3)
    path = tmp_path / "selfflow_imagenet256.pt"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    model = load_official(path, heads=HEADS)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_forward(state, x, t, y), atol=2e-5, rtol=1e-5)
    assert model.num_classes == 1000 and model.null_class == 1000
    torch.testing.assert_close(model.projector.linear1.weight, state["projector.linear1.weight"])


def test_converted_weights_are_a_plain_selfflow_model_in_our_convention():
    """The inner SelfFlowTransformer needs no wrapper: its velocity is the released model's at the same t."""
    state = released_state_dict(seed=4)
    official = load_official(state, heads=HEADS)
    x, t, y = inputs()
    pos = official.patches.positions(3)
    with torch.no_grad():
        torch.testing.assert_close(official.model.velocity(x, t, pos, Condition(y), "image"), reference_forward(state, x, t, y),
                                   atol=2e-5, rtol=1e-5)
    assert official.model.pos_embed == "sincos" and official.model.t_embedder.scale == 1.0


def test_bad_files_and_layouts_fail_with_clear_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not in the released Self-Flow layout"):
        load_official({"weight": torch.zeros(2)})
    state = released_state_dict()
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    with pytest.raises(ValueError, match="pos_embed"):
        load_official(state, heads=HEADS)
    with pytest.raises(ValueError, match="patch_size"):
        load_official(released_state_dict(), heads=HEADS, patch_size=4)
