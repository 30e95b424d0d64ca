import numpy as np
import pytest
import torch

from selfflow.models.attention import flash_available
from selfflow.models.embeddings import MultiAxisRoPE, apply_rope, default_rope_axes, sincos_2d
from selfflow.models.layers import gather_tokens
from selfflow.tokenizers.image import ImagePatchTokenizer
from selfflow.tokens import Tokens
from tests.helpers.models import count_calls, inputs, randomize_zero_init, tiny_model


def test_output_is_exactly_zero_at_initialisation():
    model = tiny_model()
    tokens, labels = inputs()
    out = model(tokens, torch.rand(3, 2), torch.randint(0, 2, (3, 16)), labels)
    assert out.velocity.shape == (3, 16, 12)
    assert torch.count_nonzero(out.velocity) == 0


def test_gathered_adaln_equals_naive_per_token_adaln():
    model = tiny_model()
    randomize_zero_init(model)
    tokens, labels = inputs()
    levels = torch.rand(3, 2)
    index = torch.randint(0, 2, (3, 16))
    gathered = model(tokens, levels, index, labels).velocity
    # naive: one conditioning vector per token, the modulation MLPs run on all of them
    per_token_levels = torch.gather(levels, 1, index)  # [B, N]
    naive = model(tokens, per_token_levels, torch.arange(16).expand(3, -1), labels).velocity
    torch.testing.assert_close(gathered, naive, rtol=1e-5, atol=1e-6)
    # and at the block level, against the modulation MLP applied to every token's own vector
    block = model.blocks[0]
    cond = model.conditioning(levels, labels.labels)  # [B, 2, D]
    cond_per_token = model.conditioning(
        per_token_levels,
        labels.labels[:, None].expand(-1, 16),
    )  # [B, N, D]
    torch.testing.assert_close(
        gather_tokens(block.adaLN_modulation(cond), index),
        block.adaLN_modulation(cond_per_token),
        rtol=1e-5,
        atol=1e-6,
    )


def test_per_token_conditioning_with_equal_levels_matches_scalar_conditioning():
    model = tiny_model()
    randomize_zero_init(model)
    tokens, labels = inputs()
    t = torch.rand(3)
    scalar = model.velocity(tokens.x, t, tokens.pos, labels, "image")
    per_token = model(tokens, torch.stack([t, t], 1), torch.randint(0, 2, (3, 16)), labels)
    torch.testing.assert_close(per_token.velocity, scalar, rtol=1e-5, atol=1e-6)


def test_levels_actually_condition_the_output():
    model = tiny_model()
    randomize_zero_init(model)
    tokens, labels = inputs()
    a = model.velocity(tokens.x, torch.full((3,), 0.1), tokens.pos, labels, "image")
    b = model.velocity(tokens.x, torch.full((3,), 0.9), tokens.pos, labels, "image")
    assert (a - b).abs().max() > 1e-3


def test_stop_after_returns_the_same_hidden_state_without_the_head():
    model = tiny_model()
    randomize_zero_init(model)
    tokens, labels = inputs()
    t = torch.rand(3, 1)
    full = model(tokens, t, None, labels, hidden_layers=(2,))
    early = model(tokens, t, None, labels, hidden_layers=(2,), stop_after=2)
    assert early.velocity is None
    torch.testing.assert_close(early.hidden[2], full.hidden[2])
    with pytest.raises(ValueError, match="stop_after"):
        model(tokens, t, None, labels, stop_after=4)


def test_rope_scores_depend_only_on_position_differences():
    rope = MultiAxisRoPE(head_dim=16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    base = score([0, 1, 2, 0], [0, 3, 1, 0])
    torch.testing.assert_close(
        score([5, 4, 9, 2], [5, 6, 8, 2]),
        base,
    )  # same offsets on every axis
    assert (score([0, 1, 2, 0], [0, 4, 1, 0]) - base).abs() > 1e-4  # a different offset changes it
    assert sum(default_rope_axes(64)) == 64 and all(a % 2 == 0 for a in default_rope_axes(72))
    with pytest.raises(ValueError, match="rope_axes"):
        MultiAxisRoPE(16, [4, 4, 4, 2])


def test_sincos_matches_the_mae_grid_layout():
    width, grid = 16, 4

    def one_axis(dim, coords):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", coords.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    reference = np.concatenate([one_axis(width // 2, gw), one_axis(width // 2, gh)], axis=1)
    pos = ImagePatchTokenizer(patch_size=1, channels=1, image_size=grid).positions(1)
    torch.testing.assert_close(
        sincos_2d(pos, width)[0],
        torch.tensor(reference, dtype=torch.float32),
    )


def test_blocked_attention_keeps_groups_independent():
    model = tiny_model()
    randomize_zero_init(model)
    tokens, labels = inputs(batch=1)
    groups = torch.zeros(1, 16, dtype=torch.long)
    groups[0, 8:] = 1
    mask = (groups[:, :, None] == groups[:, None, :])[:, None]
    levels = torch.rand(1, 2)
    out_a = model(tokens, levels, groups, labels.select(slice(0, 1)), attn_mask=mask).velocity
    changed = tokens.x.clone()
    changed[0, 8:] += 1.0
    changed = Tokens(changed, tokens.pos, "image")
    out_b = model(changed, levels, groups, labels.select(slice(0, 1)), attn_mask=mask).velocity
    torch.testing.assert_close(out_a[0, :8], out_b[0, :8])
    assert (out_a[0, 8:] - out_b[0, 8:]).abs().max() > 1e-4


def test_unknown_options_are_named():
    with pytest.raises(ValueError, match="model.pos_embed"):
        tiny_model(pos_embed="learned")
    with pytest.raises(ValueError, match="model.attention"):
        tiny_model(attention="xformers")
    if not flash_available():
        with pytest.raises(ValueError, match=r"selfflow\[flash\]"):
            tiny_model(attention="flash")


@pytest.mark.parametrize(
    "channels, named",
    [
        ({"video": 12}, "video"),
        ({"audio": 8}, "audio"),
        ({"image": 12, "audio": 8}, "audio"),
        ({"image": 12, "text": 16}, "text"),
    ],
)
def test_sincos_positions_are_refused_where_they_would_drop_an_axis(channels, named):
    """The fixed sin-cos embedding encodes (h, w) only: video frames, audio time and text positions
    would be lost."""
    with pytest.raises(
        ValueError,
        match=rf"model.pos_embed=sincos encodes the \(h, w\) grid of images only.*'{named}'"
        r".*use model.pos_embed=rope",
    ):
        tiny_model(token_channels=channels, pos_embed="sincos")
    # images (the released ImageNet model) keep it
    assert tiny_model(pos_embed="sincos").pos_embed == "sincos"


def test_activation_checkpointing_recomputes_each_block_in_backward_with_the_same_gradients():
    tokens, labels = inputs()
    grads, forwards = [], []
    for ckpt in (False, True):
        model = tiny_model(activation_checkpointing=ckpt)
        randomize_zero_init(model)
        model.train()
        calls = []
        count_calls(model.blocks[0].mlp, calls)
        out = model(
            tokens,
            torch.rand(3, 2, generator=torch.Generator().manual_seed(0)),
            torch.ones(3, 16, dtype=torch.long),
            labels,
        )
        out.velocity.square().mean().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
        forwards.append(len(calls))
    torch.testing.assert_close(grads[0], grads[1])
    assert forwards == [
        1,
        2,
    ]  # checkpointed: the block's activations were dropped and recomputed in backward


@pytest.mark.gpu
@pytest.mark.skipif(not flash_available(), reason="needs CUDA and flash-attn")
def test_flash_attention_matches_sdpa_on_gpu():
    tokens, labels = inputs()
    t = torch.rand(3, device="cuda")
    outs = []
    for backend in ("sdpa", "flash"):
        model = tiny_model(attention=backend, width=128, heads=2).cuda()
        randomize_zero_init(model)
        model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs.append(
                model.velocity(
                    tokens.x.cuda(),
                    t,
                    tokens.pos.cuda(),
                    labels.to("cuda"),
                    "image",
                ).float(),
            )
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)


def test_gathered_conditioning_has_the_gradient_of_a_plain_gather():
    """gather_tokens' backward is a one-hot product (no atomic scatter-add on GPUs): same values and
    gradients."""
    from selfflow.models.layers import gather_tokens

    table = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 4, (3, 9))
    assert torch.autograd.gradcheck(lambda t: gather_tokens(t, index), (table,))
    weights = torch.randn(3, 9, 6, dtype=torch.float64)
    plain = torch.gather(table, 1, index[..., None].expand(-1, -1, 6))
    torch.testing.assert_close(gather_tokens(table, index), plain, rtol=0, atol=0)
    (ours,) = torch.autograd.grad((gather_tokens(table, index) * weights).sum(), table)
    (reference,) = torch.autograd.grad((plain * weights).sum(), table)
    torch.testing.assert_close(ours, reference)
