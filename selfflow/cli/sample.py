"""selfflow-sample: generate from a checkpoint with an ODE or SDE solver, guidance, and a fixed seed.

  selfflow-sample ckpt=runs/.../checkpoints/last.ckpt num_samples=64 sampler=heun steps=50 cfg_scale=2
  selfflow-sample ckpt=... labels=[3,3,7] guidance_interval=[0.1,0.8] seed=1 out_dir=samples/run1
  selfflow-sample ckpt=... metrics=true reference=refs/digits    # metrics.json: FD and classifier accuracy
  selfflow-sample ckpt=official:selfflow_imagenet256.pt vae=sd-vae-ft-ema num_samples=8   # the released model
  selfflow-sample ckpt=... size=[24,40]     # a multi-aspect (size-conditioned) model at any bucket's size
  selfflow-sample ckpt=... duration=2.0     # audio clips of another length (whole time patches)
  selfflow-sample ckpt=... frames=16        # video clips of another frame count (whole tubelets)

Writes into out_dir: per-sample files (images/*.png, videos/*.mp4 + contact_sheet.png, audio/*.wav + *.png),
grid.png and samples.npz (uint8 [N, H, W, 3] under arr_0) for images, sampling.json (settings, NFE, timing),
and metrics.json with metrics=true.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from selfflow.cli.errors import friendly_errors
from selfflow.interop.official import OFFICIAL_PREFIX

DEFAULTS = {"model": ("euler", 50), "official": ("sde", 250)}  # sampler and steps when left null


@dataclass
class SamplingModel:
    model: Any  # velocity(x, t, pos, labels, modality), null_class, num_classes
    tokenizers: dict[str, Any]
    data_config: Any  # the run's data config (for the metrics' real split), None for the released model
    kind: str  # "model" or "official"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
    return device


def load_sampling_model(cfg: DictConfig) -> SamplingModel:
    ckpt = str(cfg.ckpt)
    if ckpt.startswith(OFFICIAL_PREFIX):
        from selfflow.interop.official import load_official_for_sampling

        model, tokenizers = load_official_for_sampling(ckpt[len(OFFICIAL_PREFIX):], cfg.vae)
        return SamplingModel(model, tokenizers, None, "official")
    from selfflow.interop.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt, weights=cfg.weights, vae=cfg.vae)
    return SamplingModel(loaded.model, loaded.tokenizers, loaded.config.get("data"), "model")


def pick_modality(requested: str | None, tokenizers: dict[str, Any]) -> str:
    if requested is None:
        return next(iter(tokenizers))
    if requested not in tokenizers:
        raise ValueError(f"modality={requested} is not in this checkpoint; it has {sorted(tokenizers)}")
    return requested


def resolve_labels(labels, num_samples: int, num_classes: int, null_class: int) -> torch.Tensor:
    """Given class ids cycled to num_samples, or all classes round-robin, or the null label if unconditional."""
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if labels is None:
        if num_classes == 0:
            return torch.full((num_samples,), null_class, dtype=torch.long)
        return torch.arange(num_samples) % num_classes
    labels = [int(v) for v in (labels if isinstance(labels, (list, tuple)) or OmegaConf.is_list(labels) else [labels])]
    bad = [v for v in labels if not (0 <= v < num_classes or v == null_class)]
    if not labels or bad:
        raise ValueError(f"labels={labels} must be class ids in 0..{num_classes - 1} (or {null_class}, the null "
                         f"label); leave labels=null for all classes round-robin")
    return torch.tensor(labels, dtype=torch.long).repeat(math.ceil(num_samples / len(labels)))[:num_samples]


def tokenizer_at_size(tokenizer, modality: str, size) -> Any:
    """The tokenizer that generates images of `size` [H, W] (or S for S x S) pixels; null keeps the trained size."""
    if size is None:
        return tokenizer
    from selfflow.tokenizers.image import ImagePatchTokenizer

    values = list(size) if isinstance(size, (list, tuple)) or OmegaConf.is_list(size) else [size, size]
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"size={values if len(values) != 2 else size} must be [height, width] in pixels, "
                         f"e.g. size=[24,40]")
    if modality != "image" or type(tokenizer) is not ImagePatchTokenizer:
        raise ValueError(f"size= is for pixel-space image checkpoints; this one samples {modality} with "
                         f"{type(tokenizer).__name__}, at its trained size only")
    (height, width), patch = values, tokenizer.patch_size
    if height % patch or width % patch:
        near = [-(-v // patch) * patch for v in (height, width)]  # rounded up
        raise ValueError(f"size=[{height}, {width}] must be whole patches: multiples of the checkpoint's "
                         f"tokenizer.image.patch_size={patch}, e.g. size=[{near[0]},{near[1]}]")
    return ImagePatchTokenizer(patch, tokenizer.channels, (height, width))


def tokenizer_at_length(tokenizer, modality: str, cfg: DictConfig) -> Any:
    """The tokenizer that generates audio of `duration=` seconds or video of `frames=` frames; null keeps the
    trained length."""
    for key, wanted, unit in (("duration", "audio", "seconds, e.g. duration=2.0"), ("frames", "video",
                                                                                  "frames, e.g. frames=16")):
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{key}={value!r} must be a positive number of {unit}")
        if modality != wanted or not hasattr(tokenizer, "at_length"):
            raise ValueError(f"{key}= is for {wanted} checkpoints with a pixel or log-mel tokenizer; this one samples "
                             f"{modality} with {type(tokenizer).__name__}, at its trained length only")
        try:
            return tokenizer.at_length(value)
        except ValueError as error:
            raise ValueError(f"{key}={value}: {error}") from None
    return tokenizer


def size_rows(model, tokenizer, count: int) -> torch.Tensor | None:
    """[count, 6] size conditioning of a multi-aspect model: an uncropped image of the size generated (None for a
    model without size conditioning)."""
    if getattr(model, "size_embedder", None) is None:
        return None
    height, width = tokenizer.image_size
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(count, 1)


def build_metrics(cfg: DictConfig, loaded: SamplingModel, device: torch.device, modality: str = "image"):
    """(extractor, accumulator of the real data's features) for metrics=true, else (None, None)."""
    if not cfg.metrics:
        return None, None
    from hydra.utils import instantiate

    from selfflow.evaluation.reference_classifier import load_reference_classifier
    from selfflow.evaluation.sample_metrics import dataset_features
    from selfflow.safe_config import instantiate_stored

    if cfg.feature_extractor is not None:
        extractor = instantiate(cfg.feature_extractor)
    elif cfg.reference is not None:
        extractor = load_reference_classifier(cfg.reference, device)
        if extractor.modality != modality:
            raise ValueError(f"reference={cfg.reference} judges {extractor.modality}, but this run samples {modality}; "
                             f"train one on the run's data: tools/train_reference_classifier.py --out DIR "
                             f"<the run's data overrides>")
    else:
        raise ValueError("metrics=true needs reference=PATH (a folder from tools/train_reference_classifier.py) "
                         "or feature_extractor={_target_: ...}")
    data = cfg.metrics_data
    if data is None:
        if loaded.data_config is None or "dataset" not in loaded.data_config:
            raise ValueError("metrics=true cannot find real images: this checkpoint stores no data config; pass "
                             "metrics_data={_target_: ...} (a dataset of (image, label))")
        dataset = instantiate_stored(loaded.data_config.dataset, f"checkpoint {cfg.ckpt}", "data.dataset")
        real_set = dataset(split="test")
    else:  # typed by the user
        real_set = instantiate(data)
    real = dataset_features(extractor, real_set, limit=cfg.metrics_max_real)
    return extractor, real


def solver_options(cfg: DictConfig, sampler: str) -> dict[str, Any]:
    """The solver's own settings from the config: the sde sampler's last step (level and form)."""
    if sampler != "sde":
        return {}
    return {"last_step": cfg.sde_last_step, "last_step_mode": cfg.sde_last_step_mode}


def batches(count: int, size: int) -> list[range]:
    if size < 1:
        raise ValueError(f"batch_size={size} must be >= 1")
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


class SampleWriter:
    """Writes each decoded batch as it comes (per-sample files; uint8 pixels kept for the NPZ and the grid)."""

    def __init__(self, modality: str, tokenizer, out_dir: Path, cfg: DictConfig):
        self.modality, self.tokenizer, self.out_dir, self.cfg = modality, tokenizer, out_dir, cfg
        self.pixels: list[np.ndarray] = []
        self.preview: list[torch.Tensor] = []
        self.files: dict[str, list[Path]] = {}

    def add(self, samples: torch.Tensor, indices: range) -> None:
        from selfflow.sampling import writers

        names = [f"{i:06d}" for i in indices]
        room = max(0, self.cfg.grid_max - sum(len(p) for p in self.preview))
        if room:
            self.preview.append(samples[:room].cpu())
        if self.modality == "image":
            written = {"images": writers.save_image_files(samples, self.out_dir / "images", names, self.cfg.upscale)}
            self.pixels.append(writers.to_uint8(samples))
        elif self.modality == "video":
            written = {"videos": writers.save_video_files(samples, self.out_dir / "videos", names, self.tokenizer.fps)}
        elif self.modality == "audio":
            written = writers.save_audio_files(samples, self.out_dir / "audio", names, self.tokenizer.sample_rate)
        else:
            raise ValueError(f"no writer for modality {self.modality!r}")
        for key, paths in written.items():
            self.files.setdefault(key, []).extend(paths)

    def finish(self, labels: torch.Tensor, nrow: int | None) -> dict[str, list[Path]]:
        from selfflow.sampling import writers

        preview = torch.cat(self.preview)
        if self.modality == "image":
            grid = writers.save_image_grid(preview, self.out_dir / "grid.png", nrow=nrow, upscale=self.cfg.grid_upscale)
            npz = writers.save_npz(np.concatenate(self.pixels), self.out_dir / "samples.npz", labels)
            self.files.update(grid=[grid], npz=[npz])
        elif self.modality == "video":
            sheet = self.out_dir / "contact_sheet.png"  # one row of frames per clip
            writers.media_writers().save_frame_strip(preview, sheet, upscale=self.cfg.grid_upscale)
            self.files["contact_sheet"] = [sheet]
        return self.files


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Run selfflow-sample from its config; returns the summary written to sampling.json."""
    from rich.progress import Progress

    from selfflow.sampling.generate import NoiseSource, sample_generators, sample_tokens
    from selfflow.sampling.prompted import prompt_text
    from selfflow.tokens import Condition
    from selfflow.sampling.refine import load_init, refine_tokens

    device = resolve_device(cfg.device)
    loaded = load_sampling_model(cfg)
    default_sampler, default_steps = DEFAULTS[loaded.kind]
    sampler, steps = cfg.sampler or default_sampler, int(cfg.steps or default_steps)
    modality = pick_modality(cfg.modality, loaded.tokenizers)
    model = loaded.model.to(device).eval()
    tokenizer = tokenizer_at_size(loaded.tokenizers[modality], modality, cfg.get("size"))
    tokenizer = tokenizer_at_length(tokenizer, modality, cfg).to(device)
    labels = resolve_labels(cfg.labels, cfg.num_samples, model.num_classes, model.null_class)
    text = prompt_text(loaded.tokenizers, cfg.get("prompt"), cfg.num_samples)
    if text is not None and cfg.labels is None:  # text models: the caption is the condition
        labels = torch.full_like(labels, model.null_class)
    init = load_init(cfg.init, tokenizer).to(device) if cfg.get("init") else None
    extractor, real = build_metrics(cfg, loaded, device, modality) if modality in ("image", "audio") else (None, None)
    if cfg.metrics and extractor is None:
        raise ValueError(f"metrics=true is for images and audio; this run samples {modality}")
    out_dir = Path(cfg.out_dir)
    writer = SampleWriter(modality, tokenizer, out_dir, cfg)
    options = solver_options(cfg, sampler)
    from selfflow.evaluation.sample_metrics import FeatureAccumulator

    features = FeatureAccumulator(extractor) if extractor is not None else None
    nfe = model_calls = 0
    started = time.perf_counter()
    parts = batches(cfg.num_samples, cfg.batch_size)
    with Progress(disable=not cfg.progress, transient=True) as progress:
        task = progress.add_task(f"sampling ({sampler}, {steps} steps)", total=len(parts) * steps)
        for part in parts:
            condition = Condition(labels=labels[part.start:part.stop],
                                  text=None if text is None else text.select(slice(part.start, part.stop)),
                                  sizes=size_rows(model, tokenizer, len(part)))
            noise = NoiseSource(generators=sample_generators(cfg.seed, part))
            if init is None:
                out = sample_tokens(model, tokenizer, condition, steps, sampler, cfg.cfg_scale,
                                    tuple(cfg.guidance_interval), noise, cfg.shift, cfg.precision,
                                    on_evaluation=lambda: progress.advance(task), **options)
            else:  # refinement: start from the init sample noised to level `strength`
                out = refine_tokens(model, tokenizer, init.expand(len(part), *init.shape), cfg.strength,
                                    condition, steps, sampler, cfg.cfg_scale,
                                    tuple(cfg.guidance_interval), noise, cfg.shift, cfg.precision,
                                    on_evaluation=lambda: progress.advance(task))
            decoded = tokenizer.decode(out.tokens).float()
            writer.add(decoded, part)
            if features is not None:
                features.add(decoded, labels[part.start:part.stop])
            nfe, model_calls = out.nfe, model_calls + out.model_calls
    seconds = time.perf_counter() - started
    guided = model.num_classes > 0 and cfg.labels is None
    files = writer.finish(labels, nrow=min(model.num_classes, 10) if guided else None)
    summary = {
        "ckpt": str(cfg.ckpt), "weights": cfg.weights, "modality": modality, "num_samples": cfg.num_samples,
        "sampler": sampler, **{f"sde_{k}": v for k, v in options.items()}, "steps": steps, "nfe": nfe,
        "model_forward_passes": model_calls,
        "cfg_scale": cfg.cfg_scale, "guidance_interval": list(cfg.guidance_interval), "shift": cfg.shift,
        "seed": cfg.seed, "batch_size": cfg.batch_size, "device": str(device), "seconds": round(seconds, 3),
        "labels": labels.tolist(), "prompt": OmegaConf.to_container(cfg).get("prompt"),
        "size": list(tokenizer.image_size) if modality == "image" and hasattr(tokenizer, "image_size") else None,
        "init": cfg.get("init"), "strength": cfg.get("strength") if cfg.get("init") else None, "files": {k: str(v[0].parent if len(v) > 1 else v[0]) for k, v in files.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sampling.json").write_text(json.dumps(summary, indent=2))
    print(f"selfflow-sample: {cfg.num_samples} {modality} samples, sampler={sampler}, NFE={nfe} per sample "
          f"({model_calls} model forward passes), {seconds:.1f} s; outputs in {out_dir.resolve()}")
    if features is not None:
        from selfflow.evaluation.sample_metrics import sample_metrics

        metrics = {**sample_metrics(features, real), "sampler": sampler, "nfe": nfe, "cfg_scale": cfg.cfg_scale,
                   "reference": str(cfg.reference) if cfg.feature_extractor is None else "feature_extractor"}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        accuracy = metrics["classifier_accuracy"]
        print(f"selfflow-sample: Frechet distance {metrics['frechet_distance']:.3f}, classifier accuracy "
              f"{'n/a' if accuracy is None else f'{accuracy:.3f}'} -> {out_dir / 'metrics.json'}")
        summary["metrics"] = metrics
    return summary


@hydra.main(config_path="pkg://selfflow.conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors("selfflow-sample"):
        sample(cfg)


if __name__ == "__main__":
    main()
