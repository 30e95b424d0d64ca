"""selfflow-probe: linear-probe evaluation of a checkpoint's features, with baselines, as probe.json
and a table.

selfflow-probe ckpt=runs/.../checkpoints/last.ckpt out_dir=probes/run1  # the run's own data
selfflow-probe ckpt=... data=image_folder data.root=DIR layers=[1,3] noise_levels=[0,0.25]
selfflow-probe ckpt=... weights=online pool=attentive cache_dir=null
# a joint run: every modality (<modality>/probe.json), or one modality (out_dir/probe.json)
selfflow-probe ckpt=runs/joint/checkpoints/last.ckpt out_dir=probes/joint
selfflow-probe ckpt=runs/joint/checkpoints/last.ckpt modality=audio
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from selfflow.cli.config_help import register_config_keys_resolver
from selfflow.cli.errors import friendly_errors


def print_table(document: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    best = document["best"]
    table = Table(title=f"linear probe: {document['dataset']} (top-1 %, test split)")
    for column in ("layer", "noise level", "pool", "top-1", "random-init", "input"):
        table.add_column(column, justify="right")
    for row in document["results"]:
        mark = " *" if row == best else ""
        table.add_row(
            str(row["layer"]),
            f"{row['noise_level']:g}",
            row["pool"],
            f"{100 * row['top1']:.1f}{mark}",
            f"{100 * row['baseline_random_init_top1']:.1f}",
            f"{100 * row['baseline_input_top1']:.1f}",
        )
    Console().print(table)


def probe(cfg: DictConfig) -> dict[str, tuple[Path, dict]]:
    """Load, build the data and the options, probe: {modality: (path of its probe.json,
    the document)}."""
    from hydra.utils import instantiate

    from selfflow.evaluation.probe import HeadOptions
    from selfflow.evaluation.probe_checkpoint import ProbeOptions, probe_checkpoint
    from selfflow.interop.checkpoint import load_checkpoint
    from selfflow.safe_config import instantiate_stored
    from selfflow.sampling.generate import resolve_device

    ckpt = Path(cfg.ckpt).expanduser()
    loaded = load_checkpoint(ckpt, cfg.weights, vae=cfg.get("vae"))
    if cfg.get("data") is not None:  # typed by the user
        data_cfg, data = cfg.data, instantiate(cfg.data)
    else:  # stored in the checkpoint: built through the allow-list
        data_cfg = loaded.config.data
        data = instantiate_stored(data_cfg, f"checkpoint {ckpt}", "data")
    head = cfg.head
    options = ProbeOptions(
        layers=list(cfg.layers) if cfg.layers is not None else None,
        noise_levels=list(cfg.noise_levels),
        pool=cfg.pool,
        seed=cfg.seed,
        cache_dir=cfg.cache_dir,
        device=resolve_device(cfg.device),
        heads=HeadOptions(
            learning_rates=list(head.learning_rates),
            weight_decays=list(head.weight_decays),
            epochs=head.epochs,
            batch_size=head.batch_size,
            val_fraction=head.val_fraction,
        ),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        progress=cfg.progress,
        weights=cfg.weights,
    )
    return probe_checkpoint(
        loaded,
        data,
        OmegaConf.to_container(data_cfg, resolve=True),
        Path(cfg.out_dir),
        options,
        cfg.modality,
    )


@hydra.main(config_path="pkg://selfflow.conf", config_name="probe", version_base="1.3")
def run_from_config(cfg: DictConfig) -> None:
    with friendly_errors("selfflow-probe"):
        for path, document in probe(cfg).values():
            print_table(document)
            print(f"selfflow-probe: wrote {path.resolve()}")


def main() -> None:
    """Registers the --help resolver, then Hydra composes and runs."""
    register_config_keys_resolver()
    run_from_config()


if __name__ == "__main__":
    main()
