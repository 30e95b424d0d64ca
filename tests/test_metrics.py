"""Frechet distance against closed forms; the reference classifier tells real digits from
noise; metrics.json."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils.data import TensorDataset

from selfflow.data.builtin.digits import DigitImages
from selfflow.evaluation.frechet import FeatureStats, frechet_distance, frechet_distance_of
from selfflow.evaluation.reference_classifier import (
    ReferenceCNN,
    load_reference_classifier,
    train_reference_classifier,
)
from selfflow.evaluation.sample_metrics import FeatureAccumulator, dataset_features, sample_metrics


def random_cov(dim, seed):
    a = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_frechet_distance_of_two_diagonal_gaussians_is_the_closed_form():
    m1, m2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, -1.0])
    v1, v2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = (m1 - m2).square().sum() + (
        v1.sqrt() - v2.sqrt()
    ).square().sum()  # 1 + 9 + 4 + 1 + 0
    assert frechet_distance(m1, torch.diag(v1), m2, torch.diag(v2)) == pytest.approx(
        float(expected), rel=1e-10
    )
    assert frechet_distance(m1, torch.diag(v1), m1, torch.diag(v1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_non_commuting_covariances_matches_the_matrix_square_root_formula():
    s1, s2 = random_cov(6, 0), random_cov(6, 1)
    m1, m2 = torch.zeros(6, dtype=torch.float64), torch.full((6,), 0.5, dtype=torch.float64)
    root = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float((m1 - m2).square().sum() + s1.trace() + s2.trace() - 2 * np.trace(root))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_from_samples_approaches_the_gaussian_value():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    b = 2 * torch.randn(20000, 4, generator=g, dtype=torch.float64) + 1
    # N(0, I) vs N(1, 4I) in 4 dims: 4 * 1 + 4 * (1 - 2)^2 = 8
    assert frechet_distance_of(FeatureStats.of(a), FeatureStats.of(b)) == pytest.approx(
        8.0, rel=0.03
    )
    with pytest.raises(ValueError, match="N >= 2"):
        FeatureStats.of(a[:1])


@pytest.fixture(scope="module")
def digits_classifier():
    train, test = DigitImages("train", image_size=16), DigitImages("test", image_size=16)
    model, accuracy = train_reference_classifier(
        train,
        test,
        10,
        channels=1,
        image_size=16,
        width=8,
        epochs=3,
        batch_size=32,
        lr=5e-3,
        log=lambda line: None,
    )
    return model, accuracy, train, test


def test_reference_classifier_scores_real_digits_far_better_than_noise(digits_classifier):
    model, accuracy, train, test = digits_classifier
    assert accuracy > 0.7
    real_train = dataset_features(model, train)
    real_test = dataset_features(model, test)
    g = torch.Generator().manual_seed(0)
    noise = TensorDataset(
        torch.rand(len(test), 1, 16, 16, generator=g), torch.arange(len(test)) % 10
    )
    fake = dataset_features(model, noise)
    good = sample_metrics(real_test, real_train)
    bad = sample_metrics(fake, real_train)
    assert good["classifier_accuracy"] == pytest.approx(accuracy)
    assert bad["classifier_accuracy"] < 0.3
    assert good["frechet_distance"] * 5 < bad["frechet_distance"]


def test_reference_classifier_saves_and_loads_back_with_the_same_features(
    digits_classifier, tmp_path
):
    model = digits_classifier[0]
    model.save(tmp_path / "ref", test_accuracy=0.9)
    loaded = load_reference_classifier(tmp_path / "ref")
    images = torch.rand(4, 3, 32, 32)  # other sizes and RGB are adapted on the way in
    torch.testing.assert_close(loaded.features(images), model.features(images))
    assert json.loads((tmp_path / "ref" / "config.json").read_text())["test_accuracy"] == 0.9
    with pytest.raises(FileNotFoundError, match="selfflow-reference"):
        load_reference_classifier(tmp_path / "missing")


class MeanPixels:
    """A stand-in local feature extractor for the `feature_extractor._target_` path (no logits:
    no accuracy)."""

    def features(self, images):
        return torch.stack(
            [images.mean((1, 2, 3)), images.std((1, 2, 3)), images[:, :, :8].mean((1, 2, 3))], -1
        )


def test_sample_cli_writes_metrics_json_with_both_numbers(
    digits_classifier, tiny_checkpoint, tmp_path
):
    from tests.helpers.runs import run_sample

    digits_classifier[0].save(tmp_path / "ref")
    summary = run_sample(
        tiny_checkpoint,
        tmp_path / "out",
        "num_samples=12",
        "steps=3",
        "metrics=true",
        f"reference={tmp_path / 'ref'}",
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics == summary["metrics"]
    assert metrics["frechet_distance"] > 0 and 0 <= metrics["classifier_accuracy"] <= 1
    assert metrics["num_samples"] == 12 and metrics["num_labelled_samples"] == 12
    assert (
        metrics["num_real"] == len(DigitImages("test"))
        and metrics["real_classifier_accuracy"] > 0.7
    )
    run_sample(
        tiny_checkpoint,
        tmp_path / "plug",
        "num_samples=4",
        "steps=2",
        "metrics=true",
        "+feature_extractor._target_=tests.test_metrics.MeanPixels",
    )
    plugged = json.loads((tmp_path / "plug" / "metrics.json").read_text())
    assert plugged["classifier_accuracy"] is None and plugged["frechet_distance"] > 0


def test_feature_accumulator_ignores_labels_outside_the_classifier(digits_classifier):
    accumulator = FeatureAccumulator(digits_classifier[0])
    accumulator.add(torch.rand(3, 1, 16, 16), torch.tensor([1, 10, 10]))  # 10 = the null label
    assert accumulator.labelled == 1 and accumulator.stats().mean.shape == (32,)


def reference_config(*overrides: str):
    """conf/reference.yaml composed with `overrides`, as selfflow-reference composes it."""
    from tests.helpers.configs import compose

    return compose("reference", list(overrides))


def test_the_reference_config_builds_on_the_training_data_and_keeps_its_own_keys_apart():
    from selfflow.cli.reference import single_modality_data, training_overrides

    default = reference_config("out=ref")
    digits = "selfflow.data.builtin.digits.DigitImages"
    assert single_modality_data(default).dataset._target_ == digits  # experiment=digits
    assert (default.epochs, default.width, default.batch_size, default.lr) == (15, 16, 32, 2e-3)
    assert default.seed == 0
    assert (default.video_frames, default.device) == ("stacked", "auto")
    audio = reference_config("out=ref", "experiment=audio_digits", "data.dataset.takes=3")
    assert audio.data.modality == "audio" and audio.data.dataset.takes == 3
    folder = reference_config("out=ref", "data=image_folder", "data.root=DIR", "data.batch_size=9")
    assert folder.data.root == "DIR" and folder.data.batch_size == 9
    assert folder.data.modality == "image"
    line = ["out=ref", "epochs=2", "experiment=video_digits", "video_frames=each", "data.seed=1"]
    assert training_overrides(line) == ["experiment=video_digits", "data.seed=1"]
    with pytest.raises(ValueError, match="one modality"):
        single_modality_data(reference_config("out=ref", "experiment=multimodal_digits"))


def test_selfflow_reference_needs_out_before_it_reads_any_data():
    from selfflow.cli.reference import train_reference

    with pytest.raises(ValueError, match=r"out=\.\.\. is required"):
        train_reference(reference_config("data=image_folder", "data.root=/nonexistent"), [])


@pytest.mark.slow
def test_selfflow_reference_writes_a_loadable_classifier(tmp_path):
    from selfflow.cli.reference import train_reference

    keys = [f"out={tmp_path / 'ref'}", "epochs=1", "width=4"]
    record = train_reference(reference_config(*keys, "data.dataset.image_size=8"), [])
    assert 0 <= record["test_accuracy"] <= 1 and record["num_test"] == 270
    model = load_reference_classifier(tmp_path / "ref")
    assert isinstance(model, ReferenceCNN) and model.image_size == 8 and model.feature_dim == 16


@pytest.mark.slow
def test_selfflow_reference_reads_each_frame_of_a_clip_when_asked(tmp_path):
    from selfflow.cli.reference import train_reference
    from selfflow.evaluation.reference_classifier import EachFrame

    sizes = [
        "data.dataset.clips_train=16",
        "data.dataset.clips_test=8",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    keys = [f"out={tmp_path / 'ref'}", "epochs=1", "width=4", "video_frames=each"]
    train_reference(reference_config(*keys, "experiment=video_digits", *sizes), [])
    model = load_reference_classifier(tmp_path / "ref")
    assert isinstance(model.front, EachFrame) and model.channels == 1 and model.modality == "video"
    assert model.logits(torch.rand(2, 8, 1, 16, 16)).shape == (2, model.num_classes)


@pytest.mark.slow
def test_the_selfflow_reference_command_takes_key_value_overrides_and_writes_only_out(tmp_path):
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "selfflow-reference")
    line = ["out=ref", "epochs=1", "width=4", "data.dataset.image_size=8"]

    def run(*args: str):
        return subprocess.run([script, *args], cwd=tmp_path, capture_output=True, text=True)

    result = run(*line)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.splitlines()[-1])
    assert record["out"] == str((tmp_path / "ref").resolve())
    assert record["data"] == "data.dataset.image_size=8"  # the training overrides, not the keys
    assert json.loads((tmp_path / "ref" / "config.json").read_text())["data"] == record["data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref"]  # no .hydra/, no log file
    bad = run("out=ref", "epoch=1")
    assert bad.returncode == 2
    assert "epoch is not a config key (typo?); did you mean epochs?" in bad.stderr


class Tones(torch.utils.data.Dataset):
    """Two classes of 0.25 s recordings at 8 kHz: a low or a high tone, random phase
    and loudness."""

    def __init__(self, count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (count,), generator=generator)
        t = torch.arange(2000) / 8000
        phase = torch.rand(count, 1, generator=generator) * 6.28
        loudness = 0.2 + 0.6 * torch.rand(count, 1, generator=generator)
        frequency = torch.where(self.labels[:, None] == 0, 300.0, 2000.0)
        self.waves = loudness * torch.sin(6.283 * frequency * t + phase)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.waves[i][None], int(self.labels[i])  # ([1, S], label), like the audio datasets


def test_audio_reference_classifier_reads_log_mel_images_and_tells_tones_apart(tmp_path):
    from selfflow.evaluation.reference_classifier import MelImage

    mel = MelImage(8000, 2000, n_mels=16, frames=32)
    image = mel(Tones(2, 0).waves)
    assert image.shape == (2, 1, 16, 32) and image.min() >= 0 and image.max() <= 1
    with pytest.raises(ValueError, match=r"waves \[B, 2000\]"):
        mel(torch.zeros(2, 1999))
    audio = {"sample_rate": 8000, "num_samples": 2000, "n_mels": 16, "frames": 32}
    model, test_accuracy = train_reference_classifier(
        Tones(128, 0),
        Tones(32, 1),
        2,
        channels=1,
        image_size=16,
        width=4,
        epochs=8,
        batch_size=16,
        log=lambda _: None,
        audio=audio,
    )
    assert model.modality == "audio" and test_accuracy > 0.9
    model.save(tmp_path / "ref")
    loaded = load_reference_classifier(tmp_path / "ref")
    waves = Tones(4, 2).waves
    assert loaded.modality == "audio"
    torch.testing.assert_close(loaded.features(waves), model.features(waves))
    torch.testing.assert_close(
        loaded.features(waves[:, None]), model.features(waves)
    )  # [B, 1, S] too


def test_sample_metrics_refuse_a_reference_of_the_other_modality(tiny_checkpoint, tmp_path):
    from tests.helpers.runs import run_sample

    ReferenceCNN(2, 1, 16, 4, audio={"sample_rate": 8000, "num_samples": 2000}).save(
        tmp_path / "ref"
    )
    with pytest.raises(ValueError, match="judges audio, but this run samples image"):
        run_sample(
            tiny_checkpoint,
            tmp_path / "out",
            "num_samples=2",
            "steps=1",
            "metrics=true",
            f"reference={tmp_path / 'ref'}",
        )
