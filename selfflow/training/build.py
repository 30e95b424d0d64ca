"""Build the data, model, objective, Lightning module and trainer of a run from its
(Hydra) config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from selfflow.data.batching.mixture import check_pack_length
from selfflow.tokenizers.autoencoders import point_vae_keys
from selfflow.training.checkpoint_io import AtomicCheckpointIO
from selfflow.training.datamodule import SelfFlowDataModule
from selfflow.training.hyperparameters import (
    FinalMetricsInHparams,
    command_line_overrides,
    run_hyperparameters,
)
from selfflow.training.mixture import MixtureDataModule
from selfflow.training.module import SelfFlowModule
from selfflow.training.run_name import register_run_name_resolver
from selfflow.training.validate import built, tokenizer_configs


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", auto_precision)
    register_run_name_resolver()


def auto_precision() -> str:
    """bf16 mixed precision where the accelerator supports it, float32 otherwise (the
    CPU default)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


_register_resolvers()


@dataclass
class Run:
    datamodule: L.LightningDataModule
    module: SelfFlowModule
    trainer: L.Trainer
    run_dir: Path


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config that checkpoints store (and that resume=auto compares): the tokenizer
    group holds the tokenizers the run builds, each with every argument, so that sampling and
    probing rebuild them without data."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["tokenizer"] = tokenizer_configs(cfg)
    return config


def build_module(cfg: DictConfig, datamodule) -> SelfFlowModule:
    """Tokenizers, model, objective and optimizer, sized from the data (classes) and
    tokenizers (channels)."""
    config = run_config(cfg)
    tokenizers = {modality: instantiate(spec) for modality, spec in config["tokenizer"].items()}
    model = instantiate(cfg.model)(
        token_channels={m: t.token_channels for m, t in tokenizers.items()},
        num_classes=datamodule.num_classes,
    )
    objective = instantiate(cfg.objective)(model=model)
    if cfg.get("init"):
        initialize_from(str(cfg.init), objective, tokenizers)
    # a VAE or autoencoder is stored with the fingerprint of its files
    for modality, tokenizer in tokenizers.items():
        if getattr(tokenizer, "fingerprint", None):
            config["tokenizer"][modality]["fingerprint"] = tokenizer.fingerprint
        if getattr(tokenizer, "vae_path", None):
            point_vae_keys(config, tokenizer.vae_path, modality)
    if objective.alignment is not None:  # REPA's encoder: its folder and fingerprint, never weights
        encoder = objective.alignment.encoder
        config["objective"]["encoder"] = encoder.path
        config["objective"]["alignment"]["fingerprint"] = encoder.fingerprint
    module = SelfFlowModule(
        objective,
        tokenizers,
        optimizer=instantiate(cfg.optimizer),
        lr_schedule=instantiate(cfg.lr_schedule),
        config=config,
        max_nonfinite_in_a_row=int(cfg.get("max_nonfinite_in_a_row", 5)),
    )
    module.save_hyperparameters(
        run_hyperparameters(config, command_line_overrides())
    )  # Lightning logs them
    return module


def initialize_from(init: str, objective, tokenizers: dict) -> None:
    """`init=official:PATH`: the student, the EMA teacher and the projection head start from the
    released weights; `init=pretrained:NAME`: the student and the EMA teacher from a selfflow export
    (a folder or hub repo id)."""
    from selfflow.interop.hub import PRETRAINED_PREFIX, initialize_from_pretrained
    from selfflow.interop.official import OFFICIAL_PREFIX, initialize_from_official

    if init.startswith(PRETRAINED_PREFIX):
        initialize_from_pretrained(objective, init.removeprefix(PRETRAINED_PREFIX), tokenizers)
        return
    path = init.removeprefix(OFFICIAL_PREFIX)
    if path == init or "image" not in tokenizers:
        raise ValueError(
            f"init={init} is not supported: use init=official:PATH (the released Self-Flow "
            f"ImageNet checkpoint, with experiment=imagenet256) or init=pretrained:EXPORT (a "
            f"selfflow export); "
            f"continue a selfflow run with ckpt_path= or resume=auto"
        )
    tokenizer = tokenizers["image"]
    channels = tokenizer.token_channels // tokenizer.patch_size**2
    initialize_from_official(objective, path, tokenizer.patch_size, channels)


def set_global_batch_size(cfg: DictConfig, datamodule, trainer: L.Trainer) -> None:
    """data.batch_size per process from `global_batch_size` (one optimizer step over
    all processes)."""
    total = cfg.get("global_batch_size")
    if total is None:
        return
    shares = trainer.world_size * trainer.accumulate_grad_batches
    if not isinstance(datamodule, SelfFlowDataModule) or int(total) % shares:
        raise ValueError(
            f"global_batch_size={total} must be a multiple of the {trainer.world_size} processes x "
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} (single-modality "
            f"data); change it or set global_batch_size=null and data.batch_size per process"
        )
    datamodule.batch_size = int(total) // shares


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    """The Lightning Trainer with the run's callbacks and loggers (their own checks, e.g.
    trainer.max_steps, run here, before any data is read)."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(FinalMetricsInHparams())  # TensorBoard's hparams get the run's final metrics
    loggers: Any = [
        instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None
    ] or False
    # checkpoints are written atomically and read weights-only; the datamodule shards the data over
    # ranks itself (with a resumable order), so Lightning must not swap in its own sampler
    extra = {} if "use_distributed_sampler" in cfg.trainer else {"use_distributed_sampler": False}
    return built(
        "trainer",
        lambda: instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers,
            default_root_dir=str(run_dir),
            plugins=[AtomicCheckpointIO()],
            **extra,
        ),
    )


def build_run(cfg: DictConfig) -> Run:
    run_dir = Path(cfg.run_dir)
    trainer = build_trainer(cfg, run_dir)
    datamodule = instantiate(cfg.data)
    datamodule.record_skipped_files(run_dir / "skipped_files.tsv")
    if isinstance(datamodule, (SelfFlowDataModule, MixtureDataModule)):
        datamodule.seed = int(cfg.seed)
    module = build_module(cfg, datamodule)
    if isinstance(datamodule, MixtureDataModule) and datamodule.mode == "packed":
        check_pack_length(
            datamodule.pack_length, {m: module.tokenizers[m] for m in datamodule.modalities}
        )
    set_global_batch_size(cfg, datamodule, trainer)
    return Run(datamodule, module, trainer, run_dir)
