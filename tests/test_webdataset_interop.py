"""WebDataset interchange both ways: shards written by the `webdataset` library with the member
names img2dataset and video2dataset use (image: jpg/png/webp + cls or json label + txt caption;
video: mp4; audio: wav/flac) train here after `selfflow-shards index`, and a shard `selfflow-shards
write` wrote iterates in `webdataset`."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from selfflow.data.shards.dataset import AudioShards, ImageShards, VideoShards
from selfflow.data.shards.writer import write_shards
from selfflow.io.video import write_mp4
from tests.helpers.configs import compose_train
from tests.helpers.files import ramp_video, tone, write_images
from tests.helpers.runs import exit_status

wds = pytest.importorskip("webdataset")

AUDIO_FORMATS = ("flac", "wav")
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def image_bytes(extension: str, value: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.full((20, 24, 3), value, np.uint8)
    Image.fromarray(pixels).save(buffer, format=IMAGE_FORMATS[extension])
    return buffer.getvalue()


def wav_bytes(extension: str, freq: float) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(freq, 1.2, 8000), 8000, format=extension.upper())
    return buffer.getvalue()


def mp4_bytes(folder: Path, offset: int) -> bytes:
    frames = ramp_video(12, size=16, offset=offset)
    return write_mp4(frames, folder / f"{offset}.mp4", fps=10, crf=0).read_bytes()


def img2dataset_sample(i: int, label_in: str) -> dict:
    """An img2dataset-style sample: image, caption and metadata; the class in .cls or in the .json
    metadata."""
    extension = list(IMAGE_FORMATS)[i % 3]
    metadata = {
        "key": f"{i:09d}",
        "caption": f"a photo {i}",
        "status": "success",
        "width": 24,
        "height": 20,
    }
    sample = {
        "__key__": f"{i:09d}",
        extension: image_bytes(extension, 40 * i),
        "txt": f"a photo {i}".encode(),
    }
    if label_in == "cls":
        sample["cls"] = str(i % 2).encode()
    else:
        metadata["label"] = i % 2
    sample["json"] = json.dumps(metadata).encode()
    return sample


def write_with_webdataset(folder: Path, samples: list[dict], split: str = "train") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / f"{split}-000000.tar")) as writer:
        for sample in samples:
            writer.write(sample)
    assert exit_status(["index", str(folder)]) == 0  # selfflow-shards index
    return folder


@pytest.mark.parametrize("label_in", ["cls", "json"])
def test_an_img2dataset_shard_written_by_webdataset_reads_with_labels_and_captions(
    tmp_path,
    label_in,
):
    samples = [img2dataset_sample(i, label_in) for i in range(6)]
    folder = write_with_webdataset(tmp_path / "shards", samples)
    dataset = ImageShards(str(folder), "train", image_size=8, hflip=False)
    assert len(dataset) == 6 and dataset.class_names == ["0", "1"]
    assert [dataset[i][1] for i in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [dataset.caption(i) for i in range(6)] == [f"a photo {i}" for i in range(6)]
    levels = [float(dataset[i][0].mean()) * 255 for i in range(6)]
    assert all(abs(level - 40 * i) < 3 for i, level in enumerate(levels)), levels


def test_json_metadata_without_a_label_is_an_unlabelled_sample_and_a_bad_label_a_bad_sample(
    tmp_path,
):
    samples = [img2dataset_sample(i, "json") for i in range(4)]
    # img2dataset's own metadata: no class
    samples[1]["json"] = json.dumps({"key": "x", "status": "success"}).encode()
    samples[2]["json"] = json.dumps({"label": [1, 2]}).encode()
    folder = write_with_webdataset(tmp_path / "shards", samples)
    dataset = ImageShards(str(folder), "train", image_size=8)
    assert dataset[1][1] == -1 and dataset[2] is None and dataset[3][1] == 1


def webdataset_media_samples(tmp_path: Path) -> dict[str, list[dict]]:
    """video2dataset-style mp4 samples and audio samples (wav and flac), labelled by .cls or
    .json."""
    video = [
        {
            "__key__": f"v{i:04d}",
            "mp4": mp4_bytes(tmp_path, 40 * (i % 2)),
            "txt": b"a clip",
            "cls": b"%d" % (i % 2),
        }
        for i in range(4)
    ]
    audio = [
        {
            "__key__": f"a{i:04d}",
            AUDIO_FORMATS[i % 2]: wav_bytes(AUDIO_FORMATS[i % 2], 300 + 400 * (i % 2)),
            "json": json.dumps({"label": i % 2}).encode(),
        }
        for i in range(4)
    ]
    return {"video": video, "audio": audio}


MEDIA = {
    "image": ("image_pixels", ["data.dataset.image_size=8"]),
    "video": ("video_tubelets", ["data.dataset.num_frames=4", "data.dataset.image_size=16"]),
    "audio": ("audio_mel", []),
}


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_webdataset_written_shards_train_in_the_shard_data_configs(tmp_path, modality):
    from selfflow.training.build import build_run

    samples = {
        "image": [img2dataset_sample(i, "cls") for i in range(6)],
        **webdataset_media_samples(tmp_path),
    }
    folder = tmp_path / "shards"
    for split in ("train", "test"):
        write_with_webdataset(folder, samples[modality], split)
    tokenizer, sizes = MEDIA[modality]
    overrides = [
        f"data={modality}_shards",
        f"tokenizer={tokenizer}",
        f"data.root={folder}",
        "data.batch_size=2",
    ]
    overrides += [*sizes, "trainer.max_steps=2", "~callbacks.samples", "~callbacks.probe"]
    run = build_run(compose_train(overrides, tmp_path / "run"))
    kinds = {AudioShards: "audio", VideoShards: "video", ImageShards: "image"}
    assert kinds[type(run.datamodule.train_set)] == modality
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 2
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_a_selfflow_shard_iterates_in_webdataset(tmp_path):
    write_images(tmp_path / "src", per_class=3)
    write_shards(tmp_path / "src", tmp_path / "shards", "image", splits=("train",))
    sources = {path.read_bytes(): path.parent.name for path in (tmp_path / "src").rglob("*.*g")}
    shards = sorted(str(p) for p in (tmp_path / "shards").glob("train-*.tar"))
    names = json.loads((tmp_path / "shards" / "classes.json").read_text())["class_names"]
    read = list(wds.WebDataset(shards, shardshuffle=False))
    ours = ImageShards(str(tmp_path / "shards"), "train", image_size=8, hflip=False)
    assert len(read) == len(ours) >= 4
    for i, sample in enumerate(read):
        data = sample.get("png", sample.get("jpg"))
        assert sample["__key__"] == ours.keys[i] and int(sample["cls"]) == ours[i][1]
        assert sources[data] == names[int(sample["cls"])]  # the file's own bytes, under its class
    pipeline = wds.WebDataset(shards, shardshuffle=False).decode("torchrgb")
    decoded = next(iter(pipeline.to_tuple("png;jpg", "cls")))
    assert decoded[0].shape[0] == 3 and decoded[1] == ours[0][1]
