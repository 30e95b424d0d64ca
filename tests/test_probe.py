"""Linear probes: the head grid on features with known structure, agreement with
scikit-learn, seeded extraction, padding-aware pooling, the feature cache, clear errors, and
the training callback."""

import copy
import csv

import pytest
import torch

from selfflow.data.builtin.digits import DigitImages
from selfflow.evaluation.features import (
    INPUT_LAYER,
    FeatureCache,
    Features,
    cached_features,
    check_layers,
    default_probe_layers,
    extract_features,
    mean_pool,
    probe_loader,
)
from selfflow.evaluation.linear_probe import check_labels, fit_linear_probe
from selfflow.evaluation.probe import ProbeRow, best_row, random_init_like, report
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokenizers.image import ImagePatchTokenizer
from selfflow.tokens import Tokens

FAST = {"epochs": 30, "learning_rates": (0.03, 0.3), "weight_decays": (0.0, 1e-3)}


def linear_classes(num: int, dim: int = 16, classes: int = 4, seed: int = 0) -> Features:
    """Gaussian features labelled by the argmax of a fixed linear map: linearly separable
    by construction."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(dim, classes, generator=torch.Generator().manual_seed(123))
    x = (
        torch.randn(num, dim, generator=g) * 3 + 5
    )  # off-centre and scaled: the probe must standardise
    return Features(x, (x @ weights - 5 * weights.sum(0)).argmax(-1))


def test_known_linear_structure_is_found_almost_perfectly():
    fit = fit_linear_probe(linear_classes(800), linear_classes(400, seed=1), 4, **FAST)
    assert fit.top1 >= 0.93
    assert 0 <= fit.val_top1 <= 1 and len(fit.head_val_top1) == 4
    assert (fit.learning_rate, fit.weight_decay) in [
        (lr, wd) for lr in (0.03, 0.3) for wd in (0.0, 1e-3)
    ]


def test_shuffled_labels_stay_at_chance():
    train, test = linear_classes(800), linear_classes(1000, seed=1)
    shuffled = Features(
        train.x, train.labels[torch.randperm(800, generator=torch.Generator().manual_seed(0))]
    )
    fit = fit_linear_probe(shuffled, test, 4, **FAST)
    chance = torch.bincount(test.labels).max().item() / len(test.labels)  # the majority class
    assert fit.top1 <= chance + 0.06


def test_probe_is_deterministic_under_its_seed():
    train, test = linear_classes(300), linear_classes(200, seed=1)
    a = fit_linear_probe(train, test, 4, seed=3, **FAST)
    b = fit_linear_probe(train, test, 4, seed=3, **FAST)
    assert a == b


def test_attentive_pooling_finds_the_one_informative_token():
    """Class signal in one token at a random position among noise tokens: a learned query attends
    to it."""

    def tokens(num, seed):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 3, (num,), generator=g)
        x = torch.randn(num, 6, 8, generator=g)
        x[..., 0] = 0.0  # channel 0 marks the informative token
        where = torch.randint(0, 6, (num,), generator=g)
        x[torch.arange(num), where] = torch.nn.functional.one_hot(labels, 8).float() * 4
        x[torch.arange(num), where, 0] = 5.0
        return Features(x, labels, torch.ones(num, 6, dtype=torch.bool))

    fit = fit_linear_probe(tokens(600, 0), tokens(300, 1), 3, **FAST)
    assert fit.top1 >= 0.9


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(h, torch.tensor([[True, True, False]])).item() == 2.0
    assert mean_pool(h, None).item() == pytest.approx(104 / 3)


def test_default_layers_and_layer_errors():
    assert default_probe_layers(4, 1) == [1, 2, 3, 4]
    assert default_probe_layers(12) == [
        3,
        4,
        6,
        9,
        12,
    ]  # quarters plus the method's student layer round(0.3 * 12)
    assert default_probe_layers(28, 8) == [7, 8, 14, 21, 28]
    with pytest.raises(ValueError, match=r"layers=\[9\] out of range: this model has blocks 1..4"):
        check_layers([1, 9], 4)


def test_unlabelled_data_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="needs labelled data"):
        check_labels(torch.zeros(5, dtype=torch.long), 0, "the dataset")
    with pytest.raises(ValueError, match="2 of 4 samples without a label"):
        check_labels(torch.tensor([0, -1, 1, -1]), 2, "the training split")


def tiny_model(
    depth: int = 2, width: int = 32, channels: int = 16, seed: int = 0
) -> SelfFlowTransformer:
    """A tiny backbone whose blocks compute something (adaLN-Zero would leave them identities)."""
    torch.manual_seed(seed)
    model = SelfFlowTransformer(
        {"image": channels}, width=width, depth=depth, heads=2, num_classes=10
    )
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.3)
        torch.nn.init.normal_(block.adaLN_modulation[-1].bias, std=0.3)
    return model.eval()


class CountingForwards:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1


def digits(split: str, size: int | None = None):
    data = DigitImages(split, image_size=16)
    return torch.utils.data.Subset(data, range(size)) if size else data


def test_extraction_is_seeded_and_one_forward_per_batch_and_level_covers_all_layers():
    model, tokenizer = tiny_model(), ImagePatchTokenizer(4, 1, 16)
    counter = CountingForwards(model)
    loader = probe_loader(digits("train", 40), "image", batch_size=16)
    a = extract_features(model, tokenizer, loader, [0, 1, 2], [0.0, 0.5], seed=0)
    assert counter.calls == 3 * 2  # 3 batches x 2 levels, layers 1 and 2 from the same forward
    b = extract_features(model, tokenizer, loader, [2], [0.5], seed=0)
    c = extract_features(model, tokenizer, loader, [2], [0.5], seed=1)
    assert a[(1, 0.0)].x.shape == (40, 32) and a[(0, 0.0)].x.shape == (40, 16)
    assert torch.equal(a[(2, 0.5)].x, b[(2, 0.5)].x)
    assert not torch.allclose(b[(2, 0.5)].x, c[(2, 0.5)].x)
    assert not torch.allclose(a[(2, 0.0)].x, a[(2, 0.5)].x)
    assert torch.equal(
        a[(2, 0.0)].labels, torch.tensor([int(digits("train", 40)[i][1]) for i in range(40)])
    )


class PaddedTokenizer(Tokenizer):
    """Wraps a tokenizer and appends garbage tokens marked invalid, like a variable-length
    modality's padding."""

    def __init__(self, inner: Tokenizer, extra: int):
        super().__init__()
        self.inner, self.extra = inner, extra
        self.modality, self.token_channels = inner.modality, inner.token_channels

    def encode(self, data):
        tokens = self.inner.encode(data)
        b, n, c = tokens.x.shape
        x = torch.cat([tokens.x, torch.full((b, self.extra, c), 50.0)], dim=1)
        pos = torch.cat([tokens.pos, tokens.pos[:, : self.extra] + 7], dim=1)
        valid = torch.cat(
            [torch.ones(b, n, dtype=torch.bool), torch.zeros(b, self.extra, dtype=torch.bool)], 1
        )
        return Tokens(x, pos, tokens.modality, valid)


@pytest.mark.parametrize("pool", ["mean", "attentive"])
def test_padding_tokens_change_no_feature(pool):
    model, tokenizer = tiny_model(), ImagePatchTokenizer(4, 1, 16)
    loader = probe_loader(digits("test", 12), "image", batch_size=6)
    plain = extract_features(model, tokenizer, loader, [2], [0.0], pool=pool)[(2, 0.0)]
    padded = extract_features(model, PaddedTokenizer(tokenizer, 5), loader, [2], [0.0], pool=pool)[
        (2, 0.0)
    ]
    if pool == "mean":
        torch.testing.assert_close(plain.x, padded.x, atol=1e-5, rtol=1e-5)
    else:
        assert padded.x.shape == (12, 21, 32) and padded.valid[:, 16:].sum() == 0
        torch.testing.assert_close(plain.x, padded.x[:, :16], atol=1e-5, rtol=1e-5)


def test_feature_cache_is_hit_on_the_second_run_and_keyed_by_what_changes_features(tmp_path):
    model, tokenizer = tiny_model(), ImagePatchTokenizer(4, 1, 16)
    counter = CountingForwards(model)
    loader = probe_loader(digits("train", 32), "image", batch_size=32)
    cache = FeatureCache(tmp_path / "cache")
    source = {"checkpoint_sha256": "abc", "weights": "ema", "split": "train"}
    first = cached_features(cache, source, model, tokenizer, loader, [1, 2], [0.0, 0.25])
    assert (
        counter.calls == 2
        and cache.misses == 4
        and len(list((tmp_path / "cache").glob("*.pt"))) == 4
    )
    second = cached_features(cache, source, model, tokenizer, loader, [1, 2], [0.0, 0.25])
    assert counter.calls == 2 and cache.hits == 4  # no forward at all
    for key in first:
        assert torch.equal(first[key].x, second[key].x) and torch.equal(
            first[key].labels, second[key].labels
        )
    cached_features(cache, source, model, tokenizer, loader, [2], [0.5])  # a new level: one forward
    assert counter.calls == 3
    cached_features(cache, {**source, "weights": "online"}, model, tokenizer, loader, [2], [0.0])
    assert counter.calls == 4
    cached_features(cache, source, model, tokenizer, loader, [2], [0.0], pool="attentive")
    assert counter.calls == 5


def test_probe_agrees_with_scikit_learn_on_the_same_cached_features(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    model, tokenizer = tiny_model(width=64, depth=2), ImagePatchTokenizer(4, 1, 16)
    cache = FeatureCache(tmp_path / "cache")
    features = {}
    for split in ("train", "test"):
        loader = probe_loader(digits(split), "image")
        cached_features(cache, {"split": split}, model, tokenizer, loader, [2], [0.0])
        features[split] = cache.load(
            {"split": split, "layer": 2, "level": 0.0, "pool": "mean", "seed": 0}
        )
    ours = fit_linear_probe(features["train"], features["test"], 10, epochs=40)
    scaler = StandardScaler().fit(features["train"].x.numpy())
    sklearn = LogisticRegression(max_iter=3000).fit(
        scaler.transform(features["train"].x.numpy()), features["train"].labels.numpy()
    )
    theirs = sklearn.score(
        scaler.transform(features["test"].x.numpy()), features["test"].labels.numpy()
    )
    assert theirs > 0.5  # the features carry real signal, so agreement means something
    assert abs(ours.top1 - theirs) <= 0.03, (ours.top1, theirs)


def affine_residual(inputs: torch.Tensor, outputs: torch.Tensor) -> float:
    """Share of `outputs`' variance that no affine map of `inputs` explains (0: outputs are affine
    in inputs)."""
    design = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1).double()
    target = outputs.double() - outputs.double().mean(0)
    fit = design @ (torch.linalg.pinv(design) @ target)
    return float((target - fit).square().sum() / target.square().sum())


def test_random_init_baseline_is_a_random_network_whose_blocks_are_not_the_identity():
    """With adaLN-Zero, random blocks are identities and the features an affine map of the pooled
    input (the input baseline again); the baseline's blocks must compute something of their own."""
    model = tiny_model()
    fresh = random_init_like(model, seed=0)
    assert fresh is not model and fresh.depth == model.depth
    assert all(torch.count_nonzero(b.adaLN_modulation[-1].weight) > 0 for b in fresh.blocks)
    again = random_init_like(model, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), again.parameters()))  # seeded
    assert not torch.equal(
        fresh.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight
    )  # the original untouched
    tokenizer = ImagePatchTokenizer(4, 1, 16)
    loader = probe_loader(digits("train", 200), "image", batch_size=100)
    features = extract_features(fresh, tokenizer, loader, [INPUT_LAYER, 2], [0.0])
    assert affine_residual(features[(INPUT_LAYER, 0.0)].x, features[(2, 0.0)].x) > 0.05
    identity_blocks = copy.deepcopy(fresh)
    identity_blocks.initialize_weights()
    features = extract_features(identity_blocks, tokenizer, loader, [INPUT_LAYER, 2], [0.0])
    assert (
        affine_residual(features[(INPUT_LAYER, 0.0)].x, features[(2, 0.0)].x) < 1e-6
    )  # what the test rules out


def test_report_has_the_issue_keys_and_picks_the_best_row():
    baselines = {"baseline_random_init_top1": 0.2, "baseline_input_top1": 0.3}
    rows = [
        ProbeRow(layer=layer, noise_level=0.0, pool="mean", top1=top1, **baselines)
        for layer, top1 in ((1, 0.5), (2, 0.7), (3, 0.7))
    ]
    document = report("a.ckpt", "DigitImages", rows)
    assert set(document) == {"checkpoint", "dataset", "results", "best"}
    assert (
        document["best"]
        == document["results"][1]
        == {
            "layer": 2,
            "noise_level": 0.0,
            "pool": "mean",
            "top1": 0.7,
            "baseline_random_init_top1": 0.2,
            "baseline_input_top1": 0.3,
        }
    )
    assert best_row(rows) is rows[1]


def test_training_callback_logs_probe_top1_without_changing_training(tiny_train_cfg, tmp_path):
    import lightning as L

    from selfflow.training.build import build_run
    from selfflow.training.probe_callback import LinearProbe

    def train(run_dir, with_probe):
        L.seed_everything(0)
        run = build_run(
            tiny_train_cfg("trainer.max_steps=4", "~callbacks.samples", run_dir=run_dir)
        )
        probe = LinearProbe(every_n_steps=2, train_samples=64, test_samples=32, epochs=5)
        if with_probe:
            run.trainer.callbacks.append(probe)
        run.trainer.fit(run.module, datamodule=run.datamodule)
        return run, probe

    run, probe = train(tmp_path / "a", True)
    plain, _ = train(tmp_path / "b", False)
    assert [step for step, _ in probe.history] == [2, 4]
    assert all(0.0 <= top1 <= 1.0 for _, top1 in probe.history)
    with open(tmp_path / "a" / "metrics.csv") as f:
        logged = {
            int(r["step"]): float(r["probe/top1"]) for r in csv.DictReader(f) if r.get("probe/top1")
        }
    assert sorted(logged) == [2, 4] and logged[4] == pytest.approx(probe.history[-1][1])
    for a, b in zip(run.module.objective.parameters(), plain.module.objective.parameters()):
        assert torch.equal(a, b)  # the probe draws from its own RNG scope


@pytest.mark.parametrize("modality", ["video", "audio"])
def test_extraction_works_for_every_modality_its_tokenizer_gives(modality):
    """Nothing image-specific: video tubelets (pooled over time and space) and mel patches go the
    same way."""
    if modality == "video":
        from selfflow.tokenizers.video import VideoTubeletTokenizer

        tokenizer, samples = VideoTubeletTokenizer(2, 4, 1, 4, 8), torch.rand(6, 4, 1, 8, 8)
    else:
        from selfflow.tokenizers.audio import AudioMelTokenizer

        tokenizer = AudioMelTokenizer(
            sample_rate=4000, duration=0.5, hop_length=125, n_mels=16, patch_frames=4
        )
        samples = torch.randn(6, 1, 2000) * 0.1
    model = SelfFlowTransformer(
        {modality: tokenizer.token_channels}, width=32, depth=2, heads=2, num_classes=3
    )
    dataset = [(sample, i % 3) for i, sample in enumerate(samples)]
    features = extract_features(
        model.eval(), tokenizer, probe_loader(dataset, modality, batch_size=4), [0, 2], [0.1]
    )
    assert features[(2, 0.1)].x.shape == (6, 32) and features[(0, 0.1)].x.shape == (
        6,
        tokenizer.token_channels,
    )
    assert features[(2, 0.1)].labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.isfinite(features[(2, 0.1)].x).all()


def test_multimodal_data_is_probed_per_modality_source():
    from types import SimpleNamespace

    from selfflow.evaluation.probe import modality_sources

    image, audio = SimpleNamespace(modality="image"), SimpleNamespace(modality="audio")
    assert modality_sources(image) == {"image": image}
    mixture = SimpleNamespace(modality="mixed", sources={"image": image, "audio": audio})
    assert modality_sources(mixture) == {"image": image, "audio": audio}
