"""Files from others, second round (docs/reliability.md): no write through a link planted in a
shared folder, no read that leaves the folder the user pointed at, no foreign or broken part
accepted, no network request without a deadline, and a run folder that belongs to one run. Each test
builds the hostile folder and checks that nothing outside it changed."""

import io
import json
import math
import multiprocessing
import os
import socket
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from selfflow.io.safe_files import (
    UnsafeFileError,
    open_no_follow,
    resolve_inside,
    write_json_atomically,
)
from tests.helpers.files import png_bytes, write_tar

VICTIM = b"the user's own file\n"


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "elsewhere" / "victim.txt"
    path.parent.mkdir()
    path.write_bytes(VICTIM)
    return path


def plant_links(folder: Path, name: str, victim: Path) -> None:
    """Links to `victim` under `name` and every temporary name selfflow used to write it through."""
    folder.mkdir(parents=True, exist_ok=True)
    for planted in (name, f".{name}.{os.getpid()}.tmp", f"{name}.{os.getpid()}.tmp"):
        (folder / planted).symlink_to(victim)


def write_checkpoint(path: Path) -> None:
    from selfflow.training.checkpoint_io import atomic_save

    atomic_save({"global_step": 1}, path)


def write_shard_index(path: Path) -> None:
    from selfflow.data.shards.index import write_atomically

    write_atomically(path, b"{}\n")


def write_cache_json(path: Path) -> None:
    from selfflow.data.shards.latent_cache import write_json

    write_json(path, {"format": 1})


def write_samples_npz(path: Path) -> None:
    from selfflow.sampling.writers import write_npz_streamed

    blocks = [np.zeros((2, 4, 4, 3), np.uint8)]
    labels = {"labels": np.zeros(2, np.int64)}
    write_npz_streamed(path, blocks, (2, 4, 4, 3), np.dtype(np.uint8), labels)


def write_png(path: Path) -> None:
    from selfflow.sampling.writers import save_image_grid

    save_image_grid(torch.rand(2, 3, 4, 4), path)


def write_wav_file(path: Path) -> None:
    from selfflow.io.audio import write_wav

    write_wav(np.zeros(800, np.float32), path, 8000)


def write_export(path: Path) -> None:
    from selfflow.interop.export import replace_file

    replace_file(path, lambda file: file.write(b"weights"))


def write_chunk(path: Path) -> None:
    from selfflow.sampling.chunks import ChunkStore

    store = ChunkStore(path.parent.parent, 2, 2)
    store.write(0, torch.zeros(2, dtype=torch.long), np.zeros((2, 3, 4, 4), np.uint8))


WRITERS = {
    "checkpoint": ("checkpoints/last.ckpt", write_checkpoint),
    "shard index": ("train-000000.tar.index.json", write_shard_index),
    "latent-cache manifest": ("manifest.json", write_cache_json),
    "samples.npz": ("samples.npz", write_samples_npz),
    "sample picture": ("samples/grid.png", write_png),
    "sample sound": ("audio/000000.wav", write_wav_file),
    "export": ("export/model.safetensors", write_export),
    "sampling chunk": ("parts/chunk_000000.npz", write_chunk),
    "metrics": ("metrics.json", lambda path: write_json_atomically(path, {"fid": 1.5})),
}


@pytest.mark.parametrize("what", sorted(WRITERS))
def test_a_write_into_a_shared_folder_replaces_planted_links_never_writing_through(
    what,
    tmp_path,
    victim,
):
    name, write = WRITERS[what]
    path = tmp_path / "shared" / name
    plant_links(path.parent, path.name, victim)
    write(path)
    assert victim.read_bytes() == VICTIM
    assert path.is_file() and not path.is_symlink() and path.stat().st_size > 0
    left = [p for p in path.parent.glob(f".{path.name}.*.tmp") if not p.is_symlink()]
    assert not left  # no temporary file of the write is left


def test_the_run_folder_lock_refuses_a_planted_link_or_hard_link_with_one_line(tmp_path, victim):
    from selfflow.training.run_folder import RunFolderError, lock_run_folder

    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".lock").symlink_to(victim)
    planted = r"cannot lock run folder .*\.lock is a symbolic link"
    with pytest.raises(RunFolderError, match=planted) as refused:
        lock_run_folder(linked)
    assert "\n" not in str(refused.value)
    hard = tmp_path / "hard"
    hard.mkdir()
    os.link(victim, hard / ".lock")
    with pytest.raises(RunFolderError, match=r"\.lock is a file with another name too"):
        lock_run_folder(hard)
    assert victim.read_bytes() == VICTIM


def test_a_run_folder_with_a_planted_link_to_a_file_is_refused_before_any_write(tmp_path, victim):
    from selfflow.training.run_folder import RunFolderError, lock_run_folder, release_run_folder

    run_dir = tmp_path / "shared-run"
    (run_dir / "elsewhere-disk").mkdir(parents=True)
    (run_dir / "checkpoints").symlink_to(run_dir / "elsewhere-disk")  # a folder elsewhere: kept
    assert lock_run_folder(run_dir)
    release_run_folder(run_dir)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").symlink_to(victim)  # Hydra and Lightning write by name
    planted = r"holds a symbolic link .*config\.yaml to a file"
    with pytest.raises(RunFolderError, match=planted) as refused:
        lock_run_folder(run_dir)
    assert "\n" not in str(refused.value) and victim.read_bytes() == VICTIM


def test_skipped_files_tsv_is_never_written_through_a_planted_link(tmp_path, victim):
    from selfflow.io.bad_files import BadFilePolicy

    (tmp_path / "skipped_files.tsv").symlink_to(victim)
    policy = BadFilePolicy("skip", tmp_path / "skipped_files.tsv")
    with pytest.raises(UnsafeFileError, match=r"skipped_files\.tsv is a symbolic link"):
        policy.handle(tmp_path / "bad.png", "broken")
    assert victim.read_bytes() == VICTIM


def _handle_all(policy, paths) -> None:
    for path in paths:
        policy.handle(path, "cannot decode")


def test_skipped_files_tsv_lists_a_bad_file_once_whatever_the_number_of_worker_processes(tmp_path):
    from selfflow.io.bad_files import BadFilePolicy

    policy = BadFilePolicy("skip", tmp_path / "skipped_files.tsv")
    paths = [str(tmp_path / f"bad{k}.png") for k in range(5)]
    context = multiprocessing.get_context("fork")  # as DataLoader workers: a policy copy each
    orders = [paths[k:] + paths[:k] for k in range(3)]
    workers = [context.Process(target=_handle_all, args=(policy, order)) for order in orders]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    rows = (tmp_path / "skipped_files.tsv").read_text().splitlines()
    assert sorted(row.split("\t")[0] for row in rows) == paths


def test_open_no_follow_accepts_a_regular_file_and_refuses_a_folder(tmp_path):
    fd = open_no_follow(tmp_path / "record", os.O_RDWR | os.O_CREAT)
    os.close(fd)
    with pytest.raises(OSError):
        open_no_follow(tmp_path, os.O_RDONLY)


# --- reads that leave the folder ------------------------------------------------------------------


def test_a_member_resolves_inside_its_folder_or_is_refused_naming_it(tmp_path, victim):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "inside.tar").write_bytes(b"x")
    (folder / "also-inside.tar").symlink_to(folder / "inside.tar")
    (folder / "outside.tar").symlink_to(victim)
    assert resolve_inside(folder, "also-inside.tar") == (folder / "inside.tar").resolve()
    for member in ("outside.tar", "../elsewhere/victim.txt"):
        outside = rf"{member.split('/')[-1]} resolves to .*, outside"
        with pytest.raises(UnsafeFileError, match=outside) as refused:
            resolve_inside(folder, member)
        assert "\n" not in str(refused.value)


def test_a_shard_that_links_to_a_file_outside_its_folder_is_refused(tmp_path):
    from selfflow.data.shards.dataset import ImageShards

    sample = {"000000.png": png_bytes(10), "000000.cls": b"0"}
    elsewhere = write_tar(tmp_path / "elsewhere" / "data.tar", sample)
    folder = tmp_path / "shards"
    write_tar(folder / "train-000000.tar", {"000000.png": png_bytes(20), "000000.cls": b"0"})
    assert len(ImageShards(str(folder), image_size=4)) == 1
    (folder / "train-000001.tar").symlink_to(elsewhere)
    outside = r"train-000001\.tar resolves to .*data\.tar, outside"
    with pytest.raises(UnsafeFileError, match=outside):
        ImageShards(str(folder), image_size=4)


# --- parts bound to their job ---------------------------------------------------------------------


def sampling_store(out_dir: Path, settings: dict):
    from selfflow.sampling.chunks import ChunkStore

    store = ChunkStore(out_dir, 4, 2)
    store.check_settings(settings)
    return store


def test_a_chunk_planted_in_a_killed_jobs_parts_is_never_merged_into_samples_npz(tmp_path):
    from selfflow.sampling.job import SampleWriter

    store = sampling_store(tmp_path / "job", {"seed": 0})
    labels = torch.tensor([0, 1, 0, 1])
    store.write(0, labels[:2], np.full((2, 3, 4, 4), 10, np.uint8))
    assert store.missing() == [1]  # killed before chunk 1
    other = sampling_store(tmp_path / "other", {"seed": 1})  # another job's chunk: sampled again
    other.write(1, labels[2:], np.zeros((2, 3, 4, 4), np.uint8))
    os.replace(other.path(1), store.path(1))
    assert store.missing() == [1]
    with np.load(store.path(0)) as chunk:  # planted: this job's digest copied, other samples
        members = {key: chunk[key] for key in chunk.files}
    members["samples"] = np.full((2, 3, 4, 4), 255, np.uint8)
    members["indices"] = np.arange(2, 4)
    with open(store.path(1), "wb") as f:
        np.savez(f, **members)
    assert store.missing() == []  # it looks complete by its headers ...
    writer = SampleWriter("image", SimpleNamespace(), tmp_path / "job", grid_upscale=1)
    foreign = r"chunk_000001\.npz was not written by this sampling job"
    with pytest.raises(ValueError, match=foreign) as refused:
        writer.finish(store, labels, nrow=None)
    assert "\n" not in str(refused.value) and not (tmp_path / "job" / "samples.npz").exists()


def test_a_chunk_that_links_to_a_file_outside_parts_is_refused(tmp_path):
    store = sampling_store(tmp_path / "job", {"seed": 0})
    elsewhere = sampling_store(tmp_path / "elsewhere", {"seed": 0})
    elsewhere.write(0, torch.zeros(2, dtype=torch.long), np.zeros((2, 3, 4, 4), np.uint8))
    store.parts.mkdir(parents=True)
    store.path(0).symlink_to(elsewhere.path(0))
    with pytest.raises(UnsafeFileError, match=r"chunk_000000\.npz resolves to .*, outside"):
        store.read(0, (3, 4, 4), np.dtype(np.uint8))


def reference_stats(path: Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    np.savez(path, mu=mu, sigma=sigma)
    return path


@pytest.mark.parametrize(
    "damage, problem",
    [
        ("nan mean", "holds NaN or infinite values"),
        ("infinite covariance", "holds NaN or infinite values"),
        ("negative variance", "is not a covariance"),
    ],
)
def test_reference_statistics_not_finite_or_no_covariance_are_refused(tmp_path, damage, problem):
    from selfflow.evaluation.eval_sets import load_eval_set, reference_pool_stats

    mu, sigma = np.zeros(2048), np.eye(2048)
    if damage == "nan mean":
        mu[7] = np.nan
    elif damage == "infinite covariance":
        sigma[3, 3] = np.inf
    else:
        sigma[5, 5] = -1.0
    path = reference_stats(tmp_path / "ref.npz", mu, sigma)
    for load in (load_eval_set, reference_pool_stats):
        with pytest.raises(ValueError, match=rf"ref\.npz\[mu, sigma\] {problem}") as refused:
            load(path, None)
        assert "\n" not in str(refused.value)


def test_written_json_is_strict_and_names_a_non_finite_metric(tmp_path):
    path = tmp_path / "metrics.json"
    with pytest.raises(ValueError, match=r"metrics\.fid is not a finite number"):
        write_json_atomically(path, {"metrics": {"fid": math.nan, "is": 3.0}})
    assert not path.exists()
    write_json_atomically(path, {"metrics": {"fid": 1.5}})
    strict = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert strict == {"metrics": {"fid": 1.5}}


# --- keys of any characters -----------------------------------------------------------------------


def non_ascii_shard(folder: Path, tar_format: int) -> Path:
    """Samples with non-ASCII and long keys: a pax or GNU tar holds their names in extended
    headers."""
    from selfflow.data.shards.index import scan_shard, write_index

    shard = folder / "train-000000.tar"
    folder.mkdir(parents=True)
    with tarfile.open(shard, "w", format=tar_format) as tar:
        for k, key in enumerate(("ké", "kü", "k" * 120 + "é")):
            for extension, data in (("png", png_bytes(40 + 80 * k)), ("cls", str(k).encode())):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    write_index(shard, scan_shard(shard))
    return shard


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_an_index_cannot_swap_samples_between_keys_whatever_their_characters(tmp_path, tar_format):
    from selfflow.data.shards.dataset import ImageShards
    from selfflow.data.shards.index import index_location

    shard = non_ascii_shard(tmp_path / "s", tar_format)
    honest = ImageShards(str(shard.parent), image_size=4)
    assert [honest.keys[i] for i in range(3)] == ["ké", "kü", "k" * 120 + "é"]
    assert [honest[i][1] for i in range(3)] == [0, 1, 2]  # each key's own label
    document = json.loads(index_location(shard).read_text())
    members = np.asarray(document["members"]).reshape(-1, 4)  # [M, 4]
    headers = np.asarray(document["headers"])  # [M]
    png = document["extensions"].index("png")
    first, second = np.flatnonzero(members[:, 1] == png)[:2]
    # the data of ké and kü swapped, headers and all
    members[[first, second], 2:] = members[[second, first], 2:]
    headers[[first, second]] = headers[[second, first]]
    document.update(members=members.reshape(-1).tolist(), headers=headers.tolist())
    index_location(shard).write_text(json.dumps(document))
    swapped = ImageShards(str(shard.parent), image_size=4, on_bad_file="skip")
    swapped.bad_files.record_path = tmp_path / "skipped.tsv"
    assert swapped[0] is None and swapped[1] is None and swapped[2] is not None
    assert "its tar header names 'kü.png'" in (tmp_path / "skipped.tsv").read_text()


# --- deadlines ------------------------------------------------------------------------------------


class TricklingEndpoint:
    """An HTTP endpoint on 127.0.0.1 that answers every request one byte at a time, `gap` seconds
    apart (headers then a body of `body` bytes); it stops by itself after `lifetime` seconds."""

    def __init__(self, headers_first: bool, gap=0.3, body=4096, lifetime=30.0):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.5)
        self.port = self.server.getsockname()[1]
        self.headers_first, self.gap, self.body = headers_first, gap, body
        self.until = time.monotonic() + lifetime
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while time.monotonic() < self.until:
            try:
                connection, _ = self.server.accept()
            except OSError:
                continue
            threading.Thread(target=self.answer, args=(connection,), daemon=True).start()
        self.server.close()

    def answer(self, connection: socket.socket) -> None:
        fields = [
            "HTTP/1.1 200 OK",
            f"Content-Length: {self.body}",
            f"Content-Range: bytes 0-{self.body - 1}/{self.body}",
            'ETag: "x"',
            "Last-Modified: Thu, 01 Jan 2026 00:00:00 GMT",
        ]
        head = ("\r\n".join(fields) + "\r\n\r\n").encode()
        with connection:
            connection.recv(65536)
            try:
                if self.headers_first:
                    connection.sendall(head)
                for k in range(len(head) + self.body if not self.headers_first else self.body):
                    if time.monotonic() > self.until:
                        return
                    trickled = not self.headers_first and k < len(head)
                    connection.sendall(head[k : k + 1] if trickled else b"x")
                    time.sleep(self.gap)
            except OSError:
                return


@pytest.mark.parametrize("trickles", ["the headers", "the body"])
def test_an_object_store_that_trickles_its_answer_stops_at_the_deadline(trickles, monkeypatch):
    pytest.importorskip("s3fs")
    from selfflow.data.shards.sources import ObjectStore, ObjectStoreError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    endpoint = TricklingEndpoint(headers_first=trickles == "the body")
    url = f"http://127.0.0.1:{endpoint.port}"
    store = ObjectStore(url, addressing_style="path", retries=1, timeout_s=1.0)
    started = time.monotonic()
    deadline = r"took longer than data\.dataset\.store\.timeout_s=1 s"
    with pytest.raises(ObjectStoreError, match=deadline) as stopped:
        if trickles == "the headers":
            store.size("s3://bucket/train-000000.tar")
        else:
            store.read("s3://bucket/train-000000.tar", 0, 4096)
    assert time.monotonic() - started < 10  # the endpoint goes on 30 s
    assert "\n" not in str(stopped.value)


# --- a run folder belongs to one run --------------------------------------------------------------


@pytest.mark.slow
def test_another_run_in_a_used_run_folder_is_refused_and_the_same_run_resumes(
    tiny_train_cfg,
    tmp_path,
    monkeypatch,
    capsys,
):
    from selfflow.cli import train as train_cli
    from selfflow.training.run import train
    from selfflow.training.run_folder import release_run_folder

    args = ["trainer.max_steps=2", "callbacks.samples.every_n_steps=0"]
    train(tiny_train_cfg(*args, run_dir=tmp_path / "run"))
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    for other in (["seed=1"], []):  # another run, or this one again without resume=auto
        used = r"already holds the checkpoints of a run .*resume=auto"
        with pytest.raises(ValueError, match=used) as refused:
            train(tiny_train_cfg(*args, *other, run_dir=tmp_path / "run"))
        assert "\n" not in str(refused.value)
    after = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert after == checkpoints  # no last-v1.ckpt
    first_config = (tmp_path / "run" / "checkpoints" / checkpoints[0]).read_bytes()
    monkeypatch.setattr(sys, "argv", ["selfflow-train", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as stopped:
        train_cli.main()  # from the command line: before Hydra writes its files into the folder
    release_run_folder(tmp_path / "run")
    assert stopped.value.code == 2 and "already holds the checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "run" / ".hydra").exists()
    assert (tmp_path / "run" / "checkpoints" / checkpoints[0]).read_bytes() == first_config
    same = ["trainer.max_steps=3", "callbacks.samples.every_n_steps=0", "resume=auto"]
    train(tiny_train_cfg(*same, run_dir=tmp_path / "run"))
    assert "last-v1.ckpt" not in {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()}
