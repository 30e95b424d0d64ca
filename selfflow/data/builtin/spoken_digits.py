"""Built-in audio data: the words "zero" to "nine" spoken by espeak-ng in several voices, speeds and
pitches, synthesised once into a cache folder as WAV files at the configured rate and read back
through AudioFolder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torchaudio

from selfflow.data.folders.audio_folder import AudioFolder
from selfflow.io.audio import write_wav
from selfflow.io.cache_folders import cached_folder

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("en+m1", "en+m3", "en+m7", "en+f1", "en+f3", "en+f4", "en-us+m2", "en-us+f2")
LABELS = ("digit", "voice")
PLACEMENTS = ("centre", "random")
NAME_PATTERN = "{digit}_{voice}_{index}"


def voice_name(voice: str) -> str:
    """A file-name-safe voice name (no '_', which separates the name's fields): en+m1 -> en-m1."""
    return voice.replace("+", "-").replace("_", "-")


def synthesise_spoken_digits(
    folder: Path, voices: list[str], takes: int, test_takes: int, sample_rate: int, seed: int
) -> None:
    """`takes` utterances per (digit, voice) at random speed and pitch, written at `sample_rate`
    (resampled in one batch: torchaudio resamples a batch far faster than clip by clip); the last
    `test_takes` go to test/."""
    from selfflow.data.builtin.speech_synth import Espeak

    engine = Espeak.get()
    rng = np.random.default_rng(seed)
    names, utterances = [], []
    for voice in voices:
        for digit, word in enumerate(WORDS):
            for take in range(takes):
                rate, pitch = int(rng.integers(120, 221)), int(rng.integers(25, 76))
                utterances.append(
                    torch.from_numpy(engine.say(word, voice, rate=rate, pitch=pitch) / 32768.0)
                )
                split = "test" if take >= takes - test_takes else "train"
                names.append(f"{split}/{digit}_{voice_name(voice)}_{take:03d}.wav")
    lengths = [math.ceil(len(u) * sample_rate / engine.sample_rate) for u in utterances]
    batch = torch.nn.utils.rnn.pad_sequence(utterances, batch_first=True).float()  # [N, longest]
    batch = torchaudio.functional.resample(batch, engine.sample_rate, sample_rate)
    for name, wave, length in zip(names, batch, lengths):
        write_wav(wave[:length], folder / name, sample_rate)


class SpokenDigits(AudioFolder):
    """Spoken digits [1, S] at `sample_rate` labelled by `label`: `digit` (10 classes) or `voice`
    (one per voice).

    Made on first use (well under a second per thousand words) into
    `<cache_dir>/spoken_digits/<parameters hash>`; needs the espeakng-loader package only then.

    placement: where a word shorter than the clip sits in it, in every split: `centre` (each clip
    holds the whole word with silence at both edges, so a generator learns one word per clip) or
    `random` (training clips at a random offset, a word may touch an edge). A word longer than the
    clip is cropped either way.
    """

    def __init__(
        self,
        split: str = "train",
        label: str = "digit",
        sample_rate: int = 8000,
        duration: float = 1.0,
        voices: list[str] | tuple[str, ...] = VOICES,
        takes: int = 12,
        test_takes: int = 2,
        seed: int = 0,
        cache_dir: str | None = None,
        on_bad_file: str = "skip",
        placement: str = "centre",
    ):
        if label not in LABELS:
            raise ValueError(f"data.dataset.label={label!r} is unknown; choose one of {LABELS}")
        if not 0 < test_takes < takes:
            raise ValueError(
                f"data.dataset.test_takes={test_takes} must be between 1 "
                f"and takes - 1 = {takes - 1}"
            )
        if placement not in PLACEMENTS:
            raise ValueError(
                f"data.dataset.placement={placement!r} is unknown; choose one of {PLACEMENTS}"
            )
        voices = list(voices)
        parameters = {
            "version": 1,
            "voices": voices,
            "takes": takes,
            "test_takes": test_takes,
            "sample_rate": sample_rate,
            "seed": seed,
        }
        root = cached_folder(
            "spoken_digits",
            parameters,
            lambda folder: synthesise_spoken_digits(
                folder, voices, takes, test_takes, sample_rate, seed
            ),
            cache_dir,
        )
        super().__init__(
            str(root),
            split,
            sample_rate=sample_rate,
            duration=duration,
            on_bad_file=on_bad_file,
            name_pattern=NAME_PATTERN,
            label_field=label,
        )
        self.random_crop = self.random_crop and placement == "random"
