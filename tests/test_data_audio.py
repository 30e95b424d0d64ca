"""Audio data on real files: WAV/FLAC/OGG written here with soundfile, the real FSDD recordings, the
built-in spoken digits; every bad-input case."""

import sys

import numpy as np
import pytest
import soundfile
import torch

from selfflow.data.batching.collate import collate_samples
from selfflow.data.builtin.spoken_digits import SpokenDigits
from selfflow.data.folders.audio_folder import AudioFolder
from selfflow.io.bad_files import BadFileError
from tests.helpers.configs import shared_dataset
from tests.helpers.files import tone


def peak_frequency(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave.reshape(-1)).abs()
    return float(spectrum.argmax()) * rate / wave.numel()


def test_audio_folder_resamples_mixes_to_mono_and_centres_short_clips(tmp_path):
    for name in ("low", "high"):
        (tmp_path / name).mkdir()
    soundfile.write(tmp_path / "low" / "a.wav", tone(300, 0.5, 8000), 8000)
    stereo = np.stack([tone(1000, 2.0, 16000), tone(1000, 2.0, 16000)], axis=1)
    soundfile.write(tmp_path / "high" / "b.flac", stereo, 16000)
    soundfile.write(tmp_path / "high" / "c.ogg", tone(1000, 1.0, 22050), 22050)
    dataset = AudioFolder(str(tmp_path), "test", sample_rate=8000, duration=1.0, test_fraction=0.99)
    assert dataset.class_names == ["high", "low"] and len(dataset) == 3
    by_name = {p.name: dataset[i] for i, p in enumerate(dataset.paths)}
    short, label = by_name["a.wav"]
    assert short.shape == (1, 8000) and dataset.class_names[label] == "low"
    # 0.5 s padded to 1 s, centred: a quarter second of silence on each side
    assert short[0, :1990].abs().max() == 0 and short[0, -1990:].abs().max() == 0
    assert short[0, 2000:6000].abs().max() > 0.4
    for name in ("b.flac", "c.ogg"):
        wave, label = by_name[name]
        assert wave.shape == (1, 8000) and dataset.class_names[label] == "high"
        assert abs(peak_frequency(wave, 8000) - 1000) < 5
        assert 0.4 < float(wave.abs().max()) < 0.6


def test_training_crops_start_at_random_points(tmp_path):
    (tmp_path / "a").mkdir()
    ramp = np.linspace(
        -0.9, 0.9, 32000, dtype=np.float32
    )  # 4 s at 8 kHz; each crop reveals its start
    for i in range(2):
        soundfile.write(tmp_path / "a" / f"{i}.wav", ramp, 8000, subtype="FLOAT")
    train = AudioFolder(str(tmp_path), "train", sample_rate=8000, duration=0.5, test_fraction=0.5)
    starts = {round(float(train[0][0][0, 0]), 3) for _ in range(10)}
    assert len(starts) > 5
    test = AudioFolder(str(tmp_path), "test", sample_rate=8000, duration=0.5, test_fraction=0.5)
    np.testing.assert_allclose(test[0][0][0].numpy(), ramp[14000:18000])  # the centred half second


def test_labels_from_file_names_on_real_fsdd_recordings():
    root = shared_dataset("fsdd")
    digits = AudioFolder(
        str(root / "recordings"),
        "train",
        name_pattern="{digit}_{speaker}_{index}",
        label_field="digit",
    )
    speakers = AudioFolder(
        str(root / "recordings"),
        "test",
        name_pattern="{digit}_{speaker}_{index}",
        label_field="speaker",
    )
    assert digits.class_names == [str(d) for d in range(10)]
    assert "george" in speakers.class_names and "jackson" in speakers.class_names
    for i in range(0, len(digits), 400):
        wave, label = digits[i]
        assert wave.shape == (1, 8000) and wave.abs().max() > 0.01
        assert digits.class_names[label] == digits.paths[i].name.split("_")[0]
    wave, label = speakers[0]
    assert speakers.class_names[label] == speakers.paths[0].name.split("_")[1]
    batch = collate_samples("audio")([digits[i] for i in range(8)])
    assert batch["data"].shape == (8, 1, 8000) and batch["label"].dtype == torch.long


def write_bad_recordings(folder):
    """Good files plus one of each broken kind; returns {file name: words expected in
    the reason}."""
    folder.mkdir(parents=True)
    soundfile.write(folder / "good0.wav", tone(440, 1.0, 8000), 8000)
    soundfile.write(folder / "good1.wav", tone(660, 1.0, 8000), 8000)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "corrupt.flac").write_bytes(b"fLaC" + np.random.default_rng(0).bytes(2000))
    whole = (folder / "good0.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    (folder / "header_only.wav").write_bytes(whole[:44])
    soundfile.write(folder / "silent.wav", np.zeros(8000, np.float32), 8000)
    soundfile.write(folder / "nan.wav", np.full(8000, np.nan, np.float32), 8000, subtype="FLOAT")
    soundfile.write(folder / "wrong_rate.wav", tone(440, 1.0, 44100), 44100)
    return {
        "empty.wav": "empty file (0 bytes)",
        "corrupt.flac": "LibsndfileError",
        "truncated.wav": "truncated",
        "header_only.wav": "",
        "silent.wav": "silent",
        "nan.wav": "NaN",
        "wrong_rate.wav": "44100 Hz",
    }


def test_broken_recordings_are_skipped_with_a_reason_and_recorded(tmp_path):
    expected = write_bad_recordings(tmp_path / "d" / "train" / "a")
    (tmp_path / "d" / "test" / "a").mkdir(parents=True)
    soundfile.write(tmp_path / "d" / "test" / "a" / "t.wav", tone(440, 1.0, 8000), 8000)
    record = tmp_path / "skipped.tsv"
    dataset = AudioFolder(str(tmp_path / "d"), "train", resample=False)
    dataset.bad_files.record_path = record
    items = [dataset[i] for i in range(len(dataset))]
    assert sorted(p.name for p, item in zip(dataset.paths, items) if item is not None) == [
        "good0.wav",
        "good1.wav",
    ]
    assert collate_samples("audio")(items)["data"].shape == (2, 1, 8000)
    lines = dict(line.split("\t") for line in record.read_text().splitlines())
    assert sorted(lines) == sorted(str(tmp_path / "d" / "train" / "a" / name) for name in expected)
    for name, words in expected.items():
        assert words in lines[str(tmp_path / "d" / "train" / "a" / name)], (name, lines)
    # with resampling on (the default) the 44.1 kHz file is fine
    resampling = AudioFolder(str(tmp_path / "d"), "train")
    wave, _ = resampling[[p.name for p in resampling.paths].index("wrong_rate.wav")]
    assert abs(peak_frequency(wave, 8000) - 440) < 5


def test_on_bad_file_error_and_startup_errors(tmp_path):
    write_bad_recordings(tmp_path / "d" / "train" / "a")
    (tmp_path / "d" / "test").mkdir()
    soundfile.write(tmp_path / "d" / "test" / "t.wav", tone(440, 1.0, 8000), 8000)
    dataset = AudioFolder(str(tmp_path / "d"), "train")
    dataset.bad_files.on_bad_file = "error"
    with pytest.raises(BadFileError, match="silent.wav: recording is silent"):
        dataset[[p.name for p in dataset.paths].index("silent.wav")]
    with pytest.raises(FileNotFoundError, match="data.root=.*missing is not a folder"):
        AudioFolder(str(tmp_path / "missing"))
    (tmp_path / "mp3s").mkdir()
    (tmp_path / "mp3s" / "a.mp3").write_bytes(b"ID3")
    with pytest.raises(
        FileNotFoundError, match=r"no files with extensions \['.wav', '.flac', '.ogg'\]"
    ):
        AudioFolder(str(tmp_path / "mp3s"))
    (tmp_path / "dead").mkdir()
    for i in range(3):
        soundfile.write(tmp_path / "dead" / f"{i}.wav", np.zeros(800, np.float32), 8000)
    with pytest.raises(
        ValueError, match=r"none of the \d+ files .* can be read .*dead/\d.wav: recording is silent"
    ):
        AudioFolder(str(tmp_path / "dead"))


def test_spoken_digits_are_synthesised_once_with_digit_and_voice_labels(tmp_path):
    pytest.importorskip("espeakng_loader")
    sizes = {
        "voices": ["en+m1", "en+f3"],
        "takes": 3,
        "test_takes": 1,
        "cache_dir": str(tmp_path / "cache"),
    }
    digits = SpokenDigits("train", label="digit", **sizes)
    voices = SpokenDigits("test", label="voice", **sizes)
    assert len(digits) == 2 * 10 * 2 and len(voices) == 2 * 10 * 1
    assert digits.class_names == [str(d) for d in range(10)] and voices.class_names == [
        "en-f3",
        "en-m1",
    ]
    folder = digits.paths[0].parents[1]
    assert folder.parent == tmp_path / "cache" / "spoken_digits"
    assert soundfile.info(str(digits.paths[0])).samplerate == 8000
    waves = {}
    for i, path in enumerate(voices.paths):
        wave, label = voices[i]
        assert voices.class_names[label] == path.stem.split("_")[1]
        assert wave.shape == (1, 8000) and 0.05 < float(wave.abs().max()) <= 1.0
        waves[path.stem] = wave
    # real speech: the same digit in two voices differs, and "seven" lasts longer than "one"
    assert not torch.allclose(waves["3_en-m1_002"], waves["3_en-f3_002"])
    assert (waves["7_en-m1_002"].abs() > 0.01).sum() > (waves["1_en-m1_002"].abs() > 0.01).sum()
    stamp = digits.paths[0].stat().st_mtime_ns
    SpokenDigits("train", **sizes)
    assert digits.paths[0].stat().st_mtime_ns == stamp  # the cache is reused, not rewritten
    other = SpokenDigits("train", **{**sizes, "takes": 4})
    assert other.paths[0].parents[1] != folder


def test_missing_synthesiser_names_the_package_to_install(tmp_path, monkeypatch):
    from selfflow.data.builtin.speech_synth import Espeak

    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    monkeypatch.setattr(Espeak, "_instance", None)
    with pytest.raises(ModuleNotFoundError, match="pip install espeakng-loader"):
        SpokenDigits("train", takes=2, test_takes=1, cache_dir=str(tmp_path / "cache"))
    assert not list(
        (tmp_path / "cache" / "spoken_digits").glob("*/parameters.json")
    )  # no half-made set left


def test_a_named_pipe_posing_as_audio_is_skipped_without_hanging(tmp_path):
    import os

    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        soundfile.write(tmp_path / split / "a" / "good.wav", tone(440, 1.0, 8000), 8000)
    os.mkfifo(tmp_path / "train" / "a" / "pipe.wav")
    dataset = AudioFolder(str(tmp_path), "train")
    items = {p.name: dataset[i] for i, p in enumerate(dataset.paths)}
    assert items["pipe.wav"] is None and items["good.wav"] is not None


def write_lengths(folder, seconds: list[float], rate: int = 8000):
    folder.mkdir(parents=True, exist_ok=True)
    for i, length in enumerate(seconds):
        soundfile.write(folder / f"{i}.wav", tone(400 + 100 * i, length, rate), rate)


def test_duration_buckets_crop_each_recording_to_the_longest_bucket_it_fills(tmp_path):
    from selfflow.data.batching.buckets import BucketIndex

    for split in ("train", "test"):
        write_lengths(tmp_path / split / "a", [0.3, 0.6, 1.2, 2.5, 1.0])
    data = AudioFolder(str(tmp_path), "train", durations=[2.0, 0.5, 1.0])
    assert data.durations == [0.5, 1.0, 2.0]
    assert (
        AudioFolder(str(tmp_path), "test", durations=[2.0, 0.5, 1.0]).bucket_ids is None
    )  # the test split: 1 s
    by_name = {p.name: i for i, p in enumerate(data.paths)}
    assert {name: data.bucket_ids[i] for name, i in by_name.items()} == {
        "0.wav": 0,
        "1.wav": 0,
        "2.wav": 1,
        "3.wav": 2,
        "4.wav": 1,
    }  # 0.3 s: the shortest bucket, padded
    lengths = {name: data[BucketIndex(i)][0].shape[-1] for name, i in by_name.items()}
    assert lengths == {"0.wav": 4000, "1.wav": 4000, "2.wav": 8000, "3.wav": 16000, "4.wav": 8000}
    assert data[by_name["3.wav"]][0].shape == (1, 8000)  # a plain index: the fixed duration
    assert AudioFolder(str(tmp_path), "train").bucket_ids is None
    with pytest.raises(
        ValueError, match=r"data.dataset.durations=\[1.0, 1.0\] must be distinct positive"
    ):
        AudioFolder(str(tmp_path), "train", durations=[1.0, 1.0])


def test_training_with_duration_buckets_and_sampling_another_duration(tiny_train_cfg, tmp_path):
    from selfflow.sampling.modalities import tokenizer_at_length
    from selfflow.training.build import build_run

    for name in ("low", "high"):
        write_lengths(tmp_path / "data" / name, [0.6, 0.7, 1.1, 1.3, 1.6, 0.55])
    overrides = [
        "experiment=audio_digits",
        "data=audio_folder",
        f"data.root={tmp_path / 'data'}",
        "data.batch_size=2",
        "trainer.max_steps=4",
        "callbacks.samples.every_n_steps=0",
        "~callbacks.probe",
    ]
    run = build_run(tiny_train_cfg(*overrides, "data.dataset.durations=[0.5,1.0]"))
    lengths = []
    run.module.on_train_batch_start = lambda batch, i: lengths.append(batch["data"].shape[-1])
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 4 and set(lengths) <= {4000, 8000} and len(lengths) == 4
    assert set(run.datamodule.train_set.bucket_ids) == {
        0,
        1,
    }  # both lengths in the data; a batch holds one
    tokenizer = run.module.tokenizers["audio"]
    half = tokenizer_at_length(tokenizer, "audio", {"duration": 0.5})
    assert half.decode(torch.zeros(1, 32, 32)).shape == (1, 4000)
    with pytest.raises(ValueError, match=r"duration=0.3: an audio clip of 2400 samples"):
        tokenizer_at_length(tokenizer, "audio", {"duration": 0.3})
    with pytest.raises(ValueError, match=r"frames= is for video checkpoints"):
        tokenizer_at_length(tokenizer, "audio", {"frames": 16})
    bad = build_run(
        tiny_train_cfg(*overrides, "data.dataset.durations=[0.3]", run_dir=tmp_path / "bad")
    )
    with pytest.raises(
        ValueError, match=r"data.dataset.durations=\[0.3\]: an audio clip of 2400 samples"
    ):
        bad.trainer.fit(bad.module, datamodule=bad.datamodule)
