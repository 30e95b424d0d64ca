"""Text conditioning: local frozen encoders, joint attention, caption dropout, QK-norm, timestep
shifts, refinement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfflow.flow.dual_timestep import DualTimestepScheduler
from selfflow.flow.timesteps import LogitNormal, ModeSampling, Uniform, shift_levels
from selfflow.models.layers import TransformerBlock
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.objectives.selfflow import SelfFlowObjective
from selfflow.sampling.generate import GuidedVelocity, NoiseSource, sample_tokens
from selfflow.sampling.refine import refine_tokens
from selfflow.tokenizers.image import ImagePatchTokenizer
from selfflow.tokenizers.text import FrozenTextEncoder, TextTokenizer
from selfflow.tokens import NO_LABEL, Condition, TextTokens, Tokens

WORDS = ["[PAD]", "[UNK]", "a", "handwritten", "digit", "the", "number"]
WORDS += ["seven", "four", "one", "two", "three"]


def save_tiny_encoder(folder, kind: str, width: int = 16):
    """A randomly initialised T5 encoder, CLIP text model or BERT with a word-level vocabulary,
    saved locally."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    if kind == "t5":
        model = transformers.T5EncoderModel(
            transformers.T5Config(
                vocab_size=len(WORDS),
                d_model=width,
                d_kv=8,
                d_ff=32,
                num_layers=1,
                num_heads=2,
            )
        )
    elif kind == "clip":
        model = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=len(WORDS),
                hidden_size=width,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=32,
                eos_token_id=1,
            )
        )
    else:
        model = transformers.BertModel(
            transformers.BertConfig(
                vocab_size=len(WORDS),
                hidden_size=width,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=32,
            )
        )
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {kind: save_tiny_encoder(root / kind, kind) for kind in ("t5", "clip", "bert")}


@pytest.mark.parametrize("kind", ["t5", "clip", "bert"])
def test_any_local_encoder_gives_token_features_a_mask_and_a_pooled_vector(encoders, kind):
    tokenizer = TextTokenizer(encoders[kind])
    text = tokenizer.encode(["a handwritten seven", "four"])
    assert tokenizer.token_channels == 16
    assert text.x.shape == (2, 3, 16) and text.pooled.shape == (2, 16)
    assert text.valid.tolist() == [[True, True, True], [True, False, False]]
    assert torch.count_nonzero(text.x[1, 1:]) == 0  # padding rows are zero
    assert text.pos[0, :, 3].tolist() == [0, 1, 2]  # ids (0, 0, 0, l)
    assert text.pos[..., :3].abs().sum() == 0
    # frozen, not checkpointed
    assert list(tokenizer.state_dict()) == [] and list(tokenizer.parameters()) == []
    if kind != "clip":  # sentence vector = masked mean of the token features
        torch.testing.assert_close(text.pooled[0], text.x[0].mean(0))


def test_two_encoders_are_concatenated_along_channels(encoders):
    both = TextTokenizer([encoders["t5"], encoders["clip"]])
    t5 = TextTokenizer(encoders["t5"]).encode(["the number seven"])
    joined = both.encode(["the number seven"])
    assert both.token_channels == 32 and joined.x.shape == (1, 3, 32)
    torch.testing.assert_close(joined.x[..., :16], t5.x)
    torch.testing.assert_close(joined.pooled[..., :16], t5.pooled)


def test_a_missing_encoder_folder_is_named_and_never_downloaded(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=rf"{tmp_path / 'nope'} does not exist.*tokenizer.text.path",
    ):
        TextTokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        TextTokenizer(tmp_path / "empty")


def test_caption_features_are_cached_in_memory_and_on_disk(encoders, tmp_path, monkeypatch):
    tokenizer = TextTokenizer(encoders["bert"], cache_dir=tmp_path / "cache")
    first = tokenizer.encode(["a handwritten seven", "two"])
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran although the caption was cached")

    monkeypatch.setattr(FrozenTextEncoder, "__call__", no_encoder)
    again = tokenizer.encode(["two", "a handwritten seven"])  # memory
    torch.testing.assert_close(again.x[1], first.x[0])
    fresh = TextTokenizer(encoders["bert"], cache_dir=tmp_path / "cache")  # disk
    torch.testing.assert_close(fresh.encode(["a handwritten seven", "two"]).pooled, first.pooled)


def tiny_text_model(text_channels=16, **kwargs) -> SelfFlowTransformer:
    torch.manual_seed(0)
    model = SelfFlowTransformer(
        {"image": 12, "text": text_channels}, width=32, depth=3, heads=2, num_classes=0, **kwargs
    )
    torch.manual_seed(1)
    for (
        name,
        p,
    ) in model.named_parameters():  # leave adaLN-Zero so that outputs depend on everything
        if "adaLN_modulation" in name or "final_layers" in name or "pooled_proj" in name:
            nn.init.normal_(p, std=0.2)
    return model


def image_tokens(batch=2):
    tokenizer = ImagePatchTokenizer(patch_size=2, channels=3, image_size=8)
    return tokenizer.encode(torch.rand(batch, 3, 8, 8))


def random_text(batch=2, length=5, channels=16, lengths=(3, 5)) -> TextTokens:
    torch.manual_seed(2)
    valid = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    return TextTokens(
        torch.randn(batch, length, channels) * valid[..., None],
        valid,
        torch.randn(batch, channels),
    )


def test_without_text_the_model_is_the_text_free_model_bit_for_bit():
    torch.manual_seed(0)
    plain = SelfFlowTransformer({"image": 12}, width=32, depth=3, heads=2, num_classes=10)
    torch.manual_seed(0)
    again = SelfFlowTransformer({"image": 12}, width=32, depth=3, heads=2, num_classes=10)
    assert not any("text" in k or "size" in k for k in plain.state_dict())
    for a, b in zip(plain.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with_text = SelfFlowTransformer(
        {"image": 12, "text": 16},
        width=32,
        depth=3,
        heads=2,
        num_classes=10,
    )
    with_text.load_state_dict(plain.state_dict(), strict=False)
    for p in plain.parameters():
        nn.init.normal_(p, std=0.1) if p.dim() > 1 else None
    with_text.load_state_dict(plain.state_dict(), strict=False)
    tokens = image_tokens(3)
    args = (
        tokens,
        torch.rand(3, 2),
        torch.randint(0, 2, (3, 16)),
        Condition(labels=torch.tensor([1, 5, 10])),
    )
    assert torch.equal(plain(*args).velocity, with_text(*args).velocity)


def test_text_tokens_join_attention_but_only_data_tokens_come_out():
    model = tiny_text_model(text_stream_blocks=1)
    tokens, text = image_tokens(), random_text()
    levels, index = torch.rand(2, 2), torch.randint(0, 2, (2, 16))
    labels = torch.zeros(2, dtype=torch.long)
    out = model(tokens, levels, index, Condition(labels, text), hidden_layers=(1, 2))
    assert out.velocity.shape == (2, 16, 12) and out.hidden[2].shape == (2, 16, 32)
    null = model(tokens, levels, index, Condition(labels, text.null()))
    assert not torch.allclose(
        out.velocity,
        null.velocity,
    )  # the caption changes the data tokens' output
    padded = TextTokens(text.x.clone(), text.valid, text.pooled)
    padded.x[0, 3:] = 100.0  # features behind the padding mask
    again = model(tokens, levels, index, Condition(labels, padded))
    torch.testing.assert_close(again.velocity, out.velocity)


@pytest.mark.parametrize("with_text", [True, False])
def test_padding_is_never_attended_to(with_text):
    """Padded data tokens (and padded text tokens) can hold anything: every valid output stays the
    same."""
    model = tiny_text_model(text_stream_blocks=1)
    tokens, text = image_tokens(), random_text()
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[0, 11:] = False  # sample 0 has 11 tokens, then padding
    mask = SelfFlowObjective.attention_mask(torch.where(valid, 0, -1))  # as the objective builds it
    levels, index = torch.rand(2, 2), torch.randint(0, 2, (2, 16))

    def run(x, text):
        condition = Condition(torch.zeros(2, dtype=torch.long), text if with_text else None)
        noised = Tokens(x, tokens.pos, "image")
        return model(noised, levels, index, condition, attn_mask=mask, hidden_layers=(1, 2, 3))

    base = run(tokens.x, text)
    x = tokens.x.clone()
    x[~valid] = 50.0 * torch.randn(int((~valid).sum()), 12)
    noisy_text = TextTokens(text.x.clone(), text.valid, text.pooled)
    noisy_text.x[~text.valid] = 50.0
    again = run(x, noisy_text)
    assert torch.equal(again.velocity[valid], base.velocity[valid])
    for layer in (1, 2, 3):
        assert torch.equal(again.hidden[layer][valid], base.hidden[layer][valid])


def test_attention_separation_with_text_keeps_the_two_noise_groups_apart():
    """Each noise group attends to its own view of the text, so nothing crosses between the groups
    through it: changing the masked group's tokens leaves every output of the other group as it
    was."""
    model = tiny_text_model(text_stream_blocks=1)
    objective = SelfFlowObjective(
        model,
        mask_ratio=0.5,
        gamma=0.0,
        class_dropout=0.0,
        caption_dropout=0.0,
        attention_separation=True,
    )
    velocities = []
    model.final_layers["image"].register_forward_hook(lambda m, i, o: velocities.append(o))
    tokens, text = image_tokens(), random_text()
    torch.manual_seed(5)
    masked = objective(
        tokens,
        Condition(text=text),
    ).levels.mask  # [2, 16]: the tokens at the second level
    assert masked.any() and (~masked).any()
    changed = type(tokens)(tokens.x + 3.0 * masked[..., None], tokens.pos, tokens.modality)
    torch.manual_seed(5)
    assert torch.equal(objective(changed, Condition(text=text)).levels.mask, masked)  # same draws
    before, after = velocities
    assert torch.equal(after[~masked], before[~masked])
    assert not torch.allclose(after[masked], before[masked])


def test_two_stream_blocks_keep_separate_text_weights_that_learn():
    model = tiny_text_model(text_stream_blocks=2)
    assert len(model.text_stream.text_blocks) == 2 and len(model.blocks) == 3
    tokens, text = image_tokens(), random_text()
    condition = Condition(torch.zeros(2, dtype=torch.long), text)
    out = model(tokens, torch.rand(2, 1), None, condition)
    out.velocity.square().mean().backward()
    assert model.text_stream.text_blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.text_stream.token_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="text_stream_blocks=4 must be in 0..3"):
        tiny_text_model(text_stream_blocks=4)


def test_qk_norm_makes_attention_invariant_to_the_scale_of_queries_and_keys():
    tokens, text = image_tokens(), random_text()

    def run(model):
        return model(
            tokens,
            torch.full((2, 1), 0.5),
            None,
            Condition(torch.zeros(2, dtype=torch.long), text),
        ).velocity

    for qk_norm in (True, False):
        model = tiny_text_model(qk_norm=qk_norm)
        assert isinstance(model.blocks[0].attn.q_norm, nn.RMSNorm) == qk_norm
        before = run(model)
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight[: 2 * 32] *= 8.0  # queries and keys, not values
                block.attn.qkv.bias[: 2 * 32] *= 8.0
        after = run(model)
        assert torch.allclose(before, after, atol=1e-4) == qk_norm


def spy_forwards(module: nn.Module, store: list):
    original = module.forward

    def forward(*args, **kwargs):
        store.append(args[3].text)  # the Condition
        return original(*args, **kwargs)

    module.forward = forward


def test_caption_dropout_gives_student_and_teacher_the_same_null_text_and_text_is_never_noised():
    model = tiny_text_model()
    objective = SelfFlowObjective(
        model, mask_ratio=0.25, gamma=0.8, student_layer=1, teacher_layer=2, caption_dropout=0.5
    )
    student, teacher = [], []
    spy_forwards(objective.model, student)
    spy_forwards(objective.teacher.module, teacher)
    projected = []
    model.text_stream.token_proj.register_forward_hook(lambda m, i, o: projected.append(i[0]))
    text = random_text(batch=8, lengths=(3, 5, 4, 2, 5, 1, 3, 4))
    torch.manual_seed(3)
    out = objective(image_tokens(8), Condition(text=text))
    s, t = student[0], teacher[0]
    assert torch.equal(s.valid, t.valid) and torch.equal(s.pooled, t.pooled)
    dropped = ~s.valid.any(dim=1)
    assert 0 < int(dropped.sum()) < 8  # some captions dropped, the same ones for both views
    assert torch.count_nonzero(s.pooled[dropped]) == 0
    torch.testing.assert_close(s.x[~dropped], text.x[~dropped])  # clean features, never noised
    for seen in projected:  # what the model's text projection received, in both forwards
        torch.testing.assert_close(seen, s.x)
    assert out.loss_rep is not None and torch.isfinite(out.loss)
    assert out.levels.per_token.shape == (8, 16)  # noise levels exist for the 16 data tokens only
    all_dropped = (
        SelfFlowObjective(model, caption_dropout=1.0, student_layer=1, teacher_layer=2)
        .drop_condition(Condition(text=text), (8, 1), "cpu")
        .text
    )
    assert not all_dropped.valid.any()
    kept = SelfFlowObjective(
        model,
        caption_dropout=0.0,
        student_layer=1,
        teacher_layer=2,
    ).drop_condition(Condition(text=text), (8, 1), "cpu")
    assert kept.text is text


def test_flow_loss_covers_data_tokens_only():
    model = tiny_text_model()
    objective = SelfFlowObjective(model, mask_ratio=0.0, gamma=0.0, caption_dropout=0.0)
    tokens, text = image_tokens(), random_text()
    captured = {}
    model.final_layers["image"].register_forward_hook(lambda m, i, o: captured.update(v=o))
    torch.manual_seed(4)
    out = objective(tokens, Condition(text=text))
    torch.manual_seed(4)
    objective.scheduler.for_segments(
        torch.zeros(2, 16, dtype=torch.long),
        1,
    )  # the same draws as inside
    x1 = torch.randn_like(tokens.x)
    expected = (captured["v"] - (x1 - tokens.x)).square().mean()
    torch.testing.assert_close(out.loss_flow, expected)


def test_the_shift_is_computed_per_sample_from_its_own_length():
    dist = LogitNormal(shift=1.0, shift_base_tokens=16)
    lengths = torch.tensor([16.0, 64.0, 144.0])
    shifted = dist.sample(3, torch.Generator().manual_seed(0), lengths=lengths)
    base = LogitNormal().sample(3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, shift_levels(base, torch.tensor([1.0, 2.0, 3.0])))
    with pytest.raises(ValueError, match="needs each sample's token count"):
        dist.sample(3)
    # inside the scheduler: rows of 4 and 16 valid tokens, the longer one shifted toward noise by 2
    scheduler = DualTimestepScheduler(0.25, Uniform(shift_base_tokens=4))
    valid = torch.arange(16)[None] < torch.tensor([4, 16])[:, None]
    torch.manual_seed(5)
    dual = scheduler(2, 16, valid)
    torch.manual_seed(5)
    raw = torch.rand(2), torch.rand(2)
    for column, draw in enumerate(raw):
        torch.testing.assert_close(
            dual.levels[:, column],
            shift_levels(draw, torch.tensor([1.0, 2.0])),
        )


def test_mode_sampling_is_uniform_at_scale_zero_and_favours_the_middle_above():
    u = Uniform().sample(1000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        ModeSampling(scale=0.0).sample(1000, torch.Generator().manual_seed(0)),
        1 - u,
    )
    t = ModeSampling(scale=1.29).sample(20000, torch.Generator().manual_seed(0))
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert float(((t > 0.25) & (t < 0.75)).float().mean()) > 0.6  # uniform: 0.5
    with pytest.raises(ValueError, match="scale=3"):
        ModeSampling(scale=3)


class LinearVelocity(nn.Module):
    """A stand-in model: v = x - 0.5 (a known flow), with the sampling interface."""

    num_classes, null_class = 0, 0

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def velocity(self, x, t, pos, condition, modality):
        return x - 0.5 + self.anchor


def test_refinement_at_strength_0_returns_the_input_and_at_1_ignores_it():
    tokenizer = ImagePatchTokenizer(patch_size=2, channels=1, image_size=4)
    model = LinearVelocity()
    images = torch.rand(2, 1, 4, 4)
    labels = Condition(torch.zeros(2, dtype=torch.long))
    kept = refine_tokens(model, tokenizer, images, 0.0, labels, steps=5)
    torch.testing.assert_close(tokenizer.decode(kept.tokens), images)
    assert kept.nfe == 0

    def noise():
        return NoiseSource(torch.Generator().manual_seed(7))

    a = refine_tokens(model, tokenizer, images, 1.0, labels, steps=5, noise=noise())
    b = refine_tokens(model, tokenizer, torch.rand(2, 1, 4, 4), 1.0, labels, steps=5, noise=noise())
    plain = sample_tokens(model, tokenizer, labels, steps=5, noise=noise())
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, plain.tokens) and a.nfe == 5
    partly = refine_tokens(model, tokenizer, images, 0.3, labels, steps=5, noise=noise())
    assert not torch.equal(partly.tokens, a.tokens) and not torch.equal(partly.tokens, kept.tokens)
    with pytest.raises(ValueError, match="strength=1.5 must be in"):
        refine_tokens(model, tokenizer, images, 1.5, labels)
    with pytest.raises(ValueError, match="choose euler or heun"):
        refine_tokens(model, tokenizer, images, 0.5, labels, solver="sde")


def test_guided_prompt_sampling_pairs_each_caption_with_its_null_text():
    """Guidance's doubled batch: the prompted rows, then the same rows with the null text and no
    label."""
    model = tiny_text_model()
    text = random_text()
    labels = torch.tensor([0, 0])
    guided = GuidedVelocity(
        model,
        image_tokens().pos,
        Condition(labels, text),
        "image",
        cfg_scale=2.0,
    )
    seen = []
    original = model.velocity
    model.velocity = lambda x, t, pos, condition, modality: (
        seen.append(condition) or original(x, t, pos, condition, modality)
    )
    guided(image_tokens().x, torch.full((2,), 0.5))
    (both,) = seen
    assert torch.equal(both.labels, torch.tensor([0, 0, NO_LABEL, NO_LABEL]))
    assert torch.equal(both.text.valid[:2], text.valid) and not both.text.valid[2:].any()
    torch.testing.assert_close(both.text.x[:2], text.x)
    assert torch.count_nonzero(both.text.pooled[2:]) == 0


def test_a_change_to_the_block_reaches_two_stream_text_models(monkeypatch):
    """Two-stream blocks run `TransformerBlock.forward` itself (the text block's weights given as
    its second stream): make that forward the identity and the caption tokens no longer reach the
    data tokens, in every block."""
    model = tiny_text_model(text_stream_blocks=3)  # every block two-stream
    tokens, text = image_tokens(), random_text()
    other = TextTokens(text.x + 3.0 * text.valid[..., None], text.valid, text.pooled)  # same pooled

    def run(captions):
        condition = Condition(torch.zeros(2, dtype=torch.long), captions)
        return model(tokens, torch.full((2, 1), 0.5), None, condition).velocity

    assert not torch.allclose(run(text), run(other))  # the caption tokens matter
    calls = []

    def identity(self, x, *args, **kwargs):
        calls.append(kwargs.get("second"))
        return x

    monkeypatch.setattr(TransformerBlock, "forward", identity)
    assert torch.equal(run(text), run(other))  # every block, two-stream ones too, followed
    assert len(calls) == 2 * 3 and all(second is not None for second in calls)


def test_only_empty_captions_encode_for_a_tokenizer_without_special_tokens(encoders):
    """The null text of unconditional samples is the empty caption; a word-level tokenizer gives it
    no token at all, which the encoder cannot run on."""
    text = TextTokenizer(encoders["bert"]).encode(["", ""])
    assert text.x.shape == (2, 1, 16) and not text.valid.any()
    assert torch.isfinite(text.pooled).all()
