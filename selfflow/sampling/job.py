"""A sampling job: N samples of a checkpoint, their conditions and noise fixed by a seed, written to
a folder.

`load_sampling_model` reads a selfflow checkpoint, an export or the released checkpoint;
`SamplingPlan` says what to generate (conditions, solver, guidance, seed); `generate_batches` runs
it batch by batch and `SampleWriter` writes each batch's files as it comes (see
`selfflow.sampling.modalities` for what each modality writes). Sample `i`'s noise depends on (seed,
i) only, so the same seed gives the same samples for any batch size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfflow.interop.official import OFFICIAL_PREFIX
from selfflow.sampling import writers
from selfflow.sampling.chunks import ChunkStore
from selfflow.sampling.generate import (
    Generation,
    NoiseSource,
    autocast_dtype,
    sample_generators,
    sample_tokens,
)
from selfflow.sampling.modalities import ModalityIO, modality_io
from selfflow.sampling.prompted import prompt_text
from selfflow.sampling.refine import refine_tokens
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokens import NO_LABEL, Condition

RELEASED_GUIDANCE_INTERVAL = (0.0, 0.7)  # the released sampler guides at noise levels t <= 0.7 only
# sampler, steps and guidance interval when left unset: a selfflow checkpoint's quick look, and the
# released protocol for the released checkpoint and for every FID job (metrics=fid)
SAMPLING_DEFAULTS = {
    "model": ("euler", 50, (0.0, 1.0)),
    "official": ("sde", 250, RELEASED_GUIDANCE_INTERVAL),
    "fid": ("sde", 250, RELEASED_GUIDANCE_INTERVAL),
}
DEFAULT_SOLVERS = {kind: defaults[:2] for kind, defaults in SAMPLING_DEFAULTS.items()}


def sampling_defaults(
    checkpoint_kind: str,
    metrics: str | None,
) -> tuple[str, int, tuple[float, float]]:
    """(sampler, steps, guidance interval) for what the user left unset.

    Args:
        checkpoint_kind: "model" (a selfflow checkpoint) or "official" (the released one).
        metrics: the job's metrics kind; "fid" takes the released protocol whatever the checkpoint.

    Returns:
        The row of `SAMPLING_DEFAULTS` that applies.
    """
    return SAMPLING_DEFAULTS["fid" if metrics == "fid" else checkpoint_kind]


@dataclass
class SamplingModel:
    """A model ready to sample and what comes with it.

    Attributes:
        model: Has `velocity(x, t, pos, condition, modality)`, `num_classes` and `null_class`.
        tokenizers: Modality -> its tokenizer (and `text` for a text model).
        data_config: The run's data config (the metrics' real split); None for the released model.
        kind: `model` (a selfflow checkpoint or export) or `official` (the released checkpoint).
    """

    model: Any  # velocity(x, t, pos, condition, modality), num_classes, null_class
    tokenizers: dict[str, Tokenizer]
    data_config: Any  # the run's data config (the metrics' real split), None for the released model
    kind: str  # "model" or "official"


def load_sampling_model(
    ckpt: str, weights: str = "ema", vae: str | None = None, official_weights: str = "model"
) -> SamplingModel:
    """A selfflow checkpoint or export, or `official:PATH` for the released Self-Flow checkpoint.

    Args:
        ckpt: A .ckpt file, an export folder, or `official:PATH`.
        weights: `ema`, `online` or `ema_<decay>` (selfflow checkpoints only).
        vae: The VAE folder: required by the released checkpoint and by a latent model.
        official_weights: The released file's `model` entry (as the released sampler loads it) or
            `ema`.

    Returns:
        The model in eval mode with its tokenizers, data config and kind.
    """
    if ckpt.startswith(OFFICIAL_PREFIX):
        from selfflow.interop.official import load_official_for_sampling

        path = ckpt[len(OFFICIAL_PREFIX) :]
        model, tokenizers = load_official_for_sampling(path, vae, official_weights)
        return SamplingModel(model, tokenizers, None, "official")
    from selfflow.interop.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt, weights=weights, vae=vae)
    return SamplingModel(loaded.model, loaded.tokenizers, loaded.config.get("data"), "model")


def pick_modality(requested: str | None, tokenizers: dict[str, Any]) -> str:
    """The modality to sample: the one asked for, or the checkpoint's first.

    Args:
        requested: The `modality` key; None for the checkpoint's first modality.
        tokenizers: The checkpoint's tokenizers by modality.

    Returns:
        A modality the checkpoint has.

    Raises:
        ValueError: The checkpoint has no such modality.
    """
    if requested is None:
        return next(iter(tokenizers))
    if requested not in tokenizers:
        raise ValueError(
            f"modality={requested} is not in this checkpoint; it has {sorted(tokenizers)}"
        )
    return requested


BALANCED_LABELS = "balanced"  # labels=balanced: every class in turn (exactly N / classes each)
LABEL_SEED_OFFSET = 7919  # the label draw's stream, apart from the noise streams of the same seed


def drawn_labels(num_samples: int, num_classes: int, seed: int) -> Tensor:
    """[N] class ids drawn uniformly at random, as the released sampler does, fixed by `seed` alone
    (the same labels for any batch size or number of processes).

    Args:
        num_samples: N.
        num_classes: ids are drawn from 0..num_classes - 1.
        seed: the job's seed.

    Returns:
        [N] long tensor.
    """
    generator = torch.Generator().manual_seed(int(seed) + LABEL_SEED_OFFSET)
    return torch.randint(num_classes, (num_samples,), generator=generator)


def resolve_labels(
    labels,
    num_samples: int,
    num_classes: int,
    null_class: int,
    seed: int = 0,
) -> Tensor:
    """The N samples' class ids: given ids cycled to N; None: drawn uniformly at random from `seed`
    (the released protocol); "balanced": every class in turn; the null label for an unconditional
    model.

    Args:
        labels (int | str | Sequence[int] | None): The `labels` key: class ids (or the null label),
            None, or "balanced".
        num_samples: N, the samples to generate.
        num_classes: The model's classes (0 for an unconditional model).
        null_class: The model's null label.
        seed: The job's seed (the label draw).

    Returns:
        [N] long class ids.

    Raises:
        ValueError: `num_samples` < 1, or a label that is not a class id nor the null label.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if num_classes == 0 and (labels is None or labels == BALANCED_LABELS):
        return torch.full((num_samples,), null_class, dtype=torch.long)
    if labels is None:
        return drawn_labels(num_samples, num_classes, seed)
    if labels == BALANCED_LABELS:
        return torch.arange(num_samples) % num_classes
    labels = [
        int(v)
        for v in (
            labels if isinstance(labels, Sequence) and not isinstance(labels, str) else [labels]
        )
    ]
    bad = [v for v in labels if not (0 <= v < num_classes or v == null_class)]
    if not labels or bad:
        raise ValueError(
            f"labels={labels} must be class ids in 0..{num_classes - 1} (or {null_class}, the null "
            f"label); leave labels=null for uniformly drawn classes, or labels=balanced"
        )
    return torch.tensor(labels, dtype=torch.long).repeat(math.ceil(num_samples / len(labels)))[
        :num_samples
    ]


def size_rows(model, tokenizer, count: int) -> Tensor | None:
    """[count, 6] size conditioning of a multi-aspect model: an uncropped image of the size
    generated (None for a model without size conditioning).

    Args:
        model (nn.Module): The sampling model; size conditioning when it has a `size_embedder`.
        tokenizer (Tokenizer): The image tokenizer, whose `image_size` is generated.
        count: The rows.

    Returns:
        [count, 6] (height, width, crop top, crop left, height, width), or None.
    """
    if getattr(model, "size_embedder", None) is None:
        return None
    height, width = tokenizer.image_size
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(
        count, 1
    )


def sampling_condition(
    model,
    tokenizer,
    tokenizers: dict[str, Tokenizer],
    labels,
    num_samples: int,
    prompt=None,
    seed: int = 0,
) -> Condition:
    """The N samples' condition: class labels (`resolve_labels`: given ids cycled, else drawn from
    `seed`), the prompt for a text model (its label then conditions on nothing unless labels are
    given), size conditioning for a multi-aspect model.

    Args:
        model (nn.Module): The sampling model (`num_classes`, `null_class`).
        tokenizer (Tokenizer): The generated modality's tokenizer.
        tokenizers: Every tokenizer of the checkpoint (`text` for a text model).
        labels (int | str | Sequence[int] | None): Class ids cycled over the samples; None: drawn
            at random from `seed`; "balanced": every class in turn (or none for a text model).
        num_samples: N, the samples to generate.
        prompt (str | Sequence[str] | None): The caption, or captions cycled over the samples.
        seed: The job's seed (the label draw).

    Returns:
        The condition of the N samples.
    """
    text = prompt_text(tokenizers, prompt, num_samples)
    ids = resolve_labels(labels, num_samples, model.num_classes, model.null_class, seed)
    if text is not None and labels is None:  # text models: the caption is the condition
        ids = torch.full_like(ids, NO_LABEL)
    return Condition(labels=ids, text=text, sizes=size_rows(model, tokenizer, num_samples))


def solver_options(sampler: str, sde_last_step: float, sde_last_step_mode: str) -> dict[str, Any]:
    """The solver's own settings: the sde sampler's last step (level and form).

    Args:
        sampler: The solver's name.
        sde_last_step: The level where the SDE's stochastic steps end.
        sde_last_step_mode: `mean` or `euler`, the SDE's last step.

    Returns:
        Keyword arguments for the solver (empty for the ODE solvers).
    """
    return (
        {"last_step": sde_last_step, "last_step_mode": sde_last_step_mode}
        if sampler == "sde"
        else {}
    )


def batches(count: int, size: int) -> list[range]:
    """Consecutive index ranges of at most `size` covering range(count).

    Args:
        count: The indices to cover.
        size: The batch size.

    Returns:
        The ranges in order; the last may be shorter.

    Raises:
        ValueError: `size` < 1.
    """
    if size < 1:
        raise ValueError(f"batch_size={size} must be >= 1")
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


@dataclass(kw_only=True)
class SamplingPlan:
    """What to generate: the samples' condition (N rows), the solver and guidance, the noise seed.

    Attributes:
        tokenizer: The generated modality's tokenizer (positions, channels, decoding).
        condition: The N samples' condition; its batch size is the number of samples.
        solver: `euler`, `heun` or `sde`.
        steps: Velocity evaluations per sample (NFE).
        cfg_scale: The guidance scale; 1 is no guidance.
        guidance_interval: (lo, hi) the noise levels where guidance applies.
        shift: Warps the solver's levels toward noise for shift > 1.
        solver_options: The solver's own settings (see `solver_options`).
        precision: `auto`, `bf16` or `fp32` autocast of the model calls.
        seed: Sample i's noise depends on (seed, i) only.
        batch_size: Samples per model batch.
        init: A raw sample to refine (noised to `strength`) instead of starting from noise; None for
            none.
        strength: The level `init` is noised to.
    """

    tokenizer: Tokenizer
    condition: Condition
    solver: str = "euler"
    steps: int = 50
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    shift: float = 1.0
    solver_options: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    seed: int = 0
    batch_size: int = 32
    init: Tensor | None = (
        None  # refine this raw sample (noised to `strength`) instead of starting from noise
    )
    strength: float = 0.3

    @property
    def num_samples(self) -> int:
        return self.condition.batch_size

    @property
    def nfe(self) -> int:
        """Model evaluations per sample: `steps` (none when refining at strength 0)."""
        return 0 if self.init is not None and self.strength == 0 else self.steps


def generate_batches(
    model,
    plan: SamplingPlan,
    on_evaluation: Callable[[], None] | None = None,
    parts: list[range] | None = None,
) -> Iterator[tuple[range, Tensor, Generation]]:
    """(indices, decoded samples, generation) of each batch of the plan (or of `parts`, a subset of
    its indices).

    Args:
        model (nn.Module): The sampling model: `velocity(x, t, pos, condition, modality)`,
            `num_classes`, `null_class`.
        plan: What to generate.
        on_evaluation: Called once per velocity evaluation (progress reporting).
        parts: Index ranges to generate; None for every batch of the plan.

    Yields:
        (indices, decoded float samples, the batch's generation) per batch.
    """
    for part in parts if parts is not None else batches(plan.num_samples, plan.batch_size):
        condition = plan.condition.select(slice(part.start, part.stop))
        noise = NoiseSource(generators=sample_generators(plan.seed, part))
        options = {
            "cfg_scale": plan.cfg_scale,
            "guidance_interval": plan.guidance_interval,
            "noise": noise,
            "shift": plan.shift,
            "precision": plan.precision,
            "on_evaluation": on_evaluation,
        }
        if plan.init is None:
            out = sample_tokens(
                model,
                plan.tokenizer,
                condition,
                plan.steps,
                plan.solver,
                **options,
                **plan.solver_options,
            )
        else:  # refinement: start from the init sample noised to level `strength`
            out = refine_tokens(
                model,
                plan.tokenizer,
                plan.init.expand(len(part), *plan.init.shape),
                plan.strength,
                condition,
                plan.steps,
                plan.solver,
                **options,
            )
        yield part, plan.tokenizer.decode(out.tokens).float(), out


def job_settings(
    model,
    tokenizer: Tokenizer,
    modality: str,
    plan: SamplingPlan,
    device: torch.device,
    chunk_size: int,
    requests: dict[str, Any],
) -> dict[str, Any]:
    """What decides a job's samples, as job.json keeps it: the weights (by content), the tokenizer
    (a VAE by its fingerprint), the solver, guidance, precision as resolved on `device`, seed, count
    and chunking, and what the user asked for (`requests`: labels, prompt, size, ...). A restart
    with other settings is refused.

    Args:
        model (nn.Module): The sampling model: `velocity(x, t, pos, condition, modality)`,
            `num_classes`, `null_class`.
        tokenizer: The generated modality's tokenizer.
        modality: The generated modality.
        plan: What is generated.
        device: Where the model runs (resolves the precision).
        chunk_size: Samples per chunk file.
        requests: What the user asked for (labels, prompt, size, ...), kept as given.

    Returns:
        The settings, JSON-able.
    """
    autocast = autocast_dtype(device, plan.precision)
    return {
        "model_sha256": state_digest(model),
        "tokenizer": type(tokenizer).__name__,
        "vae_fingerprint": getattr(tokenizer, "fingerprint", None),
        "modality": modality,
        "num_samples": plan.num_samples,
        "chunk_size": chunk_size,
        "sampler": plan.solver,
        "steps": plan.steps,
        "solver_options": plan.solver_options,
        "cfg_scale": plan.cfg_scale,
        "guidance_interval": list(plan.guidance_interval),
        "shift": plan.shift,
        "autocast": "bf16" if autocast is torch.bfloat16 else "fp32",
        "seed": plan.seed,
        "strength": plan.strength if plan.init is not None else None,
        **requests,
    }


def state_digest(module: torch.nn.Module) -> str:
    """sha256 of a model's tensors (names, dtypes, shapes, bytes): which weights sample, wherever
    the file lies.

    Args:
        module: The model.

    Returns:
        The hex digest of its state_dict.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()


def stored_form(io: ModalityIO, samples: Tensor) -> np.ndarray:
    """Decoded samples as a chunk keeps them: images as their uint8 pixels [B, C, H, W] (what every
    image file and samples.npz hold), other modalities as float32.

    Args:
        io: The modality's file handling (`arrays`: stored as uint8 pixels).
        samples: Decoded samples, images in [0, 1].

    Returns:
        The samples as the chunk file keeps them.
    """
    return writers.quantize(samples).cpu().numpy() if io.arrays else samples.float().cpu().numpy()


def decoded_form(io: ModalityIO, stored: np.ndarray) -> Tensor:
    """A chunk's samples as the writers and metrics take them: float, images in [0, 1].

    Args:
        io: The modality's file handling.
        stored: The samples as a chunk file keeps them.

    Returns:
        Float samples, images in [0, 1].
    """
    samples = torch.from_numpy(stored)
    return samples.float() / 255 if io.arrays else samples


def sample_chunks(
    model,
    plan: SamplingPlan,
    store: ChunkStore,
    chunks: list[int],
    writer: SampleWriter,
    on_evaluation: Callable[[], None] | None = None,
) -> int:
    """Sample the given chunks batch by batch (per-sample files as each batch comes), then write
    each chunk's file; returns the model forward passes taken.

    Args:
        model (nn.Module): The sampling model: `velocity(x, t, pos, condition, modality)`,
            `num_classes`, `null_class`.
        plan: What the job generates.
        store: The job's chunk files.
        chunks: The chunk numbers to sample (those not written yet).
        writer: Writes the per-sample files.
        on_evaluation: Called once per velocity evaluation (progress reporting).

    Returns:
        The model forward passes taken.
    """
    model_calls = 0
    for chunk in chunks:
        indices = store.ranges[chunk]
        parts = [
            range(indices.start + b.start, indices.start + b.stop)
            for b in batches(len(indices), plan.batch_size)
        ]
        stored = []
        for part, decoded, out in generate_batches(model, plan, on_evaluation, parts):
            writer.add(decoded, part)
            stored.append(stored_form(writer.io, decoded))
            model_calls += out.model_calls
        store.write(
            chunk, plan.condition.labels[indices.start : indices.stop], np.concatenate(stored)
        )
    return model_calls


class SampleWriter:
    """Per-sample files as each batch comes (unless `per_sample_files` is off), then, from the job's
    chunk files, a preview picture and (images) samples.npz.

    Args:
        modality: The generated modality.
        tokenizer: Its tokenizer (decoding details the writers need, e.g. the sample rate).
        out_dir: The job's folder.
        upscale: Pixel repeat of the per-sample pictures.
        grid_upscale: Pixel repeat of the preview picture.
        grid_max: The most samples in the preview.
        per_sample_files: Write one file per sample.
    """

    def __init__(
        self,
        modality: str,
        tokenizer: Tokenizer,
        out_dir: Path,
        upscale: int = 1,
        grid_upscale: int = 4,
        grid_max: int = 100,
        per_sample_files: bool = True,
    ):
        self.io, self.tokenizer, self.out_dir = modality_io(modality), tokenizer, Path(out_dir)
        self.upscale, self.grid_upscale, self.grid_max = upscale, grid_upscale, grid_max
        self.per_sample_files = per_sample_files

    def add(self, samples: Tensor, indices: range) -> None:
        """Write one batch's per-sample files, named by their index (000042).

        Args:
            samples: The batch's decoded samples.
            indices: Their indices in the job.
        """
        if self.per_sample_files:
            self.io.write(
                samples,
                self.out_dir / self.io.folder,
                [f"{i:06d}" for i in indices],
                self.tokenizer,
                self.upscale,
            )

    def finish(
        self,
        store: ChunkStore,
        labels: Tensor,
        nrow: int | None,
        visit: Callable[[Tensor, Tensor], None] | None = None,
    ) -> dict[str, Path]:
        """Read the chunks in index order, one at a time: the first `grid_max` samples make the
        preview, images stream into samples.npz (uint8 [N, H, W, 3] under arr_0, and labels), and
        `visit(samples, labels)` sees every chunk (metrics). Returns the files written, by kind.

        Args:
            store: The job's chunk files, all written.
            labels: [N] the job's labels, checked against each chunk's.
            nrow: Samples per row of the preview; None for a square-ish grid.
            visit: Called with (samples, labels) of every chunk; None for nothing.

        Returns:
            Kind (`npz`, the per-sample folder, the preview) -> its path.

        Raises:
            ValueError: A chunk holds other labels than the job's.
        """
        sample_shape = tuple(store.sample_header(0).shape[1:])
        preview: list[Tensor] = []
        chunks = self.read_chunks(store, labels, sample_shape, preview, visit)
        files: dict[str, Path] = {}
        if self.io.arrays:
            _, height, width = sample_shape
            files["npz"] = writers.write_npz_streamed(
                self.out_dir / "samples.npz",
                (writers.rgb_rows(stored) for stored in chunks),
                (len(labels), height, width, 3),
                np.dtype(np.uint8),
                {"labels": labels.cpu().numpy().astype(np.int64)},
            )
        else:
            for _ in chunks:
                pass
        if self.per_sample_files:
            files[self.io.folder] = self.out_dir / self.io.folder
        if self.io.preview_name is not None:
            files[Path(self.io.preview_name).stem] = self.io.preview(
                torch.cat(preview),
                self.out_dir / self.io.preview_name,
                self.tokenizer,
                nrow=nrow,
                upscale=self.grid_upscale,
            )
        return files

    def read_chunks(
        self,
        store: ChunkStore,
        labels: Tensor,
        sample_shape: tuple[int, ...],
        preview: list[Tensor],
        visit: Callable[[Tensor, Tensor], None] | None,
    ) -> Iterator[np.ndarray]:
        """Each chunk's stored samples in index order, its labels checked against the job's; the
        first `grid_max` samples are appended to `preview` and `visit` sees every chunk on the way.

        Args:
            store: The job's chunk files.
            labels: [N] the job's labels.
            sample_shape: One stored sample's shape.
            preview: Collects the preview's samples.
            visit: Called with (samples, labels) of every chunk; None for nothing.

        Yields:
            Each chunk's samples as stored.
        """
        dtype = np.dtype(np.uint8 if self.io.arrays else np.float32)
        for chunk, indices in enumerate(store.ranges):
            chunk_labels, stored = store.read(chunk, sample_shape, dtype)
            if chunk_labels.tolist() != labels[indices.start : indices.stop].tolist():
                raise ValueError(
                    f"{store.path(chunk)} holds other labels than this job's; delete it and run "
                    f"the job again to resample it"
                )
            samples = decoded_form(self.io, stored)
            room = self.grid_max - sum(len(p) for p in preview)
            if room > 0:
                preview.append(samples[:room])
            if visit is not None:
                visit(samples, torch.from_numpy(chunk_labels))
            yield stored
