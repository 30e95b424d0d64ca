"""A dataset of labelled sample files whose unreadable files are skipped (or fatal) through
a BadFilePolicy."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from selfflow.data.batching.buckets import BucketIndex, length_bucket
from selfflow.data.folders.files import LabelledFiles, find_labelled_files
from selfflow.io.bad_files import BadFilePolicy, failure_reason, require_one_readable
from selfflow.io.paths import check_readable_file


class LabelledFileDataset(Dataset):
    """Items `(load(path), label)`; an item whose file cannot be loaded is None (see
    `collate_samples`).

    Subclasses implement `load` and find their files through `find_files` (captioned datasets extend
    it); random crops draw from torch's generator, which Lightning seeds per worker.
    """

    find_files = staticmethod(find_labelled_files)

    # length buckets (audio durations, video frame counts): subclasses name the attribute holding
    # the sorted bucket lengths (None = off) and implement `header_length` and `load_at_length`
    length_bucket_key: str | None = None
    _bucket_ids: list[int] | None = None

    def __init__(self, files: LabelledFiles, on_bad_file: str = "skip"):
        self.paths, self.labels, self.class_names = files.paths, files.labels, files.class_names
        self.bad_files = BadFilePolicy(on_bad_file)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, path: Path) -> Tensor:
        raise NotImplementedError

    def read(self, path: Path) -> Tensor:
        """`load`, after refusing what is not a non-empty regular file (a pipe would block the
        decoder forever)."""
        check_readable_file(path)
        return self.load(path)

    def check_readable(self) -> None:
        """Fail at start-up when no file of this split can be read (an empty split: the DataModule
        names it)."""
        require_one_readable(
            len(self.paths),
            lambda i: self.read(self.paths[i]),
            lambda i: self.paths[i],
            self.bad_files,
            "files of this split",
            "check data.root and the file types",
        )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def bucket_lengths(self) -> list[float] | None:
        return getattr(self, self.length_bucket_key) if self.length_bucket_key else None

    def header_length(self, path: Path) -> float:
        """The length a file offers, in bucket units, from its header (0 where unknown)."""
        raise NotImplementedError

    def load_at_length(self, path: Path, length: float) -> Tensor:
        """The file's sample cropped (or padded) to `length` bucket units."""
        raise NotImplementedError

    @property
    def bucket_ids(self) -> list[int] | None:
        """Each file's length bucket (None without buckets): the longest it fills, from the headers
        read once on first use; shorter files go to the shortest bucket."""
        lengths = self.bucket_lengths
        if lengths is None:
            return None
        if self._bucket_ids is None:
            self._bucket_ids = [
                length_bucket(lengths, self.header_length(path)) for path in self.paths
            ]
        return self._bucket_ids

    def load_item(self, i: int) -> Tensor:
        """Sample i's data; with length buckets a `BucketIndex` key loads at its bucket's length."""
        path = self.paths[i]
        lengths = self.bucket_lengths
        if lengths is None or not isinstance(i, BucketIndex):
            return self.read(path)
        check_readable_file(path)
        return self.load_at_length(path, lengths[self.bucket_ids[i]])

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            data = self.load_item(i)
        except Exception as error:
            self.bad_files.handle(path, failure_reason(error))
            return None
        return data, self.labels[i]
