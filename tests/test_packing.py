"""Sequence packing: samples of several modalities in one row behave exactly as if run alone."""

import pytest
import torch

from selfflow.data.batching.packing import pack, plan_rows, unpack
from selfflow.models.transformer import ModelOutput, SelfFlowTransformer
from selfflow.objectives.selfflow import SelfFlowObjective
from selfflow.tokens import Condition, PackedTokens, TokenModalities, Tokens
from selfflow.training.module import modality_token_counts
from tests.helpers.models import randomize_zero_init

CHANNELS = {"image": 12, "audio": 8, "video": 6}


def sample(modality: str, n: int, seed: int) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 6, (1, n, 4), generator=g)
    return Tokens(torch.randn(1, n, CHANNELS[modality], generator=g), pos, modality)


def mixed_samples():
    spec = [("image", 16), ("audio", 10), ("video", 24), ("image", 16), ("audio", 5), ("video", 7)]
    return [sample(m, n, i) for i, (m, n) in enumerate(spec)], [3, 1, 4, 1, 5, 9]


def model():
    torch.manual_seed(0)
    m = SelfFlowTransformer(CHANNELS, width=32, depth=3, heads=2, num_classes=10)
    randomize_zero_init(m)
    for p in m.modality_embed.values():
        torch.nn.init.normal_(p, std=0.5)
    return m.eval()


def test_plan_rows_fills_rows_and_rejects_samples_longer_than_a_row():
    rows = plan_rows([16, 10, 24, 16, 5, 7], row_length=32)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum([16, 10, 24, 16, 5, 7][i] for i in r) <= 32 for r in rows)
    assert len(rows) == 3  # 78 tokens in rows of 32
    with pytest.raises(
        ValueError,
        match="data.pack_length=20 is shorter than a sample of 24 tokens",
    ):
        plan_rows([16, 24], row_length=20)


def test_pack_and_unpack_round_trip():
    samples, labels = mixed_samples()
    packed = pack(samples, labels, row_length=32, null_label=10)
    assert packed.x.shape == (3, 32, 12) and packed.num_tokens == 78 and packed.batch_size == 6
    back = unpack(packed.x, packed)
    for original, restored in zip(samples, back):
        torch.testing.assert_close(restored, original.x[0])
    assert sorted(packed.segment_labels[packed.segment_labels != 10].tolist()) == sorted(labels)


def test_packed_forward_equals_each_sample_alone():
    net = model()
    samples, labels = mixed_samples()
    packed = pack(samples, labels, row_length=32, null_label=net.null_class)
    g = torch.Generator().manual_seed(1)
    rows, width = packed.segment.shape
    levels = torch.rand(rows, 2 * packed.num_segments, generator=g)  # (t, s) per sample
    masked = torch.rand(rows, width, generator=g) < 0.3
    index = 2 * packed.segment.clamp_min(0) + masked.long()
    seg = packed.segment
    attn = (seg[:, :, None] == seg[:, None, :])[:, None]
    with torch.no_grad():
        out = net(
            packed,
            levels,
            index,
            Condition(packed.segment_labels),
            attn_mask=attn,
            hidden_layers=(2,),
        )
    per_sample = unpack(out.velocity, packed)
    hidden = unpack(out.hidden[2], packed)
    for r, members in enumerate(packed.order):
        for k, i in enumerate(members):
            s = samples[i]
            tokens = packed.segment[r] == k
            own_levels = levels[r, 2 * k : 2 * k + 2][None]
            own_index = masked[r][tokens][None].long()
            with torch.no_grad():
                alone = net(
                    s,
                    own_levels,
                    own_index,
                    Condition(torch.tensor([labels[i]])),
                    hidden_layers=(2,),
                )
            torch.testing.assert_close(per_sample[i], alone.velocity[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(hidden[i], alone.hidden[2][0], rtol=1e-4, atol=1e-5)


def test_objective_on_packed_rows_keeps_every_invariant_per_sample():
    net = model().train()
    objective = SelfFlowObjective(
        net,
        mask_ratio={"image": 0.25, "video": 0.1, "audio": 0.5},
        gamma=0.8,
        ema_decay=0.9,
        loss_weights={"audio": 2.0},
    )
    samples, labels = mixed_samples()
    packed = pack(samples, labels, row_length=32, null_label=net.null_class)
    out = objective(packed)
    dual = out.levels
    for r, members in enumerate(packed.order):
        for k, i in enumerate(members):
            tokens = packed.segment[r] == k
            ratio = {"image": 0.25, "video": 0.1, "audio": 0.5}[samples[i].modality]
            assert int(dual.mask[r][tokens].sum()) == round(ratio * int(tokens.sum()))
    valid = packed.valid
    assert torch.all(dual.teacher_per_token[valid] <= dual.per_token[valid])
    assert not dual.mask[~valid].any()
    assert set(out.per_modality) == {"image", "audio", "video"}
    assert torch.isfinite(out.loss) and out.loss_rep is not None
    out.loss.backward()
    assert net.final_layers["audio"].linear.weight.grad.abs().sum() > 0


def own_channel_mask(packed) -> torch.Tensor:
    """[R, N, C_max] bool: True on each token's own channels (none on padding)."""
    width = torch.arange(packed.x.shape[-1])
    masks = packed.modality_masks.items()
    return sum((width < CHANNELS[m]) & sel[..., None] for m, sel in masks).bool()


def perfect_predictor(x0: torch.Tensor, own: torch.Tensor, error: float = 0.0):
    """A student forward that returns the exact target x1 - x0 (plus `error` on every own channel),
    with zeros on the padded channels as the real output heads give; x1 is read back from the noised
    input x_t = (1 - t) x0 + t x1."""

    def forward(noised, levels, level_index, *args, **kwargs):
        x_t = noised.x
        t = torch.gather(levels, 1, level_index)[..., None].to(
            x_t.dtype,
        )  # [R, N, 1] each token's level
        x1 = (x_t - (1 - t) * x0) / t
        return ModelOutput(velocity=torch.where(own, x1 - x0 + error, 0.0), hidden={})

    return forward


@pytest.mark.parametrize("error", [0.0, 0.5])
def test_packed_flow_loss_is_the_mean_over_each_tokens_own_channels(error):
    """Image tokens (12 channels) packed beside audio (8) and video (6): a perfect predictor's flow
    loss is 0 on every modality and noise-level bucket, and an error of e on every own channel costs
    exactly e^2 on each modality (the narrower ones too), whatever the padding to the widest
    modality holds."""
    net = model().double()
    objective = SelfFlowObjective(
        net,
        mask_ratio={"image": 0.25, "video": 0.1, "audio": 0.5},
        gamma=0.0,
    )
    samples, labels = mixed_samples()
    packed = pack(
        [Tokens(s.x.double(), s.pos, s.modality) for s in samples],
        labels,
        row_length=32,
        null_label=net.null_class,
    )
    own = own_channel_mask(packed)
    net.forward = perfect_predictor(packed.x, own, error)
    torch.manual_seed(0)
    out = objective(packed)
    expected = torch.tensor(error**2)
    torch.testing.assert_close(out.loss, expected.float(), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(out.loss_flow, expected.float(), rtol=1e-6, atol=1e-10)
    assert set(out.per_modality) == {"image", "audio", "video"}
    for modality, losses in out.per_modality.items():
        torch.testing.assert_close(
            losses["loss_flow"],
            expected.float(),
            rtol=1e-6,
            atol=1e-10,
            msg=modality,
        )
    assert out.flow_bucket_counts.sum() == packed.num_tokens
    torch.testing.assert_close(
        out.flow_bucket_sums,
        out.flow_bucket_counts * error**2,
        rtol=1e-6,
        atol=1e-8,
    )


def test_packed_noise_stays_off_the_padded_channels_for_student_and_teacher():
    net = model().train()
    objective = SelfFlowObjective(
        net,
        mask_ratio={"image": 0.25, "video": 0.1, "audio": 0.5},
        gamma=0.8,
        ema_decay=0.9,
    )
    samples, labels = mixed_samples()
    packed = pack(samples, labels, row_length=32, null_label=net.null_class)
    inputs = []
    for module in (objective.model, objective.teacher.module):
        module.register_forward_pre_hook(lambda m, args: inputs.append(args[0].x))
    objective(packed)
    own = own_channel_mask(packed)
    assert len(inputs) == 2
    for x_t in inputs:  # student, teacher: noised on every own channel, exactly zero on the padding
        assert torch.all(x_t[~own] == 0)
        assert torch.all(x_t[own] != packed.x[own])


def test_group_mask_sequences_follow_the_packing():
    from selfflow.models.attention import GroupMask

    groups = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 1, 1, 1, 1]])
    mask = GroupMask(groups, contiguous=True)
    cu, longest = mask.varlen
    assert cu.tolist() == [0, 3, 5, 6, 8, 12] and longest == 4
    assert mask.one_run_per_group
    assert not GroupMask(torch.tensor([[0, 1, 0, 1]])).one_run_per_group
    assert mask.dense[0, 0, 0].tolist() == [True, True, True, False, False, False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_attention_on_flash_varlen_matches_dense_sdpa():
    """backend=auto runs packed rows as flash-attn variable-length sequences when it is
    installed."""
    from selfflow.models.attention import Attention, GroupMask, flash_available

    if not flash_available():
        pytest.skip("flash-attn is not installed")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    groups = torch.tensor([[0] * 40 + [1] * 20 + [-1] * 4, [0] * 64], device="cuda")
    x = torch.randn(2, 64, 128, device="cuda", dtype=dtype, requires_grad=True)
    varlen = Attention(128, 2, backend="auto").cuda().to(dtype)
    sdpa = Attention(128, 2, backend="sdpa").cuda().to(dtype)
    sdpa.load_state_dict(varlen.state_dict())
    mask = GroupMask(groups, contiguous=True)
    assert varlen.kernel_for(x, mask) == "flash" and sdpa.kernel_for(x, mask) == "sdpa"
    out_varlen, out_dense = varlen(x, mask=mask), sdpa(x, mask=mask)
    torch.testing.assert_close(out_varlen.float(), out_dense.float(), rtol=2e-2, atol=2e-2)
    (grad_varlen,) = torch.autograd.grad(out_varlen.float().square().sum(), x)
    (grad_dense,) = torch.autograd.grad(out_dense.float().square().sum(), x)
    torch.testing.assert_close(grad_varlen.float(), grad_dense.float(), rtol=5e-2, atol=5e-2)


def test_the_model_the_loss_and_the_logs_share_the_batchs_modality_answer(monkeypatch):
    """The model's projections and heads, the loss weights, the per-modality logs and the token
    counts of training all ask the batch which modality each token is: a batch that answers 'image
    only' turns the other modalities' tokens off everywhere at once."""
    net = model().train()
    objective = SelfFlowObjective(net, mask_ratio={"image": 0.25, "video": 0.1, "audio": 0.5})
    samples, labels = mixed_samples()
    packed = pack(samples, labels, row_length=32, null_label=net.null_class)
    image_only = TokenModalities(single=None, masks={"image": packed.modality_masks["image"]})
    monkeypatch.setattr(PackedTokens, "modalities", property(lambda self: image_only))
    velocities = []
    net.register_forward_hook(lambda m, args, out: velocities.append(out.velocity))
    out = objective(packed)
    assert set(out.per_modality) == {"image"}
    image_tokens = int(packed.modality_masks["image"].sum())
    assert modality_token_counts(packed) == {"image": image_tokens}  # the training logs too
    others = packed.valid & ~packed.modality_masks["image"]
    assert others.any() and torch.count_nonzero(velocities[0][others]) == 0  # no head ran there
    assert torch.count_nonzero(velocities[0][packed.modality_masks["image"]]) > 0
