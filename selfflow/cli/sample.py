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
and metrics.json with metrics=true. The work is in selfflow.sampling.job; this parses, builds and calls.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from selfflow.cli.errors import friendly_errors

LENGTH_OPTIONS = ("size", "duration", "frames")


def build_metrics(cfg: DictConfig, loaded, device, modality: str):
    """(extractor, features of the real data) for metrics=true, else (None, None)."""
    if not cfg.metrics:
        return None, None
    from hydra.utils import instantiate

    from selfflow.evaluation.sample_metrics import reference_metrics
    from selfflow.sampling.modalities import MODALITIES, modality_io

    if not modality_io(modality).judged:
        judged = [m for m, io in MODALITIES.items() if io.judged]
        raise ValueError(f"metrics=true is for {' and '.join(judged)}; this run samples {modality}")
    extractor = instantiate(cfg.feature_extractor) if cfg.feature_extractor is not None else None  # typed by the user
    real_set = instantiate(cfg.metrics_data) if cfg.metrics_data is not None else None
    return reference_metrics(modality, device, cfg.reference, extractor, real_set, loaded.data_config,
                             f"checkpoint {cfg.ckpt}", cfg.metrics_max_real)


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Run selfflow-sample from its config; returns the summary written to sampling.json."""
    from rich.progress import Progress

    from selfflow.evaluation.sample_metrics import FeatureAccumulator, sample_metrics
    from selfflow.sampling.generate import resolve_device
    from selfflow.sampling.job import (DEFAULT_SOLVERS, SampleWriter, SamplingPlan, generate_batches,
                                       load_sampling_model, pick_modality, sampling_condition, solver_options)
    from selfflow.sampling.modalities import load_init, tokenizer_at_length

    device = resolve_device(cfg.device)
    loaded = load_sampling_model(str(cfg.ckpt), cfg.weights, cfg.vae)
    default_sampler, default_steps = DEFAULT_SOLVERS[loaded.kind]
    sampler, steps = cfg.sampler or default_sampler, int(cfg.steps or default_steps)
    modality = pick_modality(cfg.modality, loaded.tokenizers)
    model = loaded.model.to(device).eval()
    lengths = {key: OmegaConf.to_object(cfg[key]) if OmegaConf.is_config(cfg.get(key)) else cfg.get(key)
               for key in LENGTH_OPTIONS}
    tokenizer = tokenizer_at_length(loaded.tokenizers[modality], modality, lengths).to(device)
    labels = OmegaConf.to_object(cfg.labels) if OmegaConf.is_config(cfg.labels) else cfg.labels
    prompt = OmegaConf.to_object(cfg.prompt) if OmegaConf.is_config(cfg.get("prompt")) else cfg.get("prompt")
    condition = sampling_condition(model, tokenizer, loaded.tokenizers, labels, cfg.num_samples, prompt)
    options = solver_options(sampler, cfg.sde_last_step, cfg.sde_last_step_mode)
    plan = SamplingPlan(tokenizer, condition, sampler, steps, cfg.cfg_scale, tuple(cfg.guidance_interval), cfg.shift,
                        options, cfg.precision, cfg.seed, cfg.batch_size,
                        load_init(cfg.init, tokenizer).to(device) if cfg.get("init") else None, cfg.strength)
    extractor, real = build_metrics(cfg, loaded, device, modality)
    features = FeatureAccumulator(extractor) if extractor is not None else None
    out_dir = Path(cfg.out_dir)
    writer = SampleWriter(modality, tokenizer, out_dir, cfg.upscale, cfg.grid_upscale, cfg.grid_max)
    nfe = model_calls = 0
    started = time.perf_counter()
    with Progress(disable=not cfg.progress, transient=True) as progress:
        task = progress.add_task(f"sampling ({sampler}, {steps} steps)", total=-(-plan.num_samples // plan.batch_size)
                                 * steps)
        for part, decoded, out in generate_batches(model, plan, on_evaluation=lambda: progress.advance(task)):
            writer.add(decoded, part)
            if features is not None:
                features.add(decoded, condition.labels[part.start:part.stop])
            nfe, model_calls = out.nfe, model_calls + out.model_calls
    seconds = time.perf_counter() - started
    guided = model.num_classes > 0 and cfg.labels is None
    files = writer.finish(condition.labels, nrow=min(model.num_classes, 10) if guided else None)
    summary = {
        "ckpt": str(cfg.ckpt), "weights": cfg.weights, "modality": modality, "num_samples": cfg.num_samples,
        "sampler": sampler, **{f"sde_{k}": v for k, v in options.items()}, "steps": steps, "nfe": nfe,
        "model_forward_passes": model_calls, "cfg_scale": cfg.cfg_scale,
        "guidance_interval": list(cfg.guidance_interval), "shift": cfg.shift, "seed": cfg.seed,
        "batch_size": cfg.batch_size, "device": str(device), "seconds": round(seconds, 3),
        "labels": condition.labels.tolist(), "prompt": prompt,
        "size": list(tokenizer.image_size) if modality == "image" and hasattr(tokenizer, "image_size") else None,
        "init": cfg.get("init"), "strength": cfg.get("strength") if cfg.get("init") else None,
        "files": {k: str(v[0].parent if len(v) > 1 else v[0]) for k, v in files.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sampling.json").write_text(json.dumps(summary, indent=2))
    print(f"selfflow-sample: {cfg.num_samples} {modality} samples, sampler={sampler}, NFE={nfe} per sample "
          f"({model_calls} model forward passes), {seconds:.1f} s; outputs in {out_dir.resolve()}")
    if features is not None:
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
