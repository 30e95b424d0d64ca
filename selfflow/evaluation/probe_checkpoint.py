"""Probing a checkpoint: its features on a data module (every modality of a joint run, or one),
layer by layer, with the two baselines, written as probe.json. `selfflow-probe` builds the inputs
and calls `probe_checkpoint`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfflow.evaluation.features import FeatureCache, default_probe_layers
from selfflow.evaluation.probe import (
    FeatureSources,
    HeadOptions,
    modality_sources,
    probe_representations,
    report,
)
from selfflow.interop.checkpoint import LoadedCheckpoint
from selfflow.io.digests import file_digest
from selfflow.io.safe_files import write_json_atomically

IGNORED_DATA_KEYS = (
    "batch_size",
    "num_workers",
    "pin_memory",
)  # loader settings: the features do not depend on them


@dataclass(kw_only=True)
class ProbeOptions:
    """How to probe: which layers (None: every quarter of the depth plus the run's student layer),
    at which noise levels, pooled how; the heads; where features are cached (None: not cached)."""

    layers: list[int] | None = None
    noise_levels: list[float] = field(default_factory=lambda: [0.0])
    pool: str = "mean"
    seed: int = 0
    heads: HeadOptions = field(default_factory=HeadOptions)
    cache_dir: str | None = None
    device: Any = "cpu"
    batch_size: int = 256
    num_workers: int = 0
    progress: bool = True
    weights: str = "ema"


def describe_dataset(datamodule) -> str:
    """A short name for the report: the dataset class, and its folder when it has one."""
    name = type(datamodule.train_set).__name__
    root = getattr(datamodule, "root", None)
    return f"{name}({root})" if root else name


def pick_modalities(by_modality: dict, modality: str | None) -> dict:
    """{modality: data module} to probe: the one `modality` names, or every one (a mixture with
    modality None)."""
    if modality is None:
        return dict(by_modality)
    if modality not in by_modality:
        raise ValueError(
            f"modality={modality!r} is not in the data; choose one of {sorted(by_modality)}"
        )
    return {modality: by_modality[modality]}


def probe_checkpoint(
    loaded: LoadedCheckpoint,
    data,
    data_config: dict,
    out_dir: Path,
    options: ProbeOptions,
    modality: str | None = None,
) -> dict[str, tuple[Path, dict]]:
    """Probe `loaded` on the data module `data` (built from `data_config`, a plain dict that keys
    the feature cache) and write probe.json: {modality: (its path, the document)}. One modality (a
    single-modality run, or `modality` given): `out_dir/probe.json`; every modality of a joint run:
    `out_dir/<modality>/probe.json`."""
    chosen = pick_modalities(modality_sources(data), modality)
    for datamodule in chosen.values():
        if datamodule.modality not in loaded.tokenizers:
            raise ValueError(
                f"data gives {datamodule.modality!r} samples but checkpoint {loaded.path} has "
                f"tokenizers for {sorted(loaded.tokenizers)} only; probe it on data of a "
                f"modality it was trained on"
            )
    results = {}
    for name, datamodule in chosen.items():
        path = (out_dir if len(chosen) == 1 else out_dir / name) / "probe.json"
        document = probe_data_module(loaded, data_config, datamodule, options)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, document)
        results[name] = (path, document)
    return results


def probe_data_module(
    loaded: LoadedCheckpoint, data_config: dict, datamodule, options: ProbeOptions
) -> dict:
    """The probe.json document of one modality's data module."""
    from omegaconf import OmegaConf

    model = loaded.model.to(options.device)
    tokenizer = loaded.tokenizers[datamodule.modality].to(options.device)
    layers = options.layers or default_probe_layers(
        model.depth, loaded.config.objective.get("student_layer")
    )
    data_key = {k: v for k, v in data_config.items() if k not in IGNORED_DATA_KEYS}
    data_key["modality"] = datamodule.modality
    stored_tokenizer = OmegaConf.to_container(loaded.config.tokenizer, resolve=True)
    sources = FeatureSources(
        model={
            "checkpoint_sha256": file_digest(loaded.weights_file),
            "weights": options.weights,
            "tokenizer": stored_tokenizer,
        },
        random_init={
            "architecture": OmegaConf.to_container(loaded.config.model, resolve=True),
            "token_channels": model.token_channels,
            "num_classes": model.num_classes,
            "tokenizer": stored_tokenizer,
        },
        data=data_key,
    )
    cache = FeatureCache(options.cache_dir) if options.cache_dir else None
    rows = probe_representations(
        model,
        tokenizer,
        datamodule.train_set,
        datamodule.test_set,
        datamodule.num_classes,
        layers,
        list(options.noise_levels),
        options.pool,
        seed=options.seed,
        heads=options.heads,
        cache=cache,
        sources=sources,
        feature_batch_size=options.batch_size,
        num_workers=options.num_workers,
        progress=options.progress,
    )
    return report(str(Path(loaded.path).resolve()), describe_dataset(datamodule), rows)
