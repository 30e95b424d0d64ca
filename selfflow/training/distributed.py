"""Distributed training pieces Lightning leaves to the user: per-rank randomness, the FSDP
wrapping policy, and modality-specific parameters that DDP can synchronise without searching for
unused ones."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from selfflow.models.layers import TransformerBlock
from selfflow.models.transformer import SelfFlowTransformer

log = logging.getLogger("selfflow.training")


class RankSeed(L.Callback):
    """Give every rank its own random stream (masks, levels, noise, condition dropout).

    Each process of a DDP/FSDP run is seeded with the same `seed`; without an offset all ranks would
    draw identical masks and noise for their different samples. Runs at setup, before a checkpoint's
    states are restored.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + trainer.global_rank)


def fsdp_strategy(
    sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = False, **kwargs
) -> FSDPStrategy:
    """FSDP with one unit per transformer block (student and EMA teacher alike)."""
    policy = {TransformerBlock}
    return FSDPStrategy(
        auto_wrap_policy=policy,
        sharding_strategy=sharding_strategy,
        use_orig_params=True,
        activation_checkpointing_policy=policy if activation_checkpointing else None,
        **kwargs,
    )


def is_sharded(trainer: L.Trainer) -> bool:
    return isinstance(trainer.strategy, FSDPStrategy)


_SKIP_WARNED: set[str] = set()


def sharded_over_ranks(trainer: L.Trainer, what: str) -> bool:
    """True (and a one-time warning) when the model is sharded over several ranks: a callback's
    forward outside training_step would need every rank and the unsharded root parameters, which is
    not supported; sample and probe the checkpoint instead (selfflow-sample / selfflow-probe)."""
    if not (is_sharded(trainer) and trainer.world_size > 1):
        return False
    if what not in _SKIP_WARNED and trainer.is_global_zero:
        log.warning(
            "%s are off under FSDP on %d ranks; run selfflow-sample / "
            "selfflow-probe on a checkpoint",
            what,
            trainer.world_size,
        )
    _SKIP_WARNED.add(what)
    return True


def callback_forward_context(trainer: L.Trainer) -> AbstractContextManager:
    """Context for a model forward outside training_step: under FSDP mixed precision (one GPU) the
    parameters are cast to bf16/fp16 at each forward, so the inputs need the precision plugin's
    autocast too."""
    return trainer.precision_plugin.forward_context() if is_sharded(trainer) else nullcontext()


class ModalityParameters:
    """Each generated modality's own parameters (input projection, modality embedding, output head),
    which a step without that modality leaves without a gradient.

    DDP without an unused-parameter search needs a gradient for every parameter on every rank, so
    `in_graph` adds the absent modalities' parameters to the loss with weight zero; `drop_absent`
    then takes their (zero) gradients away again before the optimizer step, for the modalities
    absent from the whole step (every rank, every accumulated micro-batch), so that the optimizer
    leaves those parameters and their moments alone, exactly as a one-process run does.
    """

    def __init__(self, model: SelfFlowTransformer):
        self.by_modality: dict[str, list[nn.Parameter]] = {
            m: [
                *model.input_proj[m].parameters(),
                model.modality_embed[m],
                *model.final_layers[m].parameters(),
            ]
            for m in model.final_layers
        }
        self.names = sorted(self.by_modality)

    def in_graph(self, loss: Tensor, present: Iterable[str]) -> Tensor:
        """loss + 0 * (the parameters of the modalities not in `present`): same value, every
        parameter reached."""
        present = set(present)
        absent = [p for m in self.names if m not in present for p in self.by_modality[m]]
        return loss + sum(p.sum() for p in absent) * 0.0 if absent else loss

    def drop_absent(self, present: Iterable[str], strategy=None) -> None:
        """Gradients of the modalities outside `present` (united over ranks by `strategy.reduce`)
        become None."""
        present = set(present)
        if strategy is not None and len(self.names) > 1:
            flags = torch.tensor(
                [float(m in present) for m in self.names], device=strategy.root_device
            )
            flags = strategy.reduce(flags, reduce_op="sum")
            present = {m for m, flag in zip(self.names, flags.tolist()) if flag > 0}
        for m in self.names:
            if m not in present:
                for p in self.by_modality[m]:
                    p.grad = None
