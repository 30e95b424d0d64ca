"""Captioned datasets: samples `(data, label, {"caption": str})` for text-conditioned training.

- `ClassCaptions` captions any labelled dataset from its class names through templates ("a handwritten {word}"),
  one template drawn per sample, so built-in sets need no caption files;
- `CaptionedDigits`: the built-in digits captioned that way ("a handwritten seven", "the digit 7", ...);
- `CaptionedImageFolder`: your images with a caption file next to each (`cat.png` + `cat.txt`), or a CSV/JSONL
  manifest with `path` and `caption` columns (optionally `label` and `split`).
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from selfflow.data.bad_files import BadFilePolicy
from selfflow.data.digits import DigitImages
from selfflow.data.files import split_indices
from selfflow.data.image_folder import IMAGE_EXTENSIONS, ImageFolder

log = logging.getLogger("selfflow.data")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten {word}", "the digit {word}", "a handwritten digit {digit}", "the number {word}",
                   "{word}", "a drawing of the number {digit}", "a {word} written by hand", "the handwritten digit {word}")
VIDEO_TEMPLATES = ("the digit {word} moving", "a handwritten {word} moving across the frame", "a moving {word}")
AUDIO_TEMPLATES = ("a voice saying {word}", "someone says {word}", "the spoken digit {word}")
CAPTION_FILE_SUFFIX = ".txt"


def class_words(name: str) -> dict[str, str]:
    """Template fields of a class name: {name}, and for digit names also {digit} ("7") and {word} ("seven")."""
    name = str(name)
    if name.isdigit() and int(name) < len(NUMBER_WORDS):
        return {"name": name, "digit": name, "word": NUMBER_WORDS[int(name)]}
    if name.lower() in NUMBER_WORDS:
        return {"name": name, "digit": str(NUMBER_WORDS.index(name.lower())), "word": name.lower()}
    return {"name": name, "digit": name, "word": name}


class ClassCaptions(Dataset):
    """Wraps a labelled dataset: each sample gets a caption from its class name and one of `templates`.

    Training draws the template at random (reproducibly under the data order's seeding); `fixed=True` uses
    template `index % len(templates)` (stable test captions).
    """

    has_captions = True

    def __init__(self, dataset: Dataset, templates: list[str] | tuple[str, ...], fixed: bool = False):
        if not templates:
            raise ValueError("caption templates are empty; give at least one, e.g. 'a handwritten {word}'")
        names = list(getattr(dataset, "class_names", []))
        if not names:
            raise ValueError(f"{type(dataset).__name__} has no class names to caption from; use a dataset with "
                             f"classes or caption files (CaptionedImageFolder)")
        for template in templates:
            try:
                template.format(**class_words(names[0]))
            except (KeyError, IndexError) as error:
                raise ValueError(f"caption template {template!r} uses an unknown field {error}; the fields are "
                                 f"{{name}}, {{digit}} and {{word}}") from error
        self.dataset, self.templates, self.fixed = dataset, tuple(templates), fixed
        self.class_names = names
        self.num_classes = len(names)

    def __getattr__(self, name: str):  # sizes, rates, bad-file policy... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def caption(self, label: int, index: int) -> str:
        choice = index % len(self.templates) if self.fixed else int(torch.randint(len(self.templates), ()))
        return self.templates[choice].format(**class_words(self.class_names[label]))

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if item is None:
            return None
        data, label, *extra = item  # extra: conditioning of the wrapped dataset, e.g. {"sizes": ...}
        return data, int(label), *extra, {"caption": self.caption(int(label), i)}


class CaptionedDigits(ClassCaptions):
    """The built-in digits (`DigitImages`) captioned from their class: "a handwritten seven", "the digit 7", ..."""

    def __init__(self, split: str = "train", image_size: int = 16, channels: int = 1,
                 templates: list[str] | tuple[str, ...] = DIGIT_TEMPLATES, test_fraction: float = 0.15, seed: int = 0):
        super().__init__(DigitImages(split, image_size, channels, test_fraction, seed), templates,
                         fixed=split != "train")


def read_caption_manifest(root: Path, manifest: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a CSV (header row) or JSONL (one object per line) manifest; each needs `path` and `caption`."""
    path = Path(manifest).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise FileNotFoundError(f"caption manifest {path} does not exist; point data.train.manifest at a CSV or "
                                f"JSONL file with path and caption columns")
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix.lower() in (".jsonl", ".json"):
            try:
                rows = [json.loads(line) for line in f if line.strip()]
            except json.JSONDecodeError as error:
                raise ValueError(f"caption manifest {path} is not valid JSONL (one object per line): {error}") from error
        else:
            rows = list(csv.DictReader(f))
    if not rows or not all(isinstance(r, dict) and {"path", "caption"} <= set(r) for r in rows):
        raise ValueError(f"caption manifest {path} needs path and caption in every row "
                         f"(optionally label and split: train/test/val)")
    return rows


class CaptionedImageFolder(ImageFolder):
    """Images under `root` with captions, as ([channels, S, S] in [0, 1], label, {"caption": str}).

    Captions come from a text file next to each image (same name, `.txt`), or from `manifest` (CSV/JSONL with
    path, caption and optionally label and split). Labels (class sub-folders or the manifest's label column) are
    optional (-1 without). Images without a caption are left out with one warning line.
    buckets / bucket_multiple: multi-aspect training as in `ImageFolder` (samples also carry `{"sizes": [6]}`).
    """

    has_captions = True

    def __init__(self, root: str, split: str = "train", image_size: int = 32, channels: int = 3,
                 manifest: str | None = None, test_fraction: float = 0.1, seed: int = 0, on_bad_file: str = "skip",
                 buckets=None, bucket_multiple: int = 1):
        if manifest is not None:
            if channels not in (1, 3):
                raise ValueError(f"channels={channels} must be 1 (grey) or 3 (RGB)")
            self.paths, self.labels, self.captions, self.class_names = self._from_manifest(
                Path(root).expanduser(), manifest, split, test_fraction, seed)
            self.image_size, self.channels, self.hflip = image_size, channels, False
            self.bad_files = BadFilePolicy(on_bad_file)
            self.use_buckets(buckets, bucket_multiple)
            return
        super().__init__(root, split=split, image_size=image_size, channels=channels, hflip=False,
                         test_fraction=test_fraction, seed=seed, on_bad_file=on_bad_file, buckets=buckets,
                         bucket_multiple=bucket_multiple)
        captioned = [i for i, p in enumerate(self.paths) if p.with_suffix(CAPTION_FILE_SUFFIX).is_file()]
        if not captioned:
            raise FileNotFoundError(
                f"no image under {root} ({split} split) has a caption file next to it; add e.g. "
                f"{self.paths[0].with_suffix(CAPTION_FILE_SUFFIX).name} beside {self.paths[0].name}, or set "
                f"data.train.manifest to a CSV/JSONL of path,caption")
        if len(captioned) < len(self.paths):
            log.warning("%d of %d images under %s have no caption file and are left out",
                        len(self.paths) - len(captioned), len(self.paths), root)
        self.paths = [self.paths[i] for i in captioned]
        self.labels = [self.labels[i] for i in captioned]
        self.captions = [p.with_suffix(CAPTION_FILE_SUFFIX).read_text(encoding="utf-8").strip() for p in self.paths]

    @staticmethod
    def _from_manifest(root: Path, manifest, split: str, test_fraction: float, seed: int):
        rows = read_caption_manifest(root, manifest)
        for row in rows:
            if not str(row["path"]).lower().endswith(IMAGE_EXTENSIONS):
                raise ValueError(f"caption manifest {manifest} lists {row['path']}, which is not an image "
                                 f"({list(IMAGE_EXTENSIONS)})")
        class_names = sorted({str(r["label"]) for r in rows if r.get("label") not in (None, "")})
        if rows and "split" in rows[0]:
            wanted = {split, "val"} if split == "test" else {split}
            rows = [r for r in rows if str(r["split"]).strip() in wanted]
            if not rows:
                raise ValueError(f"caption manifest {manifest} has no rows with split={split!r}")
        else:
            rows = [rows[i] for i in split_indices(len(rows), split, test_fraction, seed)]
        index = {name: i for i, name in enumerate(class_names)}
        paths = [Path(r["path"]) if Path(r["path"]).is_absolute() else root / r["path"] for r in rows]
        labels = [index.get(str(r.get("label", "")), -1) for r in rows]
        return paths, labels, [str(r["caption"]).strip() for r in rows], class_names

    def __getitem__(self, i: int):
        item = super().__getitem__(i)
        return None if item is None else (*item, {"caption": self.captions[i]})
