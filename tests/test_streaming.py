"""Shards streamed from object stores through fsspec: a real S3 server (moto's, through s3fs) on the
loopback interface, started by the tests themselves, and fsspec's in-memory store as a second
protocol; shards written and uploaded as they are; ranged reads through the indexes give the local
items, one request per sample; ranks fetch disjoint samples; errors name the setting to fix; every
request has a deadline; a run killed with SIGKILL and resumed gives the losses of an uninterrupted
run and writes no credential anywhere."""

import logging
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from selfflow.data.shards.dataset import ImageShards
from selfflow.data.shards.sources import ObjectStore, ObjectStoreError, RequestDeadline, read_range
from selfflow.data.shards.writer import write_shards
from selfflow.training.datamodule import SelfFlowDataModule
from tests.helpers.configs import compose_train
from tests.helpers.files import write_images, write_noise_images, write_recordings, write_videos
from tests.helpers.runs import (
    EVERY,
    MAX_STEPS,
    assert_same_run,
    finish,
    kill_when,
    resume_run_args,
    start,
)

BUCKET = "selfflow-test"


@pytest.fixture(scope="module")
def endpoint():
    """A moto S3 server on 127.0.0.1 (a free port), with throw-away credentials in
    the environment."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        fs = ObjectStore(endpoint_url=url).filesystem(f"s3://{BUCKET}")
        fs.call_s3("create_bucket", Bucket=BUCKET)
        yield url
        server.stop()


def upload(url: str, folder: Path, prefix: str) -> str:
    """Every file `selfflow-shards write` wrote (shards, indexes, classes.json), unchanged; returns
    the s3:// folder."""
    fs = ObjectStore(endpoint_url=url).filesystem(f"s3://{BUCKET}")
    for path in sorted(folder.iterdir()):
        fs.pipe_file(f"s3://{BUCKET}/{prefix}/{path.name}", path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


def record_gets(store: ObjectStore) -> list[tuple[str, str]]:
    """(object URL, Range header) of every GET the store's client sends from now on
    (this process)."""
    sent = []

    def record(request, **_):
        range_ = request.headers.get("Range")
        sent.append((request.url, range_.decode() if isinstance(range_, bytes) else range_))

    fs = store.filesystem(f"s3://{BUCKET}")
    fs.connect()  # the client exists from here on
    fs.s3.meta.events.register("before-send.s3.GetObject", record)
    return sent


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    write_images(base / "src", per_class=6)
    write_shards(
        base / "src", base / "shards", "image", test_fraction=0.25, max_samples_per_shard=3
    )
    return base / "shards"


def assert_same_items(local, streamed) -> None:
    """Each item of `streamed` equals `local`'s, augmentation draws included (same seed
    per item)."""
    for i in range(len(local)):
        torch.manual_seed(i)
        expected = local[i]
        torch.manual_seed(i)
        got = streamed[i]
        assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_streamed_shards_equal_the_local_ones_with_one_request_per_sample(endpoint, image_shards):
    folder = upload(endpoint, image_shards, "equal")
    store = ObjectStore(endpoint_url=endpoint)
    local = ImageShards(str(image_shards), "train", image_size=8)
    streamed = ImageShards(folder, "train", image_size=8, store=store)
    assert (
        streamed.shards == [f"{folder}/train-{n:06d}.tar" for n in range(3)]
        and len(streamed) == len(local) == 9
    )
    gets = record_gets(store)
    assert_same_items(local, streamed)
    assert len(gets) == len(local)  # the data and label members of a sample come in one ranged GET
    assert all(range_.startswith("bytes=") for _, range_ in gets)
    assert streamed.class_names == local.class_names == ["cat", "dog"]
    pattern = ImageShards(
        f"{folder}/{{split}}-{{000000..000002}}.tar", "train", image_size=8, store=store
    )
    listed = ImageShards([f"{folder}/train-000002.tar"], "train", image_size=8, store=store)
    assert pattern.shards == streamed.shards and len(listed) == 3
    assert len(ImageShards(folder, "test", image_size=8, store=store)) == len(
        ImageShards(str(image_shards), "test")
    )


def test_two_ranks_fetch_disjoint_samples_that_cover_the_epoch(endpoint, image_shards):
    folder = upload(endpoint, image_shards, "ranks")
    fetched = {}
    for rank in (0, 1):
        store = ObjectStore(endpoint_url=endpoint)
        train = ImageShards(folder, "train", image_size=8, store=store)
        test = ImageShards(folder, "test", image_size=8, store=store)
        datamodule = SelfFlowDataModule.from_splits(train, test, "image", batch_size=2, seed=5)
        datamodule.trainer = SimpleNamespace(
            world_size=2, global_rank=rank
        )  # what DDP gives each rank
        gets = record_gets(store)
        batches = list(datamodule.train_dataloader())
        assert len(batches) == 2 and all(len(batch["label"]) == 2 for batch in batches)
        starts = {(url.rsplit("/", 1)[-1], int(range_[6:].split("-")[0])) for url, range_ in gets}
        fetched[rank] = {
            i
            for i in range(len(train))
            if (
                Path(train.shards[train.data_members[i, 0]]).name,
                int(train.data_members[i, 1]) - 512,
            )
            in starts
        }
        assert len(fetched[rank]) == len(gets) == 4  # only this rank's samples, each fetched once
    assert not fetched[0] & fetched[1]


def test_a_batch_has_its_reads_in_flight_at_once_and_the_items_of_a_loop(
    endpoint, image_shards, monkeypatch
):
    folder = upload(endpoint, image_shards, "batch")
    store = ObjectStore(endpoint_url=endpoint, max_connections=4)
    streamed = ImageShards(folder, "train", image_size=8, hflip=True, store=store)
    batch = [7, 0, 4, 2]
    torch.manual_seed(3)
    one_by_one = [streamed[i] for i in batch]
    together = threading.Barrier(
        len(batch), timeout=60
    )  # breaks unless all four reads wait here at once
    read = store.read

    def read_together(location, offset, size):
        together.wait()
        return read(location, offset, size)

    monkeypatch.setattr(store, "read", read_together)
    torch.manual_seed(3)
    loaded = streamed.load_batch(batch)
    assert [label for _, label in loaded] == [label for _, label in one_by_one]
    assert all(
        torch.equal(a[0], b[0]) for a, b in zip(loaded, one_by_one)
    )  # the same flips, in the same order


@pytest.mark.parametrize(
    "modality, tokenizer",
    [("image", "image_pixels"), ("audio", "audio_mel"), ("video", "video_tubelets")],
)
def test_stream_data_configs_build_and_batch(endpoint, modality, tokenizer, tmp_path):
    {"image": write_images, "audio": write_recordings, "video": write_videos}[modality](
        tmp_path / "src"
    )
    write_shards(tmp_path / "src", tmp_path / "shards", modality, test_fraction=0.34)
    folder = upload(endpoint, tmp_path / "shards", f"config-{modality}")
    sizes = {
        "image": ["data.dataset.image_size=8"],
        "audio": [],
        "video": ["data.dataset.num_frames=4", "data.dataset.image_size=16"],
    }[modality]
    cfg = compose_train(
        [
            f"data={modality}_stream",
            f"tokenizer={tokenizer}",
            f"data.root={folder}",
            f"data.dataset.store.endpoint_url={endpoint}",
            "data.batch_size=2",
            *sizes,
        ],
        tmp_path / "run",
    )
    datamodule = instantiate(cfg.data)
    assert datamodule.num_classes == 2 and datamodule.modality == modality
    assert (
        datamodule.test_set.shards[0].startswith("s3://")
        and datamodule.test_set.source.endpoint_url == endpoint
    )
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["data"].shape[0] == 2 and batch["label"].tolist()[0] in (0, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_store_errors_name_the_setting_and_an_outage_stops_instead_of_skipping(
    endpoint, image_shards, monkeypatch
):
    folder = upload(endpoint, image_shards, "errors")
    store = ObjectStore(endpoint_url=endpoint, retries=1)
    fs = store.filesystem(folder)
    with pytest.raises(FileNotFoundError, match=r"no train-\*\.tar shards in s3://nowhere/x"):
        ImageShards("s3://nowhere/x", "train", store=store)
    fs.rm_file(f"{folder}/train-000001.tar.index.json")
    with pytest.raises(
        FileNotFoundError,
        match=r"train-000001\.tar has no index .* run selfflow-shards index FOLDER "
        r"where the shards were written and upload the \.index\.json files",
    ):
        ImageShards(folder, "train", store=store)
    fs.rm_file(f"{folder}/classes.json")
    with pytest.raises(
        FileNotFoundError, match=r"no classes\.json next to s3://.*/errors/test-000000\.tar"
    ):
        ImageShards(folder, "test", store=store)

    dead = ObjectStore(endpoint_url=f"http://127.0.0.1:{free_port()}", retries=1, timeout_s=5)
    with pytest.raises(
        ObjectStoreError, match=r"cannot read s3://.* check data\.dataset\.store\.endpoint_url"
    ):
        ImageShards(f"s3://{BUCKET}/equal", "train", store=dead)

    streamed = ImageShards(
        f"{upload(endpoint, image_shards, 'outage')}", "train", image_size=8, store=store
    )
    assert streamed[0] is not None
    store.endpoint_url, store._filesystems = dead.endpoint_url, {}  # the store goes away mid-run
    with pytest.raises(ObjectStoreError, match="cannot read"):
        streamed[1]  # a stop (resume=auto continues exactly), not a skipped sample
    with pytest.raises(ObjectStoreError, match="cannot read"):
        streamed.load_batch([1, 2])

    from aiobotocore.utils import AioInstanceMetadataFetcher

    asked = []

    async def no_role(self):
        asked.append(self)
        return {}

    monkeypatch.setattr(AioInstanceMetadataFetcher, "retrieve_iam_role_credentials", no_role)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(image_shards / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(image_shards / "none"))
    with pytest.raises(
        ObjectStoreError, match="no credentials to read s3://.*set AWS_ACCESS_KEY_ID"
    ):
        ImageShards(f"s3://{BUCKET}/equal", "train", store=ObjectStore(endpoint_url=endpoint))
    assert (
        asked == []
    )  # the instance-metadata service is never asked unless instance_credentials=true
    with pytest.raises(ObjectStoreError, match="no credentials"):
        ImageShards(
            f"s3://{BUCKET}/equal",
            "train",
            store=ObjectStore(endpoint_url=endpoint, instance_credentials=True),
        )
    assert asked  # asked only when allowed


def upload_to_memory(folder: Path, prefix: str) -> str:
    """Every file of `folder` into fsspec's in-memory store (seen by forked DataLoader workers
    too)."""
    fs = ObjectStore().filesystem("memory://")
    for path in sorted(folder.iterdir()):
        fs.pipe_file(f"memory://{prefix}/{path.name}", path.read_bytes())
    return f"memory://{prefix}"


def test_a_second_protocol_reaches_the_same_reader_by_ranged_reads(
    image_shards,
    monkeypatch,
    tmp_path,
):
    folder = upload_to_memory(image_shards, "selfflow-test/equal")
    local = ImageShards(str(image_shards), "train", image_size=8)
    streamed = ImageShards(folder, "train", image_size=8)
    assert streamed.shards == [f"{folder}/train-{n:06d}.tar" for n in range(3)]
    assert len(streamed) == 9
    fs = streamed.source.filesystem(folder)
    ranges = []
    cat_file = type(fs).cat_file
    monkeypatch.setattr(
        type(fs),
        "cat_file",
        lambda self, path, start=None, end=None, **kw: (
            ranges.append((start, end)) or cat_file(self, path, start=start, end=end, **kw)
        ),
    )
    assert_same_items(local, streamed)
    sizes = {(image_shards / Path(s).name).stat().st_size for s in streamed.shards}
    assert len(ranges) == len(local) and all(end - start < min(sizes) for start, end in ranges)
    cfg = compose_train(
        [
            "data=image_stream",
            f"data.root={folder}",
            "data.dataset.image_size=8",
            "data.batch_size=2",
        ],
        tmp_path / "run",
    )
    datamodule = instantiate(cfg.data)
    batch = next(iter(datamodule.train_dataloader()))  # forked workers read the store too
    assert batch["data"].shape[0] == 2 and datamodule.train_set.shards[0].startswith("memory://")


def test_every_request_has_a_deadline_on_the_whole_read(monkeypatch):
    """A server that answers byte by byte never trips a per-read timeout; the deadline ends the
    whole request."""
    import fsspec

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def trickle():
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            time.sleep(0.05)
            try:
                connection.sendall(b"x")
            except OSError:
                break
        connection.close()

    threading.Thread(target=trickle, daemon=True).start()
    fs = fsspec.filesystem("http", skip_instance_cache=True)  # aiohttp's own timeouts: minutes
    start = time.perf_counter()
    with pytest.raises(RequestDeadline):
        read_range(fs, f"http://127.0.0.1:{port}/train-000000.tar", 0, 1000, deadline_s=1)
    assert time.perf_counter() - start < 5
    listener.close()

    memory = fsspec.filesystem("memory", skip_instance_cache=True)
    memory.pipe_file("memory://slow/a.tar", b"abc")
    # a filesystem without an event loop
    monkeypatch.setattr(type(memory), "cat_file", lambda *a, **k: time.sleep(3))
    with pytest.raises(RequestDeadline):
        read_range(memory, "memory://slow/a.tar", 0, 3, deadline_s=0.5)
    store = ObjectStore(retries=2, timeout_s=0.5)
    slow = r"took longer than data\.dataset\.store\.timeout_s=0\.5 s, 2 times"
    with pytest.raises(ObjectStoreError, match=slow):
        store.read("memory://slow/a.tar", 0, 3)


def shard_run_args(
    root: str, run_dir: Path, workers: int, *extra: str, endpoint: str | None = None
) -> list[str]:
    """tests/test_resume.py's run on shards: local ones, or streamed from `endpoint`."""
    data = (
        ["data=image_shards"]
        if endpoint is None
        else ["data=image_stream", f"data.dataset.store.endpoint_url={endpoint}"]
    )
    return resume_run_args(data, root, run_dir, workers, *extra)


@pytest.mark.slow
def test_sigkill_while_streaming_then_resume_auto_gives_the_losses_of_a_local_run(
    endpoint,
    tmp_path,
    monkeypatch,
):
    images = write_noise_images(tmp_path / "images")
    write_shards(images, tmp_path / "shards", "image", max_samples_per_shard=5)
    folder = upload(endpoint, tmp_path / "shards", "resume")
    secret = f"never-stored-{np.random.default_rng().integers(1 << 60)}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto takes any; the runs inherit it
    reference = tmp_path / "local"
    finish(start(shard_run_args(str(tmp_path / "shards"), reference, 0), tmp_path))
    run_dir = tmp_path / "streamed"
    step = int(np.random.default_rng().choice(range(EVERY, MAX_STEPS - EVERY, EVERY)))
    kill_when(
        start(shard_run_args(folder, run_dir, 2, endpoint=endpoint), tmp_path),
        run_dir / "checkpoints" / f"step_{step:07d}.ckpt",
    )
    finish(start(shard_run_args(folder, run_dir, 2, "resume=auto", endpoint=endpoint), tmp_path))
    assert_same_run(reference, run_dir)
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    stored = [path for path in files if secret.encode() in path.read_bytes()]
    assert not stored  # no checkpoint, hparams, config or log holds the credential


def test_each_protocol_reaches_its_filesystem_or_names_the_package_to_install():
    import fsspec

    store = ObjectStore(timeout_s=7)
    assert type(store.filesystem("hf://datasets/user/name/shards")).__name__ == "HfFileSystem"
    web = store.filesystem("https://example.invalid/shards")
    assert web.client_kwargs["timeout"].total == 7  # the request deadline reaches aiohttp too
    for protocol, package in (("gs", "gcsfs"), ("az", "adlfs")):
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError:
            missing = rf"reading shards from {protocol}://.* pip install {package}"
            with pytest.raises(ModuleNotFoundError, match=missing):
                store.filesystem(f"{protocol}://bucket/shards")
    with pytest.raises(ValueError, match=r"no filesystem reads s4://; check data\.root"):
        ImageShards("s4://bucket/shards", "train", store=store)
