"""The built-in sets captioned from their classes and file names (text-conditioned runs with
no download): "a handwritten seven", "the digit 7 moving left", "a voice saying four"."""

from __future__ import annotations

from selfflow.data.builtin import moving_digits, spoken_digits
from selfflow.data.builtin.digits import DigitImages
from selfflow.data.folders.captions import ClassCaptions

DIGIT_TEMPLATES = (
    "a handwritten {word}",
    "the digit {word}",
    "a handwritten digit {digit}",
    "the number {word}",
    "{word}",
    "a drawing of the number {digit}",
    "a {word} written by hand",
    "the handwritten digit {word}",
)


VIDEO_TEMPLATES = (
    "the digit {word} moving {direction}",
    "a handwritten {word} moving {direction}",
    "a {word} sliding {direction}",
    "the number {digit} moving {direction}",
)


AUDIO_TEMPLATES = (
    "a voice saying {word}",
    "{speaker} saying {word}",
    "someone says {word}",
    "the spoken digit {word}",
    "{speaker} says the number {word}",
)


class CaptionedDigits(ClassCaptions):
    """The built-in digits (`DigitImages`) captioned from their class: "a handwritten seven", "the
    digit 7", ..."""

    def __init__(
        self,
        split: str = "train",
        image_size: int = 16,
        channels: int = 1,
        templates: list[str] | tuple[str, ...] = DIGIT_TEMPLATES,
        test_fraction: float = 0.15,
        seed: int = 0,
    ):
        super().__init__(
            DigitImages(split, image_size, channels, test_fraction, seed),
            templates,
            fixed=split != "train",
        )


class CaptionedMovingDigits(ClassCaptions):
    """The built-in moving digits (`MovingDigits`, any of its options) captioned from the digit and
    its direction in the file name: "the digit three moving left", "a handwritten seven moving up
    and to the right", ..."""

    def __init__(
        self,
        split: str = "train",
        templates: list[str] | tuple[str, ...] = VIDEO_TEMPLATES,
        **options,
    ):
        super().__init__(
            moving_digits.MovingDigits(split, **options),
            templates,
            fixed=split != "train",
            name_pattern=moving_digits.NAME_PATTERN,
        )


class CaptionedSpokenDigits(ClassCaptions):
    """The built-in spoken digits (`SpokenDigits`, any of its options) captioned from the word and
    the voice: "a voice saying five", "a woman saying five", ..."""

    def __init__(
        self,
        split: str = "train",
        templates: list[str] | tuple[str, ...] = AUDIO_TEMPLATES,
        **options,
    ):
        super().__init__(
            spoken_digits.SpokenDigits(split, **options),
            templates,
            fixed=split != "train",
            name_pattern=spoken_digits.NAME_PATTERN,
        )
