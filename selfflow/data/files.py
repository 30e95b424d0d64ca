"""Finding labelled sample files on disk: class sub-folders, train/test sub-folders, fixed splits."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


SPLITS = ("train", "test")


def split_indices(n: int, split: str, test_fraction: float, seed: int) -> np.ndarray:
    """A fixed random train/test partition of range(n)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; choose one of {SPLITS}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(order[:n_test] if split == "test" else order[n_test:])


@dataclass
class LabelledFiles:
    paths: list[Path]
    labels: list[int]  # -1 where the folder has no class sub-folders
    class_names: list[str]


def _files_below(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    found = []
    for dirpath, _dirs, names in os.walk(folder, followlinks=False):
        found += [Path(dirpath) / n for n in names if n.lower().endswith(extensions)]
    return sorted(found)


def find_labelled_files(root: str | os.PathLike, split: str, extensions: tuple[str, ...],
                        test_fraction: float = 0.1, seed: int = 0) -> LabelledFiles:
    """Files of one split under `root`, labelled by class sub-folder names.

    `root/train` and `root/test` (or `root/val`) are used as the splits when present; otherwise a fixed random
    `test_fraction` of the files under root forms the test split. Files directly under a split folder, with no
    class sub-folders, are unlabelled (label -1).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root} is not a folder; point data.root at your dataset folder")
    split_dirs = {s: root / s for s in ("train", "test", "val") if (root / s).is_dir()}
    carve = "train" not in split_dirs
    base = root if carve else split_dirs["train"]
    class_names = sorted(d.name for d in base.iterdir() if d.is_dir() and _files_below(d, extensions))
    folder = root if carve else split_dirs.get(split) or split_dirs.get("val" if split == "test" else split)
    if folder is None:
        raise FileNotFoundError(f"{root} has a train/ folder but no {split}/ (or val/) folder for split={split!r}")
    paths = _files_below(folder, extensions)
    if not paths:
        raise FileNotFoundError(
            f"no files with extensions {list(extensions)} under {folder}; check data.root and the file types"
        )
    index = {name: i for i, name in enumerate(class_names)}
    labels = [index.get(p.relative_to(folder).parts[0], -1) if len(p.relative_to(folder).parts) > 1 else -1
              for p in paths]
    if carve:
        keep = split_indices(len(paths), split, test_fraction, seed)
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    return LabelledFiles(paths, labels, class_names)
