"""Loader throughput: where images come from (a folder, local tar shards, an S3-compatible store)
against what an XL/2 training step consumes, and the built-in video and audio experiments against
their own training step.

  python -m tools.bench_loaders                     # every part; JSON records on stdout
  python -m tools.bench_loaders --only start_up --start-up-samples 100000
  python -m tools.bench_loaders --only storage --images 256 --workers 0 1 2 \
      --step-seconds 0.19 --step-batch 32
  python -m tools.bench_loaders --only storage --latency-ms 20   # as if the store were 20 ms away
  python -m tools.bench_loaders --only decode --decode-clips 10  # each video backend, 360p and 720p
  python -m tools.bench_loaders --only experiments --experiments video_digits --batches 20 \
      --steps 10

start_up: seconds to open `--start-up-samples` samples in shards of 10,000 (tiny members: the
headers are the work) through their indexes (local and streamed) and by scanning every tar header
(local, indexes removed).

storage: `--images` synthetic photos (JPEG, 500x375 like an average ImageNet image) in two class
folders, written as shards by `selfflow-shards write` (with their indexes) and uploaded to a moto S3
server on 127.0.0.1 started here (moto is in the test extra); the same items (256x256 centre crops,
flips) are then loaded through the training DataLoader (`SelfFlowDataModule`: the resumable sampler,
a batch's reads in flight at once) from each storage, at each worker count. Records: samples/s per
storage and worker count, and per storage the workers that keep one GPU fed: ceil(consumption /
samples/s of one worker), consumption = step_batch / step_seconds of one XL/2 step on one GPU. The
default step (0.19 s for 32 samples) is an estimate: the H200 step measured in docs/performance.md
(width 768, 12 blocks, batch 128: 145 ms) scaled by FLOPs to XL/2 (width 1152, 28 blocks) at 32
samples; pass a measured one.

decode: clips/s that each video backend reads from one synthetic H.264 MP4 per size (360p, 720p), a
random 16-frame clip at stride 2 each time, from the file's path and from its bytes in memory (as
shard members are read).

experiments: clips/s (and seconds of audio/s) of the train DataLoader of each experiment, the video
decoders on their own, and clips/s that one optimizer step of the experiment's model consumes
(tokenize + Self-Flow forward/backward + AdamW + EMA update); `loader_over_step` > 1 means the
loader keeps up. Built-in data is generated into $SELFFLOW_CACHE first if needed (not timed).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from PIL import Image

from selfflow.data.folders.image_folder import ImageFolder
from selfflow.data.shards.dataset import CLASSES_FILE, ImageShards
from selfflow.data.shards.index import index_location
from selfflow.data.shards.sources import ObjectStore
from selfflow.data.shards.writer import ShardWriter, write_shards
from selfflow.training.datamodule import SelfFlowDataModule

BUCKET = "selfflow-bench"
PHOTO_SIZE = (500, 375)  # width, height: about the mean ImageNet image
IMAGE_SIZE = 256  # what an XL/2 run on ImageNet trains on (before its autoencoder)
PARTS = ["start_up", "storage", "decode", "experiments"]
# width, height of the synthetic H.264 videos
DECODE_SIZES = {"360p": (640, 360), "720p": (1280, 720)}


# ---------------------------------------------------------- storage: folder, local shards, streamed


def write_photos(root: Path, count: int) -> float:
    """`count` JPEGs of smooth colour fields with noise (compressing like photos) in two class
    folders; mean KB."""
    rng = np.random.default_rng(0)
    width, height = PHOTO_SIZE
    ramp = (
        np.linspace(0, 1, width)[None, :, None] * np.linspace(0, 1, height)[:, None, None]
    )  # [H, W, 1]
    sizes = []
    for i in range(count):
        path = root / f"class{i % 2}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = rng.uniform(0, 255, (1, 1, 3))
        pixels = np.clip(colour * ramp + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(
            np.uint8
        )
        Image.fromarray(pixels).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


class DelayedStore(ObjectStore):
    """An object store `latency_ms` away: each read waits that long first (a remote store's time to
    first byte)."""

    def __init__(self, latency_ms: float, **kwargs):
        super().__init__(**kwargs)
        self.latency_ms = latency_ms

    def read(self, location: str, offset: int, size: int) -> bytes:
        time.sleep(self.latency_ms / 1000)
        return super().read(location, offset, size)


def start_store() -> tuple[object, str]:
    """A moto S3 server on 127.0.0.1 with a bucket; throw-away credentials in this
    process's environment."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    fs = ObjectStore(endpoint_url=url).filesystem(f"s3://{BUCKET}")
    fs.call_s3("create_bucket", Bucket=BUCKET)
    return server, url


def upload(url: str, folder: Path) -> str:
    fs = ObjectStore(endpoint_url=url).filesystem(f"s3://{BUCKET}")
    for path in sorted(folder.iterdir()):
        fs.pipe_file(f"s3://{BUCKET}/shards/{path.name}", path.read_bytes())
    return f"s3://{BUCKET}/shards"


def samples_per_s(train, workers: int, batch_size: int, batches: int) -> float:
    """Samples per second of the training DataLoader after one warm-up batch (which starts
    the workers)."""
    test = train  # the test split is not read here
    loader = SelfFlowDataModule.from_splits(
        train, test, "image", batch_size=batch_size, num_workers=workers
    ).train_dataloader()
    iterator = iter(loader)
    next(iterator)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        count += 0 if batch is None else len(batch["label"])
    return count / (time.perf_counter() - start)


def bench_storage(args) -> list[dict]:
    records = []
    device = f"cpu ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})"
    consumption = args.step_batch / args.step_seconds
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        image_kb = write_photos(folder / "photos", args.images)
        write_shards(
            folder / "photos",
            folder / "shards",
            "image",
            splits=("train",),
            max_samples_per_shard=args.samples_per_shard,
        )
        server, url = start_store()
        try:
            remote = upload(url, folder / "shards")
            options = {"split": "train", "image_size": IMAGE_SIZE, "hflip": True}
            store = (
                DelayedStore(args.latency_ms, endpoint_url=url)
                if args.latency_ms
                else ObjectStore(endpoint_url=url)
            )
            builders = {
                "folder": lambda: ImageFolder(str(folder / "photos"), **options),
                "local_shards": lambda: ImageShards(str(folder / "shards"), **options),
                "streamed": lambda: ImageShards(remote, store=store, **options),
            }
            datasets = {storage: build() for storage, build in builders.items()}
            for storage, dataset in datasets.items():
                rates = {}
                for workers in args.workers:
                    rates[workers] = samples_per_s(dataset, workers, args.batch_size, args.batches)
                    records.append(
                        {
                            "name": "loader/samples_per_s",
                            "storage": storage,
                            "workers": workers,
                            "samples_per_s": round(rates[workers], 1),
                            "batch_size": args.batch_size,
                            "images": len(dataset),
                            "image_kb": round(image_kb, 1),
                            "latency_ms": args.latency_ms if storage == "streamed" else 0,
                            "device": device,
                        }
                    )
                per_worker = rates.get(1) or max(
                    (rate / w for w, rate in rates.items() if w), default=float("nan")
                )
                records.append(
                    {
                        "name": "loader/keep_one_gpu_fed",
                        "storage": storage,
                        "step_seconds": args.step_seconds,
                        "step_batch": args.step_batch,
                        "consumption_samples_per_s": round(consumption, 1),
                        "samples_per_s_one_worker": round(per_worker, 1),
                        "workers_needed": math.ceil(consumption / per_worker)
                        if per_worker > 0
                        else None,
                        "device": device,
                    }
                )
        finally:
            server.stop()
    return records


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 60, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def bench_start_up(args) -> list[dict]:
    """Seconds to open `--start-up-samples` samples (tiny PNGs, so that the headers are the work) in
    shards of 10,000: through the indexes, from local disk and from the store, and by scanning every
    tar header."""
    records = []
    device = f"cpu ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})"
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        writer, data = ShardWriter(folder, "train", 10_000, 1 << 40), tiny_png()
        for k in range(args.start_up_samples):
            writer.add(f"{k:07d}", {"png": data, "cls": str(k % 2).encode()})
        shards = writer.close()
        (folder / CLASSES_FILE).write_text(
            json.dumps({"class_names": ["even", "odd"], "modality": "image"})
        )
        server, url = start_store()
        try:
            remote = upload(url, folder)
            opened = {
                "local_shards": lambda: ImageShards(str(folder), image_size=8),
                "streamed": lambda: ImageShards(
                    remote, image_size=8, store=ObjectStore(endpoint_url=url)
                ),
            }
            for storage, open_shards in opened.items():
                start = time.perf_counter()
                open_shards()
                records.append(
                    {
                        "name": "loader/start_up",
                        "storage": storage,
                        "index": True,
                        "seconds": round(time.perf_counter() - start, 3),
                        "samples": args.start_up_samples,
                        "shards": len(shards),
                        "device": device,
                    }
                )
            for shard in shards:
                index_location(shard).unlink()
            start = time.perf_counter()
            opened["local_shards"]()
            records.append(
                {
                    "name": "loader/start_up",
                    "storage": "local_shards",
                    "index": False,
                    "seconds": round(time.perf_counter() - start, 3),
                    "samples": args.start_up_samples,
                    "shards": len(shards),
                    "device": device,
                }
            )
        finally:
            server.stop()
    return records


# ---------------------------------------------------------------- decode: one video file, each
# backend


def write_test_video(path: Path, width: int, height: int, frames: int) -> Path:
    """An H.264 MP4 of moving colour gradients with noise (compressing like camera footage),
    25 fps."""
    from selfflow.io.video import write_mp4

    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    clip = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        field = (x + y * 0.5 + 4 * t + np.array([0, 85, 170])) % 256
        clip[t] = np.clip(field + rng.normal(0, 8, (height, width, 1)), 0, 255).astype(np.uint8)
    return write_mp4(clip, path, fps=25, crf=23)


def bench_decode(args) -> list[dict]:
    """Clips per second that each video backend reads from one MP4 (a random 16-frame clip, stride
    2), in this process, from a path and from in-memory bytes (as a shard member is read)."""
    from selfflow.io.video import VIDEO_BACKENDS, read_clip

    records = []
    device = f"cpu ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})"
    with tempfile.TemporaryDirectory() as folder:
        for size, (width, height) in DECODE_SIZES.items():
            path = write_test_video(Path(folder) / f"{size}.mp4", width, height, args.decode_frames)
            data = path.read_bytes()
            for backend in [b for b in VIDEO_BACKENDS if b != "auto"]:
                for origin in ("path", "memory"):

                    def one_clip(path=path, data=data, origin=origin, backend=backend):
                        source = path if origin == "path" else io.BytesIO(data)
                        return read_clip(source, 16, 2, random_start=True, backend=backend)

                    one_clip()  # warm-up
                    start = time.perf_counter()
                    for _ in range(args.decode_clips):
                        one_clip()
                    seconds = time.perf_counter() - start
                    records.append(
                        {
                            "name": "loader/decode_clips_per_s",
                            "backend": backend,
                            "source": origin,
                            "video": f"{width}x{height}, {args.decode_frames} frames, H.264",
                            "clip": "16 frames, stride 2, random start",
                            "clips_per_s": round(args.decode_clips / seconds, 2),
                            "device": device,
                        }
                    )
    return records


# ------------------------------------------------------------ experiments: built-in video and audio


def compose_experiment(name: str, overrides: list[str]):
    import selfflow.training.build  # noqa: F401 - registers the config resolvers

    with initialize_config_module("selfflow.conf", version_base="1.3"):
        return compose(
            "train", overrides=[f"experiment={name}", "run_dir=/tmp/selfflow-bench", *overrides]
        )


def loader_rate(datamodule, workers: int, batches: int) -> float:
    """Clips per second delivered by the train DataLoader (after one warm-up batch, which starts
    the workers)."""
    datamodule.num_workers = workers
    iterator = iter(datamodule.train_dataloader())
    next(iterator)
    clips, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        clips += 0 if batch is None else len(batch["label"])
    return clips / (time.perf_counter() - start)


def decoder_rate(dataset, backend: str, clips: int) -> float:
    """Clips per second of one video backend reading the dataset's files in the main process (the
    built-in moving digits' clips preloaded in memory set aside)."""
    previous, dataset.backend = dataset.backend, backend
    preloaded, dataset.clips = getattr(dataset, "clips", None), None
    start = time.perf_counter()
    for i in range(clips):
        dataset[i % len(dataset)]
    dataset.backend, dataset.clips = previous, preloaded
    return clips / (time.perf_counter() - start)


def step_rate(cfg, datamodule, steps: int) -> float:
    """Clips per second consumed by full optimizer steps of the experiment's model on a
    fixed batch."""
    from selfflow.training.build import build_module

    module = build_module(cfg, datamodule)
    optimizer = module.configure_optimizers()["optimizer"]
    batch = next(iter(datamodule.train_dataloader()))

    def one_step():
        tokens = module.tokenizers[batch["modality"]].encode(batch["data"])
        out = module.objective(tokens, batch["label"])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(module.objective.parameters(), 1.0)
        optimizer.step()
        module.objective.update_teacher()

    one_step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    return steps * len(batch["label"]) / (time.perf_counter() - start)


def bench_experiment(
    name: str, workers: list[int], batches: int, steps: int, overrides: list[str]
) -> dict:
    cfg = compose_experiment(name, overrides)
    datamodule = instantiate(cfg.data)
    result: dict = {
        "name": "loader/experiment",
        "experiment": name,
        "modality": datamodule.modality,
        "batch_size": datamodule.batch_size,
        "configured_workers": int(cfg.data.num_workers),
    }
    for count in workers:
        result[f"loader_clips_per_s_workers{count}"] = round(
            loader_rate(datamodule, count, batches), 1
        )
    if datamodule.modality == "audio":
        seconds = datamodule.train_set.num_samples / datamodule.train_set.sample_rate
        for count in workers:
            result[f"loader_audio_s_per_s_workers{count}"] = round(
                result[f"loader_clips_per_s_workers{count}"] * seconds, 1
            )
    if datamodule.modality == "video":
        for backend in ("pyav",):
            result[f"decode_clips_per_s_{backend}"] = round(
                decoder_rate(datamodule.train_set, backend, batches * 8), 1
            )
    result["step_clips_per_s"] = round(step_rate(cfg, datamodule, steps), 1)
    configured = result.get(f"loader_clips_per_s_workers{cfg.data.num_workers}")
    if configured is not None:
        result["loader_over_step"] = round(configured / result["step_clips_per_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", choices=PARTS, action="append", help="one part (repeatable); default: all"
    )
    parser.add_argument(
        "--workers", nargs="+", type=int, default=[0, 1, 2], help="DataLoader worker counts"
    )
    parser.add_argument("--batches", type=int, default=8, help="batches timed per loader setting")
    parser.add_argument("--images", type=int, default=256, help="storage: synthetic photos written")
    parser.add_argument("--batch-size", type=int, default=32, help="storage: DataLoader batch size")
    parser.add_argument(
        "--samples-per-shard", type=int, default=64, help="storage: shard size in samples"
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="storage: wait this long before every read from the store (a remote store)",
    )
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=0.19,
        help="storage: one XL/2 optimizer step on one GPU "
        "(default: an estimate scaled from docs/performance.md, see above)",
    )
    parser.add_argument(
        "--step-batch", type=int, default=32, help="storage: samples per GPU in that step"
    )
    parser.add_argument(
        "--start-up-samples", type=int, default=50_000, help="start_up: samples in the shards"
    )
    decode_clips = "decode: clips timed per backend and size"
    parser.add_argument("--decode-clips", type=int, default=10, help=decode_clips)
    decode_frames = "decode: frames in each test video"
    parser.add_argument("--decode-frames", type=int, default=120, help=decode_frames)
    parser.add_argument("--experiments", nargs="+", default=["video_digits", "audio_digits"])
    parser.add_argument("--steps", type=int, default=10, help="experiments: optimizer steps timed")
    parser.add_argument(
        "overrides", nargs="*", help="experiments: Hydra overrides applied to every experiment"
    )
    args = parser.parse_args()
    parts = args.only or PARTS
    records = bench_start_up(args) if "start_up" in parts else []
    records += bench_storage(args) if "storage" in parts else []
    records += bench_decode(args) if "decode" in parts else []
    if "experiments" in parts:
        records += [
            bench_experiment(name, args.workers, args.batches, args.steps, args.overrides)
            for name in args.experiments
        ]
    print(
        json.dumps(
            {
                "torch_threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "records": records,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
