"""Finding labelled sample files on disk: class sub-folders, CSV manifests or file-name patterns;
fixed splits."""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("selfflow.data")

SPLITS = ("train", "test")


def split_indices(n: int, split: str, test_fraction: float, seed: int) -> np.ndarray:
    """A fixed random train/test partition of range(n)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; choose one of {SPLITS}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    return np.sort(order[:n_test] if split == "test" else order[n_test:])


@dataclass
class LabelledFiles:
    paths: list[Path]
    labels: list[int]  # -1 where the folder has no class sub-folders
    class_names: list[str]


def files_below(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """The files under `folder` whose names end in one of `extensions` (any case), sorted; links to
    folders are not followed."""
    found = []
    for dirpath, _dirs, names in os.walk(folder, followlinks=False):
        found += [Path(dirpath) / n for n in names if n.lower().endswith(extensions)]
    return sorted(found)


def name_pattern_regex(pattern: str) -> re.Pattern:
    """`{digit}_{speaker}_{index}` -> a regex with one named group per field, matched against a
    file's stem."""
    parts = re.split(r"\{(\w+)\}", pattern)
    fields = parts[1::2]
    if not fields or len(set(fields)) != len(fields):
        raise ValueError(
            f"name_pattern={pattern!r} needs distinct {{field}} names, e.g. "
            f"'{{digit}}_{{speaker}}_{{index}}'"
        )
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>.+?)" for i, part in enumerate(parts)
    )
    return re.compile(regex)


def _labels_from_names(
    paths: list[Path],
    class_paths: list[Path],
    name_pattern: str,
    label_field: str | None,
    source: Path,
) -> tuple[list[Path], list[str], list[str]]:
    """Keep the files whose stem matches the pattern; label names are the `label_field` part of
    the stem."""
    regex = name_pattern_regex(name_pattern)
    field = label_field or next(iter(regex.groupindex))
    if field not in regex.groupindex:
        raise ValueError(
            f"label_field={label_field!r} is not a field of name_pattern={name_pattern!r}; "
            f"choose one of {list(regex.groupindex)}"
        )

    def label(path: Path) -> str | None:
        match = regex.fullmatch(path.stem)
        return match[field] if match else None

    kept = [(p, label(p)) for p in paths if label(p) is not None]
    if not kept:
        raise FileNotFoundError(
            f"no file name under {source} matches name_pattern={name_pattern!r} "
            f"(e.g. {paths[0].name}); fix data.dataset.name_pattern"
        )
    if len(kept) < len(paths):
        log.warning(
            "%d files under %s do not match name_pattern=%r and are left out (e.g. %s)",
            len(paths) - len(kept),
            source,
            name_pattern,
            next(p for p in paths if label(p) is None).name,
        )
    class_names = sorted({name for name in map(label, class_paths) if name is not None})
    return [p for p, _ in kept], [name for _, name in kept], class_names


def read_manifest(
    root: Path, manifest: str | os.PathLike, split: str, extensions: tuple[str, ...]
) -> tuple[list[Path], list[str], list[str], bool]:
    """A CSV with columns `path,label` (and optionally `split`: train/test/val); paths relative
    to root.

    Returns the split's paths and label names, all class names, and whether the CSV named
    the splits.
    """
    path = Path(manifest).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise FileNotFoundError(
            f"manifest {path} does not exist; point data.dataset.manifest at a CSV of path,label"
        )
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise ValueError(
            f"manifest {path} needs a header row with the columns path,label (and optionally split)"
        )
    for row in rows:
        if not row["path"].lower().endswith(extensions):
            raise ValueError(
                f"manifest {path} lists {row['path']}, whose type is not supported; "
                f"use files ending in {list(extensions)}"
            )
    class_names = sorted({row["label"] for row in rows})
    has_splits = "split" in rows[0]
    if has_splits:
        wanted = {split, "val"} if split == "test" else {split}
        rows = [row for row in rows if row["split"].strip() in wanted]
        if not rows:
            raise ValueError(f"manifest {path} has no rows with split={split!r}")
    paths = [
        Path(row["path"]) if Path(row["path"]).is_absolute() else root / row["path"] for row in rows
    ]
    return paths, [row["label"] for row in rows], class_names, has_splits


def _files_in_folders(
    root: Path,
    split: str,
    extensions: tuple[str, ...],
    name_pattern: str | None,
    label_field: str | None,
) -> tuple[list[Path], list[str | None], list[str], bool]:
    """Files of one split from split and class folders (or names through `name_pattern`): paths,
    their class names, the class names, and whether the split is still to be carved out."""
    split_dirs = {s: root / s for s in ("train", "test", "val") if (root / s).is_dir()}
    carve = "train" not in split_dirs
    base = root if carve else split_dirs["train"]
    folder = (
        root
        if carve
        else split_dirs.get(split) or split_dirs.get("val" if split == "test" else split)
    )
    if folder is None:
        raise FileNotFoundError(
            f"{root} has a train/ folder but no {split}/ (or val/) folder for split={split!r}"
        )
    paths = files_below(folder, extensions)
    if not paths:
        raise FileNotFoundError(
            f"no files with extensions {list(extensions)} under {folder}; check "
            f"data.root and the file types"
        )
    if name_pattern:
        class_paths = paths if base == folder else files_below(base, extensions)
        paths, names, class_names = _labels_from_names(
            paths, class_paths, name_pattern, label_field, folder
        )
        return paths, names, class_names, carve
    class_names = sorted(
        d.name for d in base.iterdir() if d.is_dir() and files_below(d, extensions)
    )
    names = [
        p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else None
        for p in paths
    ]
    return paths, names, class_names, carve


def find_labelled_files(
    root: str | os.PathLike,
    split: str,
    extensions: tuple[str, ...],
    test_fraction: float = 0.1,
    seed: int = 0,
    manifest: str | os.PathLike | None = None,
    name_pattern: str | None = None,
    label_field: str | None = None,
) -> LabelledFiles:
    """Files of one split under `root` with their labels.

    Labels come from class sub-folder names by default; from a CSV `manifest` of path,label[,split];
    or from the file name through `name_pattern` (e.g. `{digit}_{speaker}_{index}`), using its field
    `label_field`. `root/train` and `root/test` (or `root/val`) are used as the splits when present
    (or the manifest's split column); otherwise a fixed random `test_fraction` of the files forms
    the test split. Files directly under a split folder, with no class sub-folders and no name
    pattern, are unlabelled (label -1).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.root={root} is not a folder; point data.root at your dataset folder"
        )
    if manifest is not None:
        paths, names, class_names, has_splits = read_manifest(root, manifest, split, extensions)
        carve = not has_splits
    else:
        paths, names, class_names, carve = _files_in_folders(
            root, split, extensions, name_pattern, label_field
        )
    index = {name: i for i, name in enumerate(class_names)}
    labels = [index.get(name, -1) for name in names]
    if carve:
        keep = split_indices(len(paths), split, test_fraction, seed)
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    return LabelledFiles(paths, labels, class_names)
