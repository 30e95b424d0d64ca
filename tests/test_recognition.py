"""The default run's recognition shares: the video reference classifier, the arithmetic and printing
of the shares, the callback's report, and the whole words of the built-in spoken digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch

from selfflow.data.builtin.moving_digits import MovingDigits
from selfflow.data.builtin.spoken_digits import SpokenDigits
from selfflow.evaluation.recognition import (
    classifier_settings,
    clear_share,
    format_recognition,
    in_memory,
    judge,
    recognised_share,
    reference_key,
    train_reference,
)
from selfflow.evaluation.reference_classifier import (
    ReferenceCNN,
    load_reference_classifier,
)


class Answers:
    """A stand-in classifier whose top class is `answer(labels)`: always the conditioned class or
    never it."""

    num_classes = 10

    def __init__(self, labels: torch.Tensor, right: bool, confidence: float = 10.0):
        self.labels, self.right, self.confidence = labels, right, confidence

    def logits(self, samples: torch.Tensor) -> torch.Tensor:
        answer = self.labels if self.right else (self.labels + 1) % self.num_classes
        return torch.nn.functional.one_hot(answer, self.num_classes).float() * self.confidence


def test_recognition_is_the_share_of_samples_named_as_their_class():
    labels = torch.arange(10).repeat_interleave(3)  # [30]
    samples = torch.zeros(30, 1, 16, 16)
    always = judge({"digit": Answers(labels, right=True)}, "digit", samples, labels)
    never = judge({"digit": Answers(labels, right=False)}, "digit", samples, labels)
    assert always == {"num_samples": 30, "recognised": 1.0} and never == {
        "num_samples": 30,
        "recognised": 0.0,
    }
    probs = torch.eye(4)[[0, 1, 2, 2]]  # 3 of 4 right
    assert recognised_share(probs, torch.tensor([0, 1, 2, 3])) == 0.75


def test_a_label_the_run_is_not_conditioned_on_gives_the_share_of_clear_answers():
    labels = torch.arange(10).repeat_interleave(2)
    sure, unsure = (
        Answers(labels, right=False, confidence=10.0),
        Answers(labels, right=False, confidence=0.0),
    )
    entry = judge(
        {"digit": Answers(labels, right=True), "direction": sure},
        "digit",
        torch.zeros(20, 8),
        labels,
    )
    assert entry == {"num_samples": 20, "recognised": 1.0, "direction_clear": 1.0}
    assert (
        judge({"direction": unsure}, "digit", torch.zeros(20, 8), labels)["direction_clear"] == 0.0
    )
    assert clear_share(torch.tensor([[0.6, 0.4], [0.3, 0.35]])) == 0.5


def test_recognition_is_printed_in_percent_per_modality():
    report = {
        "image": {"num_samples": 100, "recognised": 1.0},
        "video": {"num_samples": 100, "recognised": 0.0, "direction_clear": 0.815},
    }
    assert format_recognition(report).splitlines() == [
        "  image: 100% of 100 samples recognised as their class",
        "  video: 0% of 100 samples recognised as their class (direction clear in 82%)",
    ]


def test_a_cached_reference_is_keyed_by_data_settings_not_by_cache_place():
    config = {
        "_target_": "selfflow.data.builtin.moving_digits.MovingDigits",
        "_partial_": True,
        "label": "digit",
        "clips_train": 40,
        "cache_dir": "/a",
        "on_bad_file": "skip",
    }
    key = reference_key(config, "direction")
    assert key == reference_key({**config, "cache_dir": "/b", "on_bad_file": "error"}, "direction")
    assert (
        key
        != reference_key({**config, "clips_train": 80}, "direction")
        != reference_key(config, "digit")
    )


def test_video_reference_classifier_takes_clips_and_round_trips(tmp_path):
    model = ReferenceCNN(8, channels=8, image_size=16, width=4, video={"num_frames": 8})
    clips = torch.rand(3, 8, 1, 16, 16)  # [B, T, C, H, W]
    assert model.modality == "video" and model.logits(clips).shape == (3, 8)
    loaded = load_reference_classifier(model.save(tmp_path / "ref"))
    assert loaded.modality == "video" and torch.allclose(
        loaded.logits(clips), model.eval().logits(clips), atol=1e-6
    )
    with pytest.raises(ValueError, match=r"takes clips \[B, 8, C, H, W\], got \[3, 4, 1, 16, 16\]"):
        model.logits(clips[:, :4])


def test_a_clip_read_frame_by_frame_is_judged_by_all_its_frames_in_any_order(tmp_path):
    model = ReferenceCNN(
        10, channels=1, image_size=16, width=4, video={"num_frames": 8, "frames": "each"}
    ).eval()
    clips = torch.rand(3, 8, 1, 16, 16)  # [B, T, C, H, W]
    per_frame = model.head(model.body(clips.flatten(0, 1) * 2 - 1)).unflatten(
        0, (3, 8)
    )  # [B, T, K]
    assert torch.allclose(model.logits(clips), per_frame.mean(1), atol=1e-5)  # the frames' mean
    assert torch.allclose(
        model.logits(clips.flip(1)), model.logits(clips), atol=1e-5
    )  # not how they move
    loaded = load_reference_classifier(model.save(tmp_path / "ref"))
    assert torch.allclose(loaded.logits(clips), model.logits(clips), atol=1e-6)
    with pytest.raises(ValueError, match="video frames='all' is unknown"):
        ReferenceCNN(10, video={"num_frames": 8, "frames": "all"})


@pytest.mark.slow
def test_video_reference_classifiers_learn_digits_frame_by_frame_and_directions_from_stacked_frames(
    tmp_path,
):
    sizes = {"clips_train": 320, "clips_test": 80, "cache_dir": str(tmp_path / "cache")}
    accuracies = {}
    for label in ("digit", "direction"):
        train, test = (
            MovingDigits("train", label=label, **sizes),
            MovingDigits("test", label=label, **sizes),
        )
        settings = classifier_settings("selfflow.data.builtin.moving_digits.MovingDigits", label)
        settings["epochs"] *= 6  # the default run's number of updates from a sixth of its clips
        model, accuracies[label] = train_reference(train, test, "video", settings)
        clips, labels = in_memory(test).tensors
        assert recognised_share(model.logits(clips).softmax(-1), labels) == pytest.approx(
            accuracies[label]
        )
        assert (
            type(model.front).__name__ == {"digit": "EachFrame", "direction": "FrameStack"}[label]
        )
    assert (
        accuracies["direction"] > 0.5
    )  # chance is 1/8: the classifier sees the motion, not just one frame
    assert accuracies["digit"] > 0.5  # chance is 1/10 (on the 2,000 default clips: 98-99%)


def test_built_in_spoken_digits_hold_whole_words_with_silence_at_both_edges(tmp_path):
    pytest.importorskip("espeakng_loader")
    torch.manual_seed(0)
    sizes = {
        "voices": ["en+m1", "en+f3"],
        "takes": 3,
        "test_takes": 1,
        "cache_dir": str(tmp_path / "cache"),
    }
    words = SpokenDigits("train", **sizes)
    edge = 400  # 50 ms at 8 kHz
    for i, path in enumerate(words.paths):
        wave, _ = words[i]  # [1, 8000]
        word = soundfile.read(str(path), dtype="float32")[0]
        assert wave.shape == (1, 8000) and len(word) < 8000 - 2 * edge
        assert (
            float(wave[0, :edge].abs().max()) < 1e-3 and float(wave[0, -edge:].abs().max()) < 1e-3
        )
        assert float((wave**2).sum()) == pytest.approx(
            float(np.square(word).sum()), rel=1e-5
        )  # all of it
    with pytest.raises(ValueError, match="data.dataset.placement='middle' is unknown"):
        SpokenDigits("train", placement="middle", **sizes)


@pytest.mark.slow
def test_a_small_joint_run_reports_all_three_shares(tmp_path, capsys):
    from selfflow.training.run import train
    from tests.helpers.configs import SMALL_JOINT, TINY, compose_train

    with_recognition = [
        o for o in TINY if o != "~callbacks.recognition"
    ]  # the tests' runs leave it out
    cfg = compose_train(
        [
            "trainer.max_steps=2",
            "callbacks.recognition.samples_per_class=2",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ],
        tmp_path / "run",
        tiny=[*with_recognition, *SMALL_JOINT],
    )
    train(cfg)
    report = json.loads((tmp_path / "run" / "recognition.json").read_text())
    assert set(report) == {"image", "video", "audio"}
    assert report["video"]["num_samples"] == 20 and 0 <= report["video"]["recognised"] <= 1
    assert set(report["video"]["reference_test_accuracy"]) == {"digit", "direction"}
    assert "direction_clear" in report["video"]
    printed = capsys.readouterr().out
    assert "samples recognised by the reference classifiers" in printed and "  audio: " in printed
    assert (
        len(list((tmp_path / "cache" / "reference_classifiers").glob("*/model.safetensors"))) == 4
    )


def test_a_built_in_set_larger_than_the_limits_is_refused_before_anything_is_made(tmp_path):
    from selfflow.evaluation.recognition import built_in_dataset

    for target, sizes in (
        ("selfflow.data.builtin.moving_digits.MovingDigits", {"clips_train": 10**9}),
        ("selfflow.data.builtin.spoken_digits.SpokenDigits", {"voices": ["en+m1"] * 1000}),
        ("selfflow.data.builtin.digits.DigitImages", {"image_size": 10**6}),
    ):
        key = next(iter(sizes))
        with pytest.raises(ValueError, match=f"built-in set with {key}="):
            built_in_dataset(
                {"_target_": target, **sizes}, "train", "digit", str(tmp_path / "cache")
            )
    assert not (tmp_path / "cache").exists()
    small = built_in_dataset(
        {"_target_": "selfflow.data.builtin.digits.DigitImages", "image_size": 8},
        "test",
        "digit",
        None,
    )
    assert small[0][0].shape == (1, 8, 8)
