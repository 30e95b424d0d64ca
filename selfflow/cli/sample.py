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

import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from selfflow.cli.config_help import register_config_keys_resolver
from selfflow.cli.errors import friendly_errors
from selfflow.io.safe_files import write_json_atomically

LENGTH_OPTIONS = ("size", "duration", "frames")
METRICS = {False: None, None: None, True: "reference", "reference": "reference", "fid": "fid"}


def metrics_kind(value) -> str | None:
    """metrics=false, true (= reference: a local reference classifier's space) or fid (selfflow-eval)."""
    if (isinstance(value, (bool, str)) or value is None) and value in METRICS:
        return METRICS[value]
    raise ValueError(
        f"metrics={value!r} is unknown; choose false, true (= reference: Frechet distance and accuracy "
        f"of a reference classifier) or fid (FID, sFID, IS, precision, recall with selfflow-eval)"
    )


def build_metrics(cfg: DictConfig, loaded, device, modality: str):
    """(extractor, features of the real data) for metrics=true, else (None, None)."""
    if metrics_kind(cfg.metrics) != "reference":
        return None, None
    from hydra.utils import instantiate

    from selfflow.evaluation.sample_metrics import reference_metrics
    from selfflow.sampling.modalities import MODALITIES, modality_io

    if not modality_io(modality).judged:
        judged = [m for m, io in MODALITIES.items() if io.judged]
        raise ValueError(f"metrics=true is for {' and '.join(judged)}; this run samples {modality}")
    extractor = instantiate(cfg.feature_extractor) if cfg.feature_extractor is not None else None  # typed by the user
    real_set = instantiate(cfg.metrics_data) if cfg.metrics_data is not None else None
    return reference_metrics(
        modality,
        device,
        cfg.reference,
        extractor,
        real_set,
        loaded.data_config,
        f"checkpoint {cfg.ckpt}",
        cfg.metrics_max_real,
    )


def fid_config(cfg: DictConfig, out_dir: Path, device) -> DictConfig:
    """selfflow-eval's config (its defaults from conf/eval.yaml) for samples.npz against fid_ref, checked before any
    sampling: the reference exists, the weights file is a safe state dict, torch-fidelity is installed."""
    from importlib.resources import files

    from selfflow.cli.eval import check_inputs
    from selfflow.evaluation.inception import read_weights

    for key in ("fid_ref", "inception"):
        if cfg.get(key) is None:
            raise ValueError(
                f"metrics=fid needs {key}=...: fid_ref=REF.npz|FOLDER (e.g. the ADM reference batch) "
                f"inception=pt_inception-2015-12-05-6726825d.pth (see docs/evaluation.md)"
            )
    eval_cfg = OmegaConf.load(files("selfflow.conf").joinpath("eval.yaml"))
    for key in ("defaults", "hydra"):
        eval_cfg.pop(key)
    eval_cfg = OmegaConf.merge(
        eval_cfg,
        {
            "samples": str(out_dir / "samples.npz"),
            "ref": str(cfg.fid_ref),
            "inception": str(cfg.inception),
            "out": str(out_dir / "metrics.json"),
            "device": str(device),
            "progress": cfg.progress,
        },
    )
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as error:
        raise ModuleNotFoundError(f"metrics=fid needs torch-fidelity: pip install -e '.[eval]' ({error})") from None
    check_inputs(OmegaConf.merge(eval_cfg, {"samples": str(cfg.fid_ref)}))  # the samples are not there yet
    read_weights(cfg.inception)
    return eval_cfg


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Run selfflow-sample from its config, in each process of a launch; returns the summary written to
    sampling.json (by rank 0)."""
    from selfflow.sampling.ranks import launcher_ranks, process_device, process_group

    ranks = launcher_ranks()
    device = process_device(ranks, cfg.device)
    with process_group(ranks, device) as group:
        return sample_in_group(cfg, ranks, device, group)


def sample_in_group(cfg: DictConfig, ranks, device, group) -> dict[str, Any]:
    from rich.progress import Progress

    from selfflow.evaluation.sample_metrics import FeatureAccumulator, sample_metrics
    from selfflow.io.digests import file_digest
    from selfflow.sampling.chunks import ChunkStore
    from selfflow.sampling.job import (
        SampleWriter,
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
    from selfflow.sampling.modalities import load_init, modality_io, tokenizer_at_length

    out_dir = Path(cfg.out_dir)
    group.check_same(str(out_dir.resolve()), "out_dir")
    kind = metrics_kind(cfg.metrics)
    eval_cfg = fid_config(cfg, out_dir, device) if kind == "fid" else None
    official_weights = cfg.get("official_weights") or "model"
    loaded = load_sampling_model(str(cfg.ckpt), cfg.weights, cfg.vae, official_weights)
    default_sampler, default_steps, default_interval = sampling_defaults(loaded.kind, kind)
    sampler, steps = cfg.sampler or default_sampler, int(cfg.steps or default_steps)
    asked = cfg.guidance_interval
    interval = tuple(asked) if asked is not None else default_interval
    modality = pick_modality(cfg.modality, loaded.tokenizers)
    if kind == "fid" and not modality_io(modality).arrays:
        raise ValueError(f"metrics=fid measures images; this checkpoint samples {modality}")
    lengths = {
        key: OmegaConf.to_object(cfg[key]) if OmegaConf.is_config(cfg.get(key)) else cfg.get(key)
        for key in LENGTH_OPTIONS
    }
    tokenizer = tokenizer_at_length(loaded.tokenizers[modality], modality, lengths).to(device)
    labels = OmegaConf.to_object(cfg.labels) if OmegaConf.is_config(cfg.labels) else cfg.labels
    prompt = OmegaConf.to_object(cfg.prompt) if OmegaConf.is_config(cfg.get("prompt")) else cfg.get("prompt")
    condition = sampling_condition(
        loaded.model, tokenizer, loaded.tokenizers, labels, cfg.num_samples, prompt, cfg.seed
    )
    options = solver_options(sampler, cfg.sde_last_step, cfg.sde_last_step_mode)
    plan = SamplingPlan(
        tokenizer,
        condition,
        sampler,
        steps,
        cfg.cfg_scale,
        interval,
        cfg.shift,
        options,
        cfg.precision,
        cfg.seed,
        cfg.batch_size,
        load_init(cfg.init, tokenizer).to(device) if cfg.get("init") else None,
        cfg.strength,
    )
    requests = {
        "labels": labels,
        "prompt": prompt,
        **lengths,
        "init_sha256": file_digest(Path(cfg.init).expanduser()) if cfg.get("init") else None,
    }
    settings = job_settings(loaded.model, tokenizer, modality, plan, device, cfg.chunk_size, requests)
    model = loaded.model.to(device).eval()
    extractor, real = build_metrics(cfg, loaded, device, modality) if ranks.is_main else (None, None)

    store = ChunkStore(out_dir, plan.num_samples, cfg.chunk_size)
    if store.check_settings(settings) and ranks.is_main:
        store.write_settings(settings, {"ckpt": str(cfg.ckpt), "weights": cfg.weights})
    todo = store.missing()
    group.barrier()  # every process has listed the chunks on disk before any is written
    mine = todo[ranks.rank :: ranks.world]
    writer = SampleWriter(
        modality, tokenizer, out_dir, cfg.upscale, cfg.grid_upscale, cfg.grid_max, cfg.per_sample_files
    )
    started = time.perf_counter()
    with Progress(disable=not (cfg.progress and ranks.is_main), transient=True) as progress:
        evaluations = sum(len(batches(len(store.ranges[k]), plan.batch_size)) for k in mine) * plan.nfe
        task = progress.add_task(f"sampling ({sampler}, {steps} steps)", total=evaluations)
        model_calls = sample_chunks(model, plan, store, mine, writer, on_evaluation=lambda: progress.advance(task))
    seconds = time.perf_counter() - started
    model_calls, sampled = group.sum([model_calls, len(mine)])  # returns once every process has written its chunks
    summary = {
        "ckpt": str(cfg.ckpt),
        "weights": cfg.weights,
        "official_weights": official_weights if loaded.kind == "official" else None,
        "modality": modality,
        "num_samples": cfg.num_samples,
        "sampler": sampler,
        **{f"sde_{k}": v for k, v in options.items()},
        "steps": steps,
        "nfe": plan.nfe,
        "model_forward_passes": model_calls,
        "cfg_scale": cfg.cfg_scale,
        "guidance_interval": list(interval),
        "shift": cfg.shift,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "chunk_size": cfg.chunk_size,
        "chunks": len(store.ranges),
        "chunks_sampled": sampled,
        "processes": ranks.world,
        "device": str(device),
        "seconds": round(seconds, 3),
        "labels": condition.labels.tolist(),
        "prompt": prompt,
        "size": list(tokenizer.image_size) if modality == "image" and hasattr(tokenizer, "image_size") else None,
        "init": cfg.get("init"),
        "strength": cfg.get("strength") if cfg.get("init") else None,
    }
    if not ranks.is_main:
        return summary
    features = FeatureAccumulator(extractor) if extractor is not None else None
    guided = model.num_classes > 0 and cfg.labels == "balanced"  # a grid row per class
    files = writer.finish(
        store,
        condition.labels,
        nrow=min(model.num_classes, 10) if guided else None,
        visit=None if features is None else lambda s, y: features.add(s.to(device), y),
    )
    summary["files"] = {k: str(v) for k, v in files.items()}
    if not cfg.keep_parts:
        store.remove()
    else:
        store.remove_temporary()
    write_json_atomically(out_dir / "sampling.json", summary)
    resumed = (
        f", {len(store.ranges) - sampled} of {len(store.ranges)} chunks were on disk"
        if sampled < len(store.ranges)
        else ""
    )
    print(
        f"selfflow-sample: {cfg.num_samples} {modality} samples, sampler={sampler}, NFE={plan.nfe} per sample "
        f"({model_calls} model forward passes, {ranks.world} process{'es' if ranks.world > 1 else ''}"
        f"{resumed}), {seconds:.1f} s; outputs in {out_dir.resolve()}"
    )
    if features is not None:
        metrics = {
            **sample_metrics(features, real),
            "sampler": sampler,
            "nfe": plan.nfe,
            "cfg_scale": cfg.cfg_scale,
            "reference": str(cfg.reference) if cfg.feature_extractor is None else "feature_extractor",
        }
        write_json_atomically(out_dir / "metrics.json", metrics)
        accuracy = metrics["classifier_accuracy"]
        print(
            f"selfflow-sample: Frechet distance {metrics['frechet_distance']:.3f}, classifier accuracy "
            f"{'n/a' if accuracy is None else f'{accuracy:.3f}'} -> {out_dir / 'metrics.json'}"
        )
        summary["metrics"] = metrics
    if eval_cfg is not None:
        from selfflow.cli.eval import evaluate

        summary["metrics"] = evaluate(eval_cfg)
    return summary


@hydra.main(config_path="pkg://selfflow.conf", config_name="sample", version_base="1.3")
def run_from_config(cfg: DictConfig) -> None:
    with friendly_errors("selfflow-sample"):
        sample(cfg)


def main() -> None:
    """Registers the --help resolver, then Hydra composes and runs."""
    register_config_keys_resolver()
    run_from_config()


if __name__ == "__main__":
    main()
