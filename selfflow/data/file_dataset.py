"""A dataset of labelled sample files whose unreadable files are skipped (or fatal) through a BadFilePolicy."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from selfflow.data.bad_files import BadFilePolicy, failure_reason, require_one_readable
from selfflow.data.files import LabelledFiles, check_readable_file, find_labelled_files


class LabelledFileDataset(Dataset):
    """Items `(load(path), label)`; an item whose file cannot be loaded is None (see `collate_samples`).

    Subclasses implement `load` and find their files through `find_files` (captioned datasets extend it);
    random crops draw from torch's generator, which Lightning seeds per worker.
    """

    find_files = staticmethod(find_labelled_files)

    def __init__(self, files: LabelledFiles, on_bad_file: str = "skip"):
        self.paths, self.labels, self.class_names = files.paths, files.labels, files.class_names
        self.bad_files = BadFilePolicy(on_bad_file)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, path: Path) -> Tensor:
        raise NotImplementedError

    def read(self, path: Path) -> Tensor:
        """`load`, after refusing what is not a non-empty regular file (a pipe would block the decoder forever)."""
        check_readable_file(path)
        return self.load(path)

    def check_readable(self) -> None:
        """Fail at start-up when no file of this split can be read (an empty split: the DataModule names it)."""
        require_one_readable(len(self.paths), lambda i: self.read(self.paths[i]), lambda i: self.paths[i],
                             self.bad_files, "files of this split", "check data.root and the file types")

    def __len__(self) -> int:
        return len(self.paths)

    def load_item(self, i: int) -> Tensor:
        """Sample i's data; datasets with buckets load a `BucketIndex` key at its bucket's size."""
        return self.read(self.paths[i])

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            data = self.load_item(i)
        except Exception as error:  # noqa: BLE001 - any decoder failure makes the file unusable
            self.bad_files.handle(path, failure_reason(error))
            return None
        return data, self.labels[i]
