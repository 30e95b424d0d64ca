"""Captioned data and the text experiment: captions from classes, caption files and manifests, a few
real steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfflow.data.batching.collate import collate_samples
from selfflow.data.builtin.captioned import (
    AUDIO_TEMPLATES,
    CaptionedDigits,
    CaptionedMovingDigits,
    CaptionedSpokenDigits,
)
from selfflow.data.folders.captions import (
    CaptionedAudioFolder,
    CaptionedImageFolder,
    CaptionedVideoFolder,
    ClassCaptions,
    class_words,
)
from tests.helpers.files import tone, write_folder, write_video_folder


def test_built_in_digits_are_captioned_by_their_class():
    train = CaptionedDigits("train", image_size=8)
    image, label, extra = train[0]
    assert image.shape == (1, 8, 8) and train.has_captions and train.num_classes == 10
    words = class_words(str(label))
    assert words["word"] in extra["caption"] or words["digit"] in extra["caption"].split()
    test = CaptionedDigits("test", image_size=8)
    assert [test[i][2] for i in range(3)] == [
        test[i][2] for i in range(3)
    ]  # fixed captions for the test split
    batch = collate_samples("image")([train[0], train[1]])
    assert (
        batch["data"].shape == (2, 1, 8, 8)
        and len(batch["caption"]) == 2
        and isinstance(batch["caption"][0], str)
    )
    assert class_words("7") == {"name": "7", "digit": "7", "word": "seven"}
    with pytest.raises(ValueError, match=r"unknown field 'colour'"):
        ClassCaptions(train.dataset, ["a {colour} digit"])


def test_captioned_folder_reads_caption_files_next_to_images(tmp_path):
    write_folder(tmp_path, per_class=4, size=(8, 8))
    images = sorted(tmp_path.rglob("*.png"))
    for path in images[:-1]:  # the last one has no caption and is left out
        path.with_suffix(".txt").write_text(f"a picture of {path.parent.name}\n")
    both = len(CaptionedImageFolder(str(tmp_path), "train", 8, 3)) + len(
        CaptionedImageFolder(str(tmp_path), "test", 8, 3)
    )
    assert both == len(images) - 1
    data = CaptionedImageFolder(str(tmp_path), "train", image_size=8, channels=3)
    image, label, extra = data[0]
    assert (
        image.shape == (3, 8, 8) and extra["caption"] == f"a picture of {data.class_names[label]}"
    )
    for path in images:
        path.with_suffix(".txt").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="has a caption file next to it"):
        CaptionedImageFolder(str(tmp_path), "train", 8, 3)


def test_captioned_folder_reads_a_jsonl_or_csv_manifest(tmp_path):
    write_folder(tmp_path, per_class=3, size=(8, 8))
    images = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    rows = [
        {"path": str(p), "caption": f"caption {i}", "split": "test" if i == 0 else "train"}
        for i, p in enumerate(images)
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    train = CaptionedImageFolder(str(tmp_path), "train", 8, 3, manifest="captions.jsonl")
    test = CaptionedImageFolder(str(tmp_path), "test", 8, 3, manifest="captions.jsonl")
    assert len(train) == len(images) - 1 and [test[0][2]["caption"]] == ["caption 0"]
    assert test[0][1] == -1 and train.num_classes == 0  # no label column: unlabelled
    (tmp_path / "captions.csv").write_text(
        "path,caption,label\n" + "".join(f"{p},a {p.parent.name},{p.parent.name}\n" for p in images)
    )
    csv_train = CaptionedImageFolder(str(tmp_path), "train", 8, 3, manifest="captions.csv")
    assert csv_train.num_classes == 2 and csv_train[0][2]["caption"].startswith("a ")
    (tmp_path / "bad.csv").write_text("path,label\nx.png,1\n")
    with pytest.raises(ValueError, match="needs path and caption"):
        CaptionedImageFolder(str(tmp_path), "train", 8, 3, manifest="bad.csv")


def test_built_in_clips_and_recordings_are_captioned_from_their_file_names(tmp_path):
    videos = CaptionedMovingDigits(
        "train", num_frames=4, image_size=8, clips_train=12, clips_test=4, cache_dir=str(tmp_path)
    )
    for i in range(len(videos)):
        clip, label, extra = videos[i]
        digit, direction, _ = videos.paths[i].stem.split("_")
        assert clip.shape == (4, 1, 8, 8) and videos.class_names[label] == digit
        vertical, _, horizontal = direction.partition("-")
        words = f"{vertical} and to the {horizontal}" if horizontal else direction
        assert extra["caption"].endswith(f" moving {words}") or extra["caption"].endswith(
            f" sliding {words}"
        )
        assert class_words(digit)["word"] in extra["caption"] or f" {digit} " in extra["caption"]
    audio = CaptionedSpokenDigits(
        "test", voices=["en+m1", "en+f1"], takes=2, test_takes=1, cache_dir=str(tmp_path)
    )
    captions = [audio[i][2]["caption"] for i in range(len(audio))]
    assert captions == [
        audio[i][2]["caption"] for i in range(len(audio))
    ]  # test captions are fixed
    for i, caption in enumerate(captions):  # test split: template i % 5, filled from the file name
        word = class_words(audio.paths[i].stem.split("_")[0])["word"]
        speaker = "a woman" if "-f1_" in audio.paths[i].name else "a man"
        assert caption == AUDIO_TEMPLATES[i % len(AUDIO_TEMPLATES)].format(
            word=word, speaker=speaker
        )
    assert any(c.startswith("a woman") for c in captions) and any(
        c.startswith("a man") for c in captions
    )
    by_direction = CaptionedMovingDigits(
        "test",
        label="direction",
        num_frames=4,
        image_size=8,
        clips_train=12,
        clips_test=4,
        cache_dir=str(tmp_path),
    )
    for i in range(
        len(by_direction)
    ):  # labels are directions now; the caption still names the digit
        digit = by_direction.paths[i].stem.split("_")[0]
        caption = by_direction[i][2]["caption"]
        assert class_words(digit)["word"] in caption.split() or digit in caption.split(), caption
    with pytest.raises(ValueError, match=r"unknown field 'colour'.*\{direction\}"):
        CaptionedMovingDigits(
            "test",
            templates=["a {colour} clip"],
            num_frames=4,
            image_size=8,
            clips_train=12,
            clips_test=4,
            cache_dir=str(tmp_path),
        )


def test_captioned_video_and_audio_folders_read_caption_files_or_a_manifest(tmp_path):
    import soundfile

    write_video_folder(tmp_path / "clips", per_class=2, num_frames=6)
    clips = sorted((tmp_path / "clips").rglob("*.mp4"))
    for path in clips[:-1]:
        path.with_suffix(".txt").write_text(f"someone doing a {path.parent.name} ")
    both = [
        CaptionedVideoFolder(
            str(tmp_path / "clips"),
            split,
            num_frames=4,
            image_size=8,
            channels=1,
            test_fraction=0.25,
        )
        for split in ("train", "test")
    ]
    assert sum(map(len, both)) == len(clips) - 1  # the clip without a caption is left out
    clip, label, extra = both[0][0]
    assert clip.shape == (4, 1, 8, 8) and extra == {
        "caption": f"someone doing a {both[0].class_names[label]}"
    }
    rows = [
        {
            "path": str(p.relative_to(tmp_path / "clips")),
            "caption": f"clip {i}",
            "split": "test" if i else "train",
        }
        for i, p in enumerate(clips)
    ]
    (tmp_path / "clips" / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    from_manifest = CaptionedVideoFolder(
        str(tmp_path / "clips"),
        "train",
        manifest="captions.jsonl",
        num_frames=4,
        image_size=8,
        channels=1,
    )
    assert len(from_manifest) == 1 and from_manifest[0][1:] == (-1, {"caption": "clip 0"})

    (tmp_path / "sounds").mkdir()
    for i, freq in enumerate((300, 500, 700, 900)):
        soundfile.write(tmp_path / "sounds" / f"s{i}.wav", tone(freq, 1.0, 8000), 8000)
    (tmp_path / "sounds" / "captions.csv").write_text(
        "path,caption,label\n"
        + "".join(
            f"s{i}.wav,a {f} hertz tone,{'low' if f < 600 else 'high'}\n"
            for i, f in enumerate((300, 500, 700, 900))
        )
    )
    train = CaptionedAudioFolder(
        str(tmp_path / "sounds"), "train", manifest="captions.csv", test_fraction=0.25
    )
    test = CaptionedAudioFolder(
        str(tmp_path / "sounds"), "test", manifest="captions.csv", test_fraction=0.25
    )
    assert (len(train), len(test), train.class_names) == (3, 1, ["high", "low"])
    wave, label, extra = test[0]
    assert wave.shape == (1, 8000) and extra["caption"].endswith("hertz tone")
    assert train.class_names[label] == ("low" if int(extra["caption"].split()[1]) < 600 else "high")
    with pytest.raises(FileNotFoundError, match="has a caption file next to it"):
        CaptionedAudioFolder(str(tmp_path / "sounds"), "train")
    with pytest.raises(ValueError, match="not supported here"):
        CaptionedVideoFolder(str(tmp_path / "sounds"), "train", manifest="captions.csv")


def test_a_text_tokenizer_without_captioned_data_is_refused(tiny_train_cfg):
    from selfflow.training.build import build_run

    with pytest.raises(
        ValueError, match="tokenizer.text is configured but the data has no captions"
    ):
        build_run(tiny_train_cfg("tokenizer=[image_pixels,text_minilm]"))


@pytest.mark.slow
def test_text_experiment_trains_samples_prompts_and_reloads(tiny_train_cfg, tmp_path):
    from PIL import Image

    from selfflow.cli.sample import sample
    from selfflow.interop.checkpoint import load_checkpoint
    from selfflow.training.build import build_run

    cfg = tiny_train_cfg(
        "experiment=text_digits",
        "trainer.max_steps=2",
        "data.batch_size=4",
        "callbacks.samples.prompts=[a handwritten one,the digit 7]",
    )
    run = build_run(cfg)
    assert (
        run.module.model.text_stream is not None
        and run.module.model.blocks[0].attn.q_norm is not None
    )
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 2
    grid = Image.open(Path(cfg.run_dir) / "samples" / "image" / "final.png")
    assert grid.size == (
        4 * (2 + 18),
        4 * (2 + 2 * 18),
    )  # one row per prompt, one 16-pixel sample each, 4x upscaled
    ckpt = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert not any(
        k.startswith("tokenizers.") for k in saved
    )  # the frozen encoder is not in the checkpoint
    loaded = load_checkpoint(ckpt)
    assert "text" in loaded.tokenizers and loaded.model.text_stream is not None

    from hydra import compose, initialize_config_module

    init = tmp_path / "init.png"
    Image.fromarray((torch.rand(16, 16) * 255).byte().numpy()).save(init)
    with initialize_config_module("selfflow.conf", version_base="1.3"):
        sample_cfg = compose(
            "sample",
            overrides=[
                f"ckpt={ckpt}",
                "num_samples=2",
                "steps=2",
                "progress=false",
                f"out_dir={tmp_path / 'out'}",
                "prompt=a handwritten four",
                f"init={init}",
                "strength=0.5",
                "cfg_scale=2",
            ],
        )
    summary = sample(sample_cfg)
    assert (
        summary["prompt"] == "a handwritten four"
        and summary["strength"] == 0.5
        and summary["nfe"] == 2
    )
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 2
    with initialize_config_module("selfflow.conf", version_base="1.3"):
        plain_ckpt_cfg = compose(
            "sample",
            overrides=[
                f"ckpt={ckpt}",
                "num_samples=1",
                "steps=1",
                "progress=false",
                f"out_dir={tmp_path / 'out2'}",
                "strength=2",
                f"init={init}",
            ],
        )
    with pytest.raises(ValueError, match="strength=2"):
        sample(plain_ckpt_cfg)


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment, modality, suffix",
    [("text_audio_digits", "audio", "wav"), ("text_video_digits", "video", "mp4")],
)
def test_text_to_audio_and_video_train_and_name_their_samples_by_prompt(
    tiny_train_cfg, experiment, modality, suffix
):
    from selfflow.training.build import build_run

    cfg = tiny_train_cfg(
        f"experiment={experiment}",
        "trainer.max_steps=2",
        "data.batch_size=4",
        "callbacks.samples.every_n_steps=0",
        "callbacks.samples.prompts=[a man saying one,'Seven!',seven]",
    )
    run = build_run(cfg)
    assert run.datamodule.train_set.has_captions and run.module.model.text_stream is not None
    run.trainer.fit(run.module, datamodule=run.datamodule)
    folder = Path(cfg.run_dir) / "samples" / modality / "final"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"a-man-saying-one_0.{suffix}",
        f"seven-2_0.{suffix}",
        f"seven_0.{suffix}",
    ]
