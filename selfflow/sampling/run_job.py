"""selfflow-sample's job from start to end, in each process of a launch: load the checkpoint, plan
the samples, sample the chunks not on disk yet, then (rank 0) write samples.npz, the preview,
sampling.json and the metrics.

The steps are named functions of this module; `selfflow.sampling.job` holds the parts they use
(plan, batches, writer). What is measured comes in as a `JobMetrics` (selfflow.evaluation builds
them), so that sampling imports nothing above it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from selfflow.io.digests import file_digest
from selfflow.io.safe_files import write_json_atomically
from selfflow.sampling.chunks import ChunkStore
from selfflow.sampling.job import (
    SampleWriter,
    SamplingModel,
    SamplingPlan,
    batches,
    job_settings,
    load_sampling_model,
    pick_modality,
    sample_chunks,
    sampling_condition,
    sampling_defaults,
    solver_options,
)
from selfflow.sampling.modalities import load_init, tokenizer_at_length
from selfflow.sampling.ranks import (
    ProcessGroup,
    Ranks,
    launcher_ranks,
    process_device,
    process_group,
)
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokens import Condition

COMMAND = "selfflow-sample"


@dataclass(kw_only=True)
class SampleRequest:
    """What the user asked selfflow-sample for, as plain values (conf/sample.yaml says what each
    key means); None leaves a choice to the checkpoint's defaults.

    Attributes:
        ckpt: A .ckpt file, an export folder, or `official:PATH`.
        weights: `ema`, `online` or `ema_<decay>`.
        official_weights: The released file's `model` or `ema` entry; None for `model`.
        vae: The VAE folder of a latent model.
        modality: The modality to sample; None for the checkpoint's first.
        metrics: The metrics kind: None, `reference` or `fid` (`fid` takes the released protocol).
        num_samples: N.
        labels: Class ids, None (drawn from the seed) or `balanced`.
        prompt: A caption or captions (text models).
        lengths: `size`, `duration`, `frames` -> the value asked for (None: the trained one).
        sampler: `euler`, `heun` or `sde`; None for the default.
        steps: Model evaluations per sample; None for the default.
        cfg_scale: The guidance scale.
        guidance_interval: (lo, hi) noise levels with guidance; None for the default.
        shift: The time grid's warp toward noise.
        sde_last_step: The sde sampler's last level.
        sde_last_step_mode: `mean` or `euler`.
        precision: `auto`, `bf16` or `fp32`.
        seed: Fixes the noise and drawn labels.
        batch_size: Samples per model call.
        chunk_size: Samples per chunk file.
        init: A file to refine instead of starting from noise; None for none.
        strength: The level `init` is noised to.
        device: `auto`, `cpu`, `cuda`, ...
        out_dir: The job's folder.
        upscale: Pixel repeat of the per-sample pictures.
        grid_upscale: Pixel repeat of the preview.
        grid_max: The most samples in the preview.
        per_sample_files: Write one file per sample.
        keep_parts: Keep the chunk files after samples.npz is written.
        progress: Show a progress bar.
    """

    ckpt: str
    weights: str = "ema"
    official_weights: str | None = None
    vae: str | None = None
    modality: str | None = None
    metrics: str | None = None
    num_samples: int = 64
    labels: Any = None
    prompt: Any = None
    lengths: dict[str, Any]
    sampler: str | None = None
    steps: int | None = None
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    shift: float = 1.0
    sde_last_step: float = 0.04
    sde_last_step_mode: str = "mean"
    precision: str = "auto"
    seed: int = 0
    batch_size: int = 32
    chunk_size: int = 250
    init: str | None = None
    strength: float = 0.3
    device: str = "auto"
    out_dir: str
    upscale: int = 1
    grid_upscale: int = 4
    grid_max: int = 100
    per_sample_files: bool = True
    keep_parts: bool = True
    progress: bool = True


class JobMetrics(Protocol):
    """What a sampling job measures, in the order the job calls it; `visit` sees every chunk."""

    def before_loading(self, out_dir: Path, device: torch.device) -> None:
        """Check the metric's own inputs before the checkpoint loads."""

    def check_modality(self, modality: str) -> None:
        """Refuse a modality the metric cannot measure."""

    def prepare(self, loaded: SamplingModel, modality: str, device: torch.device) -> None:
        """Rank 0, before sampling: the extractor and the real data's side."""

    def visit(self, samples: Tensor, labels: Tensor) -> None:
        """Rank 0: one chunk of decoded samples and their labels."""

    def finish(self, out_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
        """Rank 0, after samples.npz: compute, write and print the numbers of the job `summary`
        describes; returns them."""


@dataclass(kw_only=True)
class PlannedJob:
    """A job ready to sample: the model and what it generates, with the settings job.json keeps.

    Attributes:
        loaded: The model and its tokenizers.
        modality: The generated modality.
        tokenizer: Its tokenizer at the asked length, on the job's device.
        plan: What to generate.
        settings: What decides the samples (a restart with others is refused).
    """

    loaded: SamplingModel
    modality: str
    tokenizer: Tokenizer
    plan: SamplingPlan
    settings: dict[str, Any]

    @property
    def condition(self) -> Condition:
        return self.plan.condition


def run_sampling_job(request: SampleRequest, metrics: JobMetrics | None = None) -> dict[str, Any]:
    """Run the job in this process of a launch (torchrun, SLURM, or one process).

    Args:
        request: What to sample.
        metrics: What to measure on rank 0; None for nothing.

    Returns:
        The summary rank 0 writes to sampling.json.
    """
    ranks = launcher_ranks()
    device = process_device(ranks, request.device)
    with process_group(ranks, device) as group:
        return sample_in_group(request, metrics, ranks, device, group)


def sample_in_group(
    request: SampleRequest,
    metrics: JobMetrics | None,
    ranks: Ranks,
    device: torch.device,
    group: ProcessGroup,
) -> dict[str, Any]:
    """The job's steps in one process of the group.

    Args:
        request: What to sample.
        metrics: What to measure on rank 0; None for nothing.
        ranks: This process's place in the launch.
        device: This process's device.
        group: The launch's processes (barriers and sums).

    Returns:
        The job's summary (rank 0 writes it to sampling.json).
    """
    out_dir = Path(request.out_dir)
    group.check_same(str(out_dir.resolve()), "out_dir")
    if metrics is not None:
        metrics.before_loading(out_dir, device)
    job = plan_job(request, metrics, device)
    model = job.loaded.model.to(device).eval()
    if metrics is not None and ranks.is_main:
        metrics.prepare(job.loaded, job.modality, device)
    store = ChunkStore(out_dir, job.plan.num_samples, request.chunk_size)
    if store.check_settings(job.settings) and ranks.is_main:
        store.write_settings(job.settings, {"ckpt": str(request.ckpt), "weights": request.weights})
    todo = store.missing()
    group.barrier()  # every process has listed the chunks on disk before any is written
    mine = todo[ranks.rank :: ranks.world]
    writer = SampleWriter(
        job.modality,
        job.tokenizer,
        out_dir,
        request.upscale,
        request.grid_upscale,
        request.grid_max,
        request.per_sample_files,
    )
    started = time.perf_counter()
    model_calls = sample_my_chunks(model, job.plan, store, mine, writer, request, ranks)
    seconds = time.perf_counter() - started
    # returns once every process has written its chunks
    model_calls, sampled = group.sum([model_calls, len(mine)])
    counts = {"model_calls": model_calls, "sampled": sampled, "chunks": len(store.ranges)}
    summary = job_summary(request, job, counts, ranks, device, seconds)
    if not ranks.is_main:
        return summary
    write_job_files(request, job, model, store, writer, metrics, summary)
    report(request, job, counts, ranks, seconds)
    if metrics is not None:
        summary["metrics"] = metrics.finish(out_dir, summary)
    return summary


def plan_job(request: SampleRequest, metrics: JobMetrics | None, device) -> PlannedJob:
    """Load the checkpoint and resolve what the request leaves open: the modality, the tokenizer's
    length, then the plan.

    Args:
        request: What to sample.
        metrics: Checks the modality; None for no metrics.
        device (torch.device): Where the tokenizer and init go.

    Returns:
        The planned job.
    """
    official_weights = request.official_weights or "model"
    loaded = load_sampling_model(str(request.ckpt), request.weights, request.vae, official_weights)
    modality = pick_modality(request.modality, loaded.tokenizers)
    if metrics is not None:
        metrics.check_modality(modality)
    tokenizer = tokenizer_at_length(loaded.tokenizers[modality], modality, request.lengths)
    tokenizer = tokenizer.to(device)
    plan = sampling_plan(request, loaded, tokenizer, device)
    init_digest = file_digest(Path(request.init).expanduser()) if request.init else None
    asked = {"labels": request.labels, "prompt": request.prompt, **request.lengths}
    requests = {**asked, "init_sha256": init_digest}
    settings = job_settings(
        loaded.model,
        tokenizer,
        modality,
        plan,
        device,
        request.chunk_size,
        requests,
    )
    return PlannedJob(
        loaded=loaded,
        modality=modality,
        tokenizer=tokenizer,
        plan=plan,
        settings=settings,
    )


def sampling_plan(
    request: SampleRequest,
    loaded: SamplingModel,
    tokenizer: Tokenizer,
    device: torch.device,
) -> SamplingPlan:
    """The plan: the request's solver settings (the checkpoint's defaults where it leaves them
    open), the samples' condition, the init sample.

    Args:
        request: What to sample.
        loaded: The checkpoint (its kind picks the defaults).
        tokenizer: The generated modality's tokenizer, on `device`.
        device: Where the init sample goes.

    Returns:
        The plan.
    """
    sampler, steps, interval = sampling_defaults(loaded.kind, request.metrics)
    sampler, steps = request.sampler or sampler, int(request.steps or steps)
    if request.guidance_interval is not None:
        interval = tuple(request.guidance_interval)
    condition = sampling_condition(
        loaded.model,
        tokenizer,
        loaded.tokenizers,
        request.labels,
        request.num_samples,
        request.prompt,
        request.seed,
    )
    return SamplingPlan(
        tokenizer=tokenizer,
        condition=condition,
        solver=sampler,
        steps=steps,
        cfg_scale=request.cfg_scale,
        guidance_interval=interval,
        shift=request.shift,
        solver_options=solver_options(sampler, request.sde_last_step, request.sde_last_step_mode),
        precision=request.precision,
        seed=request.seed,
        batch_size=request.batch_size,
        init=load_init(request.init, tokenizer).to(device) if request.init else None,
        strength=request.strength,
    )


def sample_my_chunks(
    model,
    plan: SamplingPlan,
    store: ChunkStore,
    mine: list[int],
    writer: SampleWriter,
    request: SampleRequest,
    ranks: Ranks,
) -> int:
    """Sample this process's chunks under a progress bar (rank 0, when asked).

    Args:
        model (nn.Module): The sampling model on the job's device.
        plan: What to generate.
        store: The job's chunk files.
        mine: The chunks this process samples.
        writer: Writes the per-sample files.
        request: The job's request (`progress`, the solver's name).
        ranks: This process's place in the launch.

    Returns:
        The model forward passes taken.
    """
    from rich.progress import Progress

    with Progress(disable=not (request.progress and ranks.is_main), transient=True) as progress:
        batches_left = sum(len(batches(len(store.ranges[k]), plan.batch_size)) for k in mine)
        title = f"sampling ({plan.solver}, {plan.steps} steps)"
        task = progress.add_task(title, total=batches_left * plan.nfe)

        def advance() -> None:
            progress.advance(task)

        return sample_chunks(model, plan, store, mine, writer, on_evaluation=advance)


def job_summary(
    request: SampleRequest,
    job: PlannedJob,
    counts: dict[str, int],
    ranks: Ranks,
    device: torch.device,
    seconds: float,
) -> dict[str, Any]:
    """sampling.json: the settings as resolved, the work done and where.

    Args:
        request: What was asked.
        job: What was planned.
        counts: `model_calls`, `sampled` (chunks sampled now) and `chunks` (all of them).
        ranks: The launch (its world size).
        device: This process's device.
        seconds: The sampling's wall time in this process.

    Returns:
        The summary.
    """
    plan, tokenizer = job.plan, job.tokenizer
    sized = job.modality == "image" and hasattr(tokenizer, "image_size")
    official = job.loaded.kind == "official"
    return {
        "ckpt": str(request.ckpt),
        "weights": request.weights,
        "official_weights": (request.official_weights or "model") if official else None,
        "modality": job.modality,
        "num_samples": request.num_samples,
        "sampler": plan.solver,
        **{f"sde_{k}": v for k, v in plan.solver_options.items()},
        "steps": plan.steps,
        "nfe": plan.nfe,
        "model_forward_passes": counts["model_calls"],
        "cfg_scale": request.cfg_scale,
        "guidance_interval": list(plan.guidance_interval),
        "shift": request.shift,
        "seed": request.seed,
        "batch_size": request.batch_size,
        "chunk_size": request.chunk_size,
        "chunks": counts["chunks"],
        "chunks_sampled": counts["sampled"],
        "processes": ranks.world,
        "device": str(device),
        "seconds": round(seconds, 3),
        "labels": job.condition.labels.tolist(),
        "prompt": request.prompt,
        "size": list(tokenizer.image_size) if sized else None,
        "init": request.init,
        "strength": request.strength if request.init else None,
    }


def write_job_files(
    request: SampleRequest,
    job: PlannedJob,
    model,
    store: ChunkStore,
    writer: SampleWriter,
    metrics: JobMetrics | None,
    summary: dict[str, Any],
) -> None:
    """Rank 0, once every chunk is on disk: samples.npz and the preview (metrics see each chunk),
    the chunk files kept or removed, sampling.json.

    Args:
        request: What was asked (`labels`, `keep_parts`, `out_dir`).
        job: What was planned.
        model (nn.Module): The sampling model (its classes set the preview's rows).
        store: The job's chunk files, all written.
        writer: Writes samples.npz and the preview.
        metrics: Visits every chunk; None for no metrics.
        summary: The job's summary; gains the files written, then goes to sampling.json.
    """
    guided = model.num_classes > 0 and request.labels == "balanced"  # a grid row per class
    files = writer.finish(
        store,
        job.condition.labels,
        nrow=min(model.num_classes, 10) if guided else None,
        visit=None if metrics is None else metrics.visit,
    )
    summary["files"] = {k: str(v) for k, v in files.items()}
    if not request.keep_parts:
        store.remove()
    else:
        store.remove_temporary()
    write_json_atomically(Path(request.out_dir) / "sampling.json", summary)


def report(
    request: SampleRequest,
    job: PlannedJob,
    counts: dict[str, int],
    ranks: Ranks,
    seconds: float,
) -> None:
    """Print what was sampled, with how much work and where the files are.

    Args:
        request: What was asked.
        job: What was planned.
        counts: `model_calls`, `sampled` and `chunks`, as `job_summary` takes them.
        ranks: The launch (its world size).
        seconds: The sampling's wall time.
    """
    chunks, sampled = counts["chunks"], counts["sampled"]
    resumed = f", {chunks - sampled} of {chunks} chunks were on disk" if sampled < chunks else ""
    processes = f"{ranks.world} process{'es' if ranks.world > 1 else ''}"
    work = f"{counts['model_calls']} model forward passes, {processes}{resumed}"
    what = f"{request.num_samples} {job.modality} samples, sampler={job.plan.solver}"
    took = f"NFE={job.plan.nfe} per sample ({work}), {seconds:.1f} s"
    print(f"{COMMAND}: {what}, {took}; outputs in {Path(request.out_dir).resolve()}")
