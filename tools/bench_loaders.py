"""Loader throughput against the training step's consumption for the built-in video and audio experiments.

  python tools/bench_loaders.py                       # video_digits and audio_digits, prints JSON
  python tools/bench_loaders.py --experiments video_digits --batches 20 --steps 10 --workers 0 2

For each experiment: clips/s (and seconds of audio/s) that the train DataLoader delivers with each worker count,
the video decoders (decord, PyAV) on their own, and clips/s that one optimizer step of the experiment's model
consumes (tokenize + Self-Flow objective forward/backward + AdamW + EMA update). `loader_over_step` > 1 means
the loader keeps up. Built-in data is generated into $SELFFLOW_CACHE first if needed (not timed).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate


def compose_experiment(name: str, overrides: list[str]):
    import selfflow.training.build  # noqa: F401 - registers the config resolvers

    with initialize_config_module("selfflow.conf", version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", "run_dir=/tmp/selfflow-bench", *overrides])


def loader_rate(datamodule, workers: int, batches: int) -> float:
    """Clips per second delivered by the train DataLoader (after one warm-up batch, which starts the workers)."""
    datamodule.num_workers = workers
    iterator = iter(datamodule.train_dataloader())
    next(iterator)
    clips, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        clips += 0 if batch is None else len(batch["label"])
    return clips / (time.perf_counter() - start)


def decoder_rate(dataset, backend: str, clips: int) -> float:
    """Clips per second of one video backend reading the dataset's files in the main process."""
    previous, dataset.backend = dataset.backend, backend
    start = time.perf_counter()
    for i in range(clips):
        dataset[i % len(dataset)]
    dataset.backend = previous
    return clips / (time.perf_counter() - start)


def step_rate(cfg, datamodule, steps: int) -> float:
    """Clips per second consumed by full optimizer steps of the experiment's model on a fixed batch."""
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


def bench(name: str, workers: list[int], batches: int, steps: int, overrides: list[str]) -> dict:
    cfg = compose_experiment(name, overrides)
    datamodule = instantiate(cfg.data)
    result: dict = {"experiment": name, "modality": datamodule.modality, "batch_size": datamodule.batch_size,
                    "configured_workers": int(cfg.data.num_workers)}
    for count in workers:
        result[f"loader_clips_per_s_workers{count}"] = round(loader_rate(datamodule, count, batches), 1)
    if datamodule.modality == "audio":
        seconds = datamodule.train_set.num_samples / datamodule.train_set.sample_rate
        for count in workers:
            result[f"loader_audio_s_per_s_workers{count}"] = round(result[f"loader_clips_per_s_workers{count}"]
                                                                   * seconds, 1)
    if datamodule.modality == "video":
        from selfflow.data.video_io import decord_available

        for backend in ("decord", "pyav") if decord_available() else ("pyav",):
            result[f"decode_clips_per_s_{backend}"] = round(decoder_rate(datamodule.train_set, backend, batches * 8), 1)
    result["step_clips_per_s"] = round(step_rate(cfg, datamodule, steps), 1)
    configured = result.get(f"loader_clips_per_s_workers{cfg.data.num_workers}")
    if configured is not None:
        result["loader_over_step"] = round(configured / result["step_clips_per_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=["video_digits", "audio_digits"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--batches", type=int, default=20, help="batches timed per loader setting")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps timed")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every experiment")
    args = parser.parse_args()
    results = [bench(name, args.workers, args.batches, args.steps, args.overrides) for name in args.experiments]
    print(json.dumps({"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "load_average_1min": round(os.getloadavg()[0], 2), "results": results}, indent=2))


if __name__ == "__main__":
    main()
