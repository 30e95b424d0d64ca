"""selfflow-probe: linear-probe evaluation of a checkpoint's features, with baselines, as probe.json and a table.

  selfflow-probe ckpt=runs/.../checkpoints/last.ckpt out_dir=probes/run1      # the data the run trained on
  selfflow-probe ckpt=... data=image_folder data.root=DIR layers=[1,3] noise_levels=[0,0.25]
  selfflow-probe ckpt=... weights=online pool=attentive cache_dir=null
  selfflow-probe ckpt=<joint run> out_dir=probes/joint   # every modality: probes/joint/<modality>/probe.json
  selfflow-probe ckpt=<joint run> modality=audio          # one modality: out_dir/probe.json
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from selfflow.cli.errors import friendly_errors

IGNORED_DATA_KEYS = ("batch_size", "num_workers", "pin_memory")  # loader settings: the features do not depend on them


def describe_dataset(datamodule) -> str:
    """A short name for the report: the dataset class, and its folder when it has one."""
    name = type(datamodule.train_set).__name__
    root = getattr(datamodule, "root", None)
    return f"{name}({root})" if root else name


def pick_modalities(by_modality: dict, modality: str | None) -> dict:
    """{modality: data module} to probe: the one `modality=` names, or every one (a mixture with modality=null)."""
    if modality is None:
        return dict(by_modality)
    if modality not in by_modality:
        raise ValueError(f"modality={modality!r} is not in the data; choose one of {sorted(by_modality)}")
    return {modality: by_modality[modality]}


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device={name!r} is unknown; choose auto, cpu or cuda")
    return torch.device(name)


def print_table(document: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    best = document["best"]
    table = Table(title=f"linear probe: {document['dataset']} (top-1 %, test split)")
    for column in ("layer", "noise level", "pool", "top-1", "random-init", "input"):
        table.add_column(column, justify="right")
    for row in document["results"]:
        mark = " *" if row == best else ""
        table.add_row(str(row["layer"]), f"{row['noise_level']:g}", row["pool"], f"{100 * row['top1']:.1f}{mark}",
                      f"{100 * row['baseline_random_init_top1']:.1f}", f"{100 * row['baseline_input_top1']:.1f}")
    Console().print(table)


def probe(cfg: DictConfig) -> dict[str, tuple[Path, dict]]:
    """Load, extract (through the cache), fit, and write `probe.json`: {modality: (its path, the document)}.

    One modality (a single-modality run, or `modality=` given): `out_dir/probe.json`. A multi-modal run with
    `modality=null`: every modality, each in `out_dir/<modality>/probe.json`.
    """
    from hydra.utils import instantiate

    from selfflow.evaluation.probe import modality_sources
    from selfflow.safe_config import instantiate_stored
    from selfflow.interop.checkpoint import load_checkpoint

    ckpt = Path(cfg.ckpt).expanduser()
    loaded = load_checkpoint(ckpt, cfg.weights, vae=cfg.get("vae"))
    if cfg.get("data") is not None:  # typed by the user
        data_cfg, data = cfg.data, instantiate(cfg.data)
    else:  # stored in the checkpoint: built through the allow-list
        data_cfg = loaded.config.data
        data = instantiate_stored(data_cfg, f"checkpoint {ckpt}", "data")
    chosen = pick_modalities(modality_sources(data), cfg.modality)
    for datamodule in chosen.values():
        if datamodule.modality not in loaded.tokenizers:
            raise ValueError(f"data gives {datamodule.modality!r} samples but checkpoint {ckpt} has tokenizers for "
                             f"{sorted(loaded.tokenizers)} only; probe it on data of a modality it was trained on")
    out_dir = Path(cfg.out_dir)
    results = {}
    for modality, datamodule in chosen.items():
        path = (out_dir if len(chosen) == 1 else out_dir / modality) / "probe.json"
        document = probe_one(cfg, ckpt, loaded, data_cfg, datamodule)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2) + "\n")
        results[modality] = (path, document)
    return results


def probe_one(cfg: DictConfig, ckpt: Path, loaded, data_cfg, datamodule) -> dict:
    """The probe.json document of one modality's data module."""
    from selfflow.data.cache import file_digest
    from selfflow.evaluation.features import FeatureCache, default_probe_layers
    from selfflow.evaluation.probe import FeatureSources, HeadOptions, probe_representations, report

    device = pick_device(cfg.device)
    model = loaded.model.to(device)
    tokenizer = loaded.tokenizers[datamodule.modality].to(device)
    layers = list(cfg.layers) if cfg.layers is not None else default_probe_layers(
        model.depth, loaded.config.objective.get("student_layer"))
    data_key = {k: v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items() if k not in IGNORED_DATA_KEYS}
    data_key["modality"] = datamodule.modality
    sources = FeatureSources(
        model={"checkpoint_sha256": file_digest(loaded.weights_file), "weights": cfg.weights,
               "tokenizer": OmegaConf.to_container(loaded.config.tokenizer, resolve=True)},
        random_init={"architecture": OmegaConf.to_container(loaded.config.model, resolve=True),
                     "token_channels": model.token_channels, "num_classes": model.num_classes,
                     "tokenizer": OmegaConf.to_container(loaded.config.tokenizer, resolve=True)},
        data=data_key,
    )
    heads = HeadOptions(list(cfg.head.learning_rates), list(cfg.head.weight_decays), cfg.head.epochs,
                        cfg.head.batch_size, cfg.head.val_fraction)
    cache = FeatureCache(cfg.cache_dir) if cfg.cache_dir else None
    rows = probe_representations(model, tokenizer, datamodule.train_set, datamodule.test_set,
                                 datamodule.num_classes, layers, list(cfg.noise_levels), cfg.pool,
                                 seed=cfg.seed, heads=heads, cache=cache, sources=sources,
                                 feature_batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                 progress=cfg.progress)
    return report(str(ckpt.resolve()), describe_dataset(datamodule), rows)


@hydra.main(config_path="pkg://selfflow.conf", config_name="probe", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors("selfflow-probe"):
        for path, document in probe(cfg).values():
            print_table(document)
            print(f"selfflow-probe: wrote {path.resolve()}")


if __name__ == "__main__":
    main()
