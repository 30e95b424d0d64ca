"""Distributed training pieces Lightning leaves to the user: per-rank randomness and the FSDP wrapping policy."""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from selfflow.models.transformer import TransformerBlock

log = logging.getLogger("selfflow.training")


class RankSeed(L.Callback):
    """Give every rank its own random stream (masks, levels, noise, condition dropout).

    Each process of a DDP/FSDP run is seeded with the same `seed`; without an offset all ranks would draw identical
    masks and noise for their different samples. Runs at setup, before a checkpoint's states are restored.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + trainer.global_rank)


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = False,
                  **kwargs) -> FSDPStrategy:
    """FSDP with one unit per transformer block (student and EMA teacher alike)."""
    policy = {TransformerBlock}
    return FSDPStrategy(
        auto_wrap_policy=policy, sharding_strategy=sharding_strategy, use_orig_params=True,
        activation_checkpointing_policy=policy if activation_checkpointing else None, **kwargs,
    )


def is_sharded(trainer: L.Trainer) -> bool:
    return isinstance(trainer.strategy, FSDPStrategy)


_SKIP_WARNED: set[str] = set()


def sharded_over_ranks(trainer: L.Trainer, what: str) -> bool:
    """True (and a one-time warning) when the model is sharded over several ranks: a callback's forward outside
    training_step would need every rank and the unsharded root parameters, which is not supported; sample and
    probe the checkpoint instead (selfflow-sample / selfflow-probe)."""
    if not (is_sharded(trainer) and trainer.world_size > 1):
        return False
    if what not in _SKIP_WARNED and trainer.is_global_zero:
        log.warning("%s are off under FSDP on %d ranks; run selfflow-sample / selfflow-probe on a checkpoint",
                    what, trainer.world_size)
    _SKIP_WARNED.add(what)
    return True


def callback_forward_context(trainer: L.Trainer) -> AbstractContextManager:
    """Context for a model forward outside training_step: under FSDP mixed precision (one GPU) the parameters are
    cast to bf16/fp16 at each forward, so the inputs need the precision plugin's autocast too."""
    return trainer.precision_plugin.forward_context() if is_sharded(trainer) else nullcontext()
