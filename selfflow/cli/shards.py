"""selfflow-shards: write a folder as WebDataset tar shards with their indexes, or index
existing shards.

  selfflow-shards write /path/to/images /data/shards --modality image --max-shard-bytes 1G
  selfflow-shards index /data/shards   # every *.tar in the folder without a fresh index
  selfflow-shards index '/data/shards/train-{000000..000099}.tar' /data/more/test-000000.tar

`write` prints a JSON summary (samples, shards, bytes and skipped files per split); `index` prints
which indexes it wrote and why (missing, stale: the shard changed, unreadable). A run reads the
index beside each shard instead of scanning every tar header at start-up; shards in an object store
are read only through their indexes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from selfflow.cli.errors import fail, friendly_errors

BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """`500M`, `1G`, `1.5G` or a plain number of bytes."""
    text = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in BYTE_UNITS else ""
    try:
        value = float(text[:-1] if unit else text) * BYTE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 500M or 1G") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return int(value)


def shard_paths(items: list[str]) -> list[Path]:
    """Local shards named by folders (every *.tar directly in them), tar files and
    brace patterns."""
    from selfflow.data.shards.dataset import expand_braces

    shards: list[Path] = []
    for item in items:
        for name in expand_braces(item):
            path = Path(name).expanduser()
            if path.is_dir():
                found = sorted(p for p in path.glob("*.tar") if p.is_file())
                if not found:
                    raise FileNotFoundError(f"no *.tar shards in {path}")
                shards += found
            elif path.is_file():
                shards.append(path)
            else:
                raise FileNotFoundError(f"{path} is neither a folder of shards nor a shard")
    return shards


def write(args: argparse.Namespace) -> dict:
    from selfflow.data.shards.writer import write_shards

    return write_shards(
        args.source,
        args.out,
        args.modality,
        tuple(args.splits),
        args.test_fraction,
        args.seed,
        args.manifest,
        args.name_pattern,
        args.label_field,
        args.max_samples_per_shard,
        args.max_shard_bytes,
        args.overwrite,
        progress=not args.no_progress and sys.stderr.isatty(),
        max_pixels=args.max_pixels,
        max_member_bytes=args.max_member_bytes,
    )


def index(args: argparse.Namespace) -> dict:
    from selfflow.data.shards.index import refresh_index

    shards = shard_paths(args.shards)
    written = {
        str(shard): reason for shard in shards if (reason := refresh_index(shard)) is not None
    }
    return {"shards": len(shards), "fresh": len(shards) - len(written), "written": written}


def add_write_arguments(writer: argparse.ArgumentParser) -> None:
    """The arguments of `selfflow-shards write`."""
    from selfflow.data.shards.dataset import MAX_MEMBER_BYTES
    from selfflow.data.shards.writer import MODALITY_EXTENSIONS

    writer.add_argument(
        "source", help="folder of labelled files (as data.root of the folder dataset)"
    )
    writer.add_argument("out", help="folder for the shards, their indexes and classes.json")
    writer.add_argument("--modality", required=True, choices=list(MODALITY_EXTENSIONS))
    writer.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "test"])
    writer.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="held out for test when the folder has no train/ and test/ (as the folder dataset)",
    )
    writer.add_argument(
        "--seed", type=int, default=0, help="seed of that fixed split (as the folder dataset)"
    )
    writer.add_argument(
        "--manifest", help="CSV of path,label[,split] relative to the source folder"
    )
    writer.add_argument(
        "--name-pattern", help="labels from file names, e.g. '{digit}_{speaker}_{index}'"
    )
    writer.add_argument("--label-field", help="the field of --name-pattern that is the label")
    writer.add_argument("--max-samples-per-shard", type=int, default=10_000)
    writer.add_argument(
        "--max-shard-bytes", type=parse_bytes, default=parse_bytes("1G"), help="e.g. 500M, 1G"
    )
    writer.add_argument(
        "--max-pixels",
        type=int,
        help="largest image or video frame written, in pixels (default: "
        "the loaders' default, data.dataset.max_pixels / max_frame_pixels)",
    )
    writer.add_argument(
        "--max-member-bytes",
        type=parse_bytes,
        default=MAX_MEMBER_BYTES,
        help="largest file written (default: the loaders' data.dataset.max_member_bytes), e.g. 1G",
    )
    writer.add_argument(
        "--overwrite", action="store_true", help="replace existing shards of these splits"
    )
    writer.add_argument(
        "--no-progress", action="store_true", help="no progress bar (shown on a terminal)"
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="selfflow-shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True)
    writer = commands.add_parser(
        "write", help="a folder of labelled files as shards with their indexes"
    )
    add_write_arguments(writer)
    writer.set_defaults(run=write)
    indexer = commands.add_parser(
        "index", help="write the index of existing shards that lack a fresh one"
    )
    indexer.add_argument(
        "shards", nargs="+", help="folders (every *.tar in them), tar files or brace patterns"
    )
    indexer.set_defaults(run=index)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with friendly_errors("selfflow-shards"):
        try:
            summary = args.run(args)
        except FileExistsError as error:  # shards already there: one line, like the other mistakes
            fail("selfflow-shards", str(error))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
