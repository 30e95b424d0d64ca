"""Captioned datasets: samples `(data, label, {"caption": str})` for text-conditioned training.

- `ClassCaptions` captions any labelled dataset from its class names (and, with `name_pattern`, the
  other fields of each file's name) through templates ("a handwritten {word}"), one template drawn
  per sample, so built-in sets need no caption files;
- the built-in sets captioned that way: `CaptionedDigits` ("a handwritten seven"),
  `CaptionedMovingDigits` ("the digit three moving left"), `CaptionedSpokenDigits` ("a woman
  saying five");
- `CaptionedImageFolder`, `CaptionedVideoFolder`, `CaptionedAudioFolder`: your files with a caption
  file next to each (`cat.png` + `cat.txt`), or a CSV/JSONL manifest with `path` and `caption`
  columns (optionally `label` and `split`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from selfflow.data.folders.audio_folder import AudioFolder
from selfflow.data.folders.files import LabelledFiles, name_pattern_regex, split_indices
from selfflow.data.folders.image_folder import ImageFolder
from selfflow.data.folders.video_folder import VideoFolder
from selfflow.io.images import MAX_PIXELS

log = logging.getLogger("selfflow.data")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_FILE_SUFFIX = ".txt"


def class_words(name: str) -> dict[str, str]:
    """Template fields of a class name: {name}, and for digit names also {digit} ("7") and
    {word} ("seven")."""
    name = str(name)
    if name.isdigit() and int(name) < len(NUMBER_WORDS):
        return {"name": name, "digit": name, "word": NUMBER_WORDS[int(name)]}
    if name.lower() in NUMBER_WORDS:
        return {"name": name, "digit": str(NUMBER_WORDS.index(name.lower())), "word": name.lower()}
    return {"name": name, "digit": name, "word": name}


def name_fields(path: Path, regex) -> dict[str, str]:
    """The fields of a file name under a name pattern, in words: "up-left" -> "up and to the left",
    a voice "en-f2" also as {speaker} "a woman" (m: "a man")."""
    match = regex.fullmatch(Path(path).stem)
    fields = dict(match.groupdict()) if match else {}
    if "digit" in fields:  # {word} follows the file's digit even when the labels are another field
        fields.update(
            digit=class_words(fields["digit"])["digit"], word=class_words(fields["digit"])["word"]
        )
    if "direction" in fields:
        vertical, _, horizontal = fields["direction"].partition("-")
        fields["direction"] = (
            f"{vertical} and to the {horizontal}" if horizontal else fields["direction"]
        )
    if "voice" in fields:
        kind = fields["voice"].split("-")[-1][:1]
        fields["speaker"] = {"m": "a man", "f": "a woman"}.get(kind, "someone")
    return fields


class ClassCaptions(Dataset):
    """Wraps a labelled dataset: each sample gets a caption from its class name and one
    of `templates`.

    Template fields: {name}, {digit}, {word} of the class (`class_words`), and with `name_pattern`
    (e.g. `{digit}_{direction}_{index}`) the fields of each file's name too (`name_fields`).
    Training draws the template at random (reproducibly under the data order's seeding);
    `fixed=True` uses template `index % len(templates)` (stable test captions).
    """

    has_captions = True

    def __init__(
        self,
        dataset: Dataset,
        templates: list[str] | tuple[str, ...],
        fixed: bool = False,
        name_pattern: str | None = None,
    ):
        if not templates:
            raise ValueError(
                "caption templates are empty; give at least one, e.g. 'a handwritten {word}'"
            )
        names = list(getattr(dataset, "class_names", []))
        if not names:
            raise ValueError(
                f"{type(dataset).__name__} has no class names to caption from; use a dataset with "
                f"classes or caption files (CaptionedImageFolder)"
            )
        self.dataset, self.templates, self.fixed = dataset, tuple(templates), fixed
        self.name_regex = None if name_pattern is None else name_pattern_regex(name_pattern)
        self.class_names = names
        self.num_classes = len(names)
        example = self.fields(int(dataset.labels[0]) if hasattr(dataset, "labels") else 0, 0)
        for template in templates:
            try:
                template.format(**example)
            except (KeyError, IndexError) as error:
                raise ValueError(
                    f"caption template {template!r} uses an unknown field {error}; the fields are "
                    f"{', '.join('{' + f + '}' for f in example)}"
                ) from error

    def __getattr__(self, name: str):  # sizes, rates, bad-file policy... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def fields(self, label: int, index: int) -> dict[str, str]:
        """The template fields of sample `index` (class `label`)."""
        fields = class_words(self.class_names[label])
        if self.name_regex is not None:
            fields.update(name_fields(self.dataset.paths[index], self.name_regex))
        return fields

    def caption(self, label: int, index: int) -> str:
        choice = (
            index % len(self.templates)
            if self.fixed
            else int(torch.randint(len(self.templates), ()))
        )
        return self.templates[choice].format(**self.fields(label, index))

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if item is None:
            return None
        data, label, *extra = (
            item  # extra: conditioning of the wrapped dataset, e.g. {"sizes": ...}
        )
        return data, int(label), *extra, {"caption": self.caption(int(label), i)}


def read_caption_manifest(root: Path, manifest: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a CSV (header row) or JSONL (one object per line) manifest; each needs `path`
    and `caption`."""
    path = Path(manifest).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise FileNotFoundError(
            f"caption manifest {path} does not exist; point data.dataset.manifest at a CSV or "
            f"JSONL file with path and caption columns"
        )
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix.lower() in (".jsonl", ".json"):
            try:
                rows = [json.loads(line) for line in f if line.strip()]
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"caption manifest {path} is not valid JSONL (one object per line): {error}"
                ) from error
        else:
            rows = list(csv.DictReader(f))
    if not rows or not all(isinstance(r, dict) and {"path", "caption"} <= set(r) for r in rows):
        raise ValueError(
            f"caption manifest {path} needs path and caption in every row (optionally label "
            f"and split: train/test/val)"
        )
    return rows


def files_from_caption_manifest(
    root: Path,
    manifest: str | os.PathLike,
    split: str,
    extensions: tuple[str, ...],
    test_fraction: float,
    seed: int,
) -> tuple[LabelledFiles, list[str]]:
    """One split's files, labels (the optional label column; -1 without) and captions from a caption
    manifest; its split column picks the split, or a fixed random `test_fraction` is held out."""
    rows = read_caption_manifest(root, manifest)
    for row in rows:
        if not str(row["path"]).lower().endswith(extensions):
            raise ValueError(
                f"caption manifest {manifest} lists {row['path']}, whose type is not supported "
                f"here; use files ending in {list(extensions)}"
            )
    class_names = sorted({str(r["label"]) for r in rows if r.get("label") not in (None, "")})
    if "split" in rows[0]:
        wanted = {split, "val"} if split == "test" else {split}
        rows = [r for r in rows if str(r["split"]).strip() in wanted]
        if not rows:
            raise ValueError(f"caption manifest {manifest} has no rows with split={split!r}")
    else:
        rows = [rows[i] for i in split_indices(len(rows), split, test_fraction, seed)]
    index = {name: i for i, name in enumerate(class_names)}
    paths = [Path(r["path"]) if Path(r["path"]).is_absolute() else root / r["path"] for r in rows]
    labels = [index.get(str(r.get("label", "")), -1) for r in rows]
    return LabelledFiles(paths, labels, class_names), [str(r["caption"]).strip() for r in rows]


def keep_captioned(files: LabelledFiles, root: str) -> tuple[LabelledFiles, list[str]]:
    """The files that have a caption file next to them (same name, `.txt`), and those captions."""
    captioned = [
        i for i, p in enumerate(files.paths) if p.with_suffix(CAPTION_FILE_SUFFIX).is_file()
    ]
    if not captioned:
        example = files.paths[0]
        raise FileNotFoundError(
            f"no file under {root} (this split) has a caption file next to it; add e.g. "
            f"{example.with_suffix(CAPTION_FILE_SUFFIX).name} beside {example.name}, or set "
            f"data.dataset.manifest to a CSV/JSONL of path,caption"
        )
    if len(captioned) < len(files.paths):
        log.warning(
            "%d of %d files under %s have no caption file and are left out",
            len(files.paths) - len(captioned),
            len(files.paths),
            root,
        )
    paths = [files.paths[i] for i in captioned]
    captions = [
        p.with_suffix(CAPTION_FILE_SUFFIX).read_text(encoding="utf-8").strip() for p in paths
    ]
    return LabelledFiles(paths, [files.labels[i] for i in captioned], files.class_names), captions


class CaptionFiles:
    """Mixin for a folder dataset (image, video, audio): its files come with captions, from a `.txt`
    next to each file or from `caption_manifest`, and every item gains `{"caption": str}`. Files
    without a caption are left out with one warning line."""

    has_captions = True
    caption_manifest: str | None = None

    def __init__(self, root: str, split: str = "train", manifest: str | None = None, **options):
        self.caption_manifest = manifest  # read by find_files, which the folder's __init__ calls
        super().__init__(root, split, **options)

    def find_files(
        self,
        root,
        split,
        extensions,
        test_fraction=0.1,
        seed=0,
        manifest=None,
        name_pattern=None,
        label_field=None,
    ) -> LabelledFiles:
        if self.caption_manifest is not None:
            files, self.captions = files_from_caption_manifest(
                Path(root).expanduser(),
                self.caption_manifest,
                split,
                extensions,
                test_fraction,
                seed,
            )
        else:
            files = super().find_files(
                root, split, extensions, test_fraction, seed, manifest, name_pattern, label_field
            )
            files, self.captions = keep_captioned(files, root)
        return files

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return None if item is None else (*item, {"caption": self.captions[i]})


class CaptionedImageFolder(CaptionFiles, ImageFolder):
    """Images under `root` with captions, as ([channels, S, S] in [0, 1], label, {"caption": str}).

    Captions come from a text file next to each image (same name, `.txt`), or from `manifest`
    (CSV/JSONL with path, caption and optionally label and split). Labels (class sub-folders or the
    manifest's label column) are optional (-1 without). buckets / bucket_multiple: multi-aspect
    training as in `ImageFolder` (samples also carry `{"sizes": [6]}`).
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        image_size: int = 32,
        channels: int = 3,
        manifest: str | None = None,
        test_fraction: float = 0.1,
        seed: int = 0,
        on_bad_file: str = "skip",
        buckets=None,
        bucket_multiple: int = 1,
        max_pixels: int = MAX_PIXELS,
    ):
        super().__init__(
            root,
            split,
            manifest,
            image_size=image_size,
            channels=channels,
            hflip=False,
            test_fraction=test_fraction,
            seed=seed,
            on_bad_file=on_bad_file,
            buckets=buckets,
            bucket_multiple=bucket_multiple,
            max_pixels=max_pixels,
        )


class CaptionedVideoFolder(CaptionFiles, VideoFolder):
    """Videos under `root` with captions, as ([T, C, S, S], label, {"caption": str}); the clip
    options are `VideoFolder`'s. `manifest`: a CSV/JSONL of path, caption (optionally label, split)
    instead of `.txt` files; without it, labels come from class sub-folders or `name_pattern` +
    `label_field` (optional, -1 without)."""


class CaptionedAudioFolder(CaptionFiles, AudioFolder):
    """Recordings under `root` with captions, as ([1, S], label, {"caption": str}); the clip options
    are `AudioFolder`'s. `manifest`: a CSV/JSONL of path, caption (optionally label, split) instead
    of `.txt` files; without it, labels come from class sub-folders or `name_pattern` +
    `label_field` (optional, -1 without)."""
