"""Reading an offline wandb run's records (run-<id>.wandb: W&B's LevelDB-style log of protobuf
records), since wandb has no public reader for it any more: tests check what a run sent to wandb
from its own files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = (
    32768,
    7,
)  # LevelDB log blocks; the W&B file header and each record header are 7 bytes
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """The protobuf Records of a run file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    index, parts, records = HEADER, b"", []
    while index + HEADER <= len(data):
        if BLOCK - index % BLOCK < HEADER:  # the rest of a block is padding
            index += BLOCK - index % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[index : index + HEADER])
        chunk, index = data[index + HEADER : index + HEADER + length], index + HEADER + length
        if kind == 0 and length == 0:  # zero fill at the end of the file
            break
        parts = chunk if kind in (FULL, FIRST) else parts + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def wandb_run(run_dir: Path) -> dict:
    """What an offline run under `run_dir` logged: its name and group, its config {key: value} and
    its history rows [{key: value}] (media as their JSON descriptions)."""
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    run: dict = {"name": None, "group": None, "config": {}, "history": []}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["name"], run["group"] = record.run.display_name, record.run.run_group
            run["config"].update(
                {item.key: json.loads(item.value_json) for item in record.run.config.update}
            )
        elif kind == "config":
            run["config"].update(
                {item.key: json.loads(item.value_json) for item in record.config.update}
            )
        elif kind == "history":
            run["history"].append(
                {
                    item.key or ".".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return run
