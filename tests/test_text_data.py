"""Captioned data and the text experiment: captions from classes, caption files and manifests, a few real steps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfflow.data.captions import CaptionedDigits, CaptionedImageFolder, ClassCaptions, class_words
from selfflow.data.collate import collate_samples
from tests.test_data_image import write_folder


def test_built_in_digits_are_captioned_by_their_class():
    train = CaptionedDigits("train", image_size=8)
    image, label, extra = train[0]
    assert image.shape == (1, 8, 8) and train.has_captions and train.num_classes == 10
    words = class_words(str(label))
    assert words["word"] in extra["caption"] or words["digit"] in extra["caption"].split()
    test = CaptionedDigits("test", image_size=8)
    assert [test[i][2] for i in range(3)] == [test[i][2] for i in range(3)]  # fixed captions for the test split
    batch = collate_samples("image")([train[0], train[1]])
    assert batch["data"].shape == (2, 1, 8, 8) and len(batch["caption"]) == 2 and isinstance(batch["caption"][0], str)
    assert class_words("7") == {"name": "7", "digit": "7", "word": "seven"}
    with pytest.raises(ValueError, match=r"unknown field 'colour'"):
        ClassCaptions(train.dataset, ["a {colour} digit"])


def test_captioned_folder_reads_caption_files_next_to_images(tmp_path):
    write_folder(tmp_path, per_class=4, size=(8, 8))
    images = sorted(tmp_path.rglob("*.png"))
    for path in images[:-1]:  # the last one has no caption and is left out
        path.with_suffix(".txt").write_text(f"a picture of {path.parent.name}\n")
    both = len(CaptionedImageFolder(str(tmp_path), "train", 8, 3)) + len(CaptionedImageFolder(str(tmp_path), "test", 8, 3))
    assert both == len(images) - 1
    data = CaptionedImageFolder(str(tmp_path), "train", image_size=8, channels=3)
    image, label, extra = data[0]
    assert image.shape == (3, 8, 8) and extra["caption"] == f"a picture of {data.class_names[label]}"
    for path in images:
        path.with_suffix(".txt").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="has a caption file next to it"):
        CaptionedImageFolder(str(tmp_path), "train", 8, 3)


def test_captioned_folder_reads_a_jsonl_or_csv_manifest(tmp_path):
    write_folder(tmp_path, per_class=3, size=(8, 8))
    images = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    rows = [{"path": str(p), "caption": f"caption {i}", "split": "test" if i == 0 else "train"}
            for i, p in enumerate(images)]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    train = CaptionedImageFolder(str(tmp_path), "train", 8, 3, manifest="captions.jsonl")
    test = CaptionedImageFolder(str(tmp_path), "test", 8, 3, manifest="captions.jsonl")
    assert len(train) == len(images) - 1 and [test[0][2]["caption"]] == ["caption 0"]
    assert test[0][1] == -1 and train.num_classes == 0  # no label column: unlabelled
    (tmp_path / "captions.csv").write_text("path,caption,label\n" + "".join(f"{p},a {p.parent.name},{p.parent.name}\n"
                                                                           for p in images))
    csv_train = CaptionedImageFolder(str(tmp_path), "train", 8, 3, manifest="captions.csv")
    assert csv_train.num_classes == 2 and csv_train[0][2]["caption"].startswith("a ")
    (tmp_path / "bad.csv").write_text("path,label\nx.png,1\n")
    with pytest.raises(ValueError, match="needs path and caption"):
        CaptionedImageFolder(str(tmp_path), "train", 8, 3, manifest="bad.csv")


def test_a_text_tokenizer_without_captioned_data_is_refused(tiny_train_cfg):
    from selfflow.training.build import build_run

    with pytest.raises(ValueError, match="tokenizer.text is configured but the data has no captions"):
        build_run(tiny_train_cfg("tokenizer=[image_pixels,text_minilm]"))


@pytest.mark.slow
def test_text_experiment_trains_samples_prompts_and_reloads(tiny_train_cfg, tmp_path):
    from PIL import Image

    from selfflow.cli.sample import sample
    from selfflow.training.build import build_run
    from selfflow.training.checkpoint import load_checkpoint

    cfg = tiny_train_cfg("experiment=text_digits", "trainer.max_steps=2", "data.batch_size=4",
                         "callbacks.samples.prompts=[a handwritten one,the digit 7]")
    run = build_run(cfg)
    assert run.module.model.text_stream is not None and run.module.model.blocks[0].attn.q_norm is not None
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 2
    grid = Image.open(Path(cfg.run_dir) / "samples" / "image" / "final.png")
    assert grid.size == (4 * (2 + 18), 4 * (2 + 2 * 18))  # one row per prompt, one 16-pixel sample each, 4x upscaled
    ckpt = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert not any(k.startswith("tokenizers.") for k in saved)  # the frozen encoder is not in the checkpoint
    loaded = load_checkpoint(ckpt)
    assert "text" in loaded.tokenizers and loaded.model.text_stream is not None

    from hydra import compose, initialize_config_module

    init = tmp_path / "init.png"
    Image.fromarray((torch.rand(16, 16) * 255).byte().numpy()).save(init)
    with initialize_config_module("selfflow.conf", version_base="1.3"):
        sample_cfg = compose("sample", overrides=[f"ckpt={ckpt}", "num_samples=2", "steps=2", "progress=false",
                                                   f"out_dir={tmp_path / 'out'}", "prompt=a handwritten four",
                                                   f"init={init}", "strength=0.5", "cfg_scale=2"])
    summary = sample(sample_cfg)
    assert summary["prompt"] == "a handwritten four" and summary["strength"] == 0.5 and summary["nfe"] == 2
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 2
    with initialize_config_module("selfflow.conf", version_base="1.3"):
        plain_ckpt_cfg = compose("sample", overrides=[f"ckpt={ckpt}", "num_samples=1", "steps=1", "progress=false",
                                                       f"out_dir={tmp_path / 'out2'}", "strength=2", f"init={init}"])
    with pytest.raises(ValueError, match="strength=2"):
        sample(plain_ckpt_cfg)
