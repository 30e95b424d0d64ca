"""LightningModule: tokenize a batch, apply the Self-Flow objective, optimise, keep the EMA
teacher current."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from selfflow.data.batching.mixture import pack_groups
from selfflow.data.batching.rng_state import capture_rng_state, restore_rng_state
from selfflow.interop.checkpoint import CHECKPOINT_FORMAT
from selfflow.interop.state_check import check_state_fits
from selfflow.objectives.flow_loss import bucket_names
from selfflow.objectives.repa import check_stored_encoder, clean_images
from selfflow.objectives.selfflow import SelfFlowObjective
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokenizers.pretrained import check_stored_fingerprints
from selfflow.tokens import TEXT, Condition, PackedTokens, Tokens
from selfflow.training.distributed import ModalityParameters, is_sharded
from selfflow.training.nonfinite import NonFiniteGuard, uncount_skipped_step
from selfflow.training.schedules import LRSchedule

# metrics logged by training_step / on_before_optimizer_step, i.e. before a checkpoint of that step
# is written
STEP_METRICS = (
    "train/loss",
    "train/loss_flow",
    "train/loss_rep",
    "train/loss_align",
    "train/grad_norm",
)


class SelfFlowModule(L.LightningModule):
    """optimizer: a partial optimizer (e.g. `functools.partial(torch.optim.AdamW, lr=3e-4)`)
    completed with the trainable parameters; lr_schedule: the learning rate per optimizer
    step (None: constant, no warm-up). config: the resolved run config, stored in every checkpoint
    so that sampling and probing can rebuild the model. max_nonfinite_in_a_row: a NaN/inf loss or
    gradient in any micro-batch of an optimizer step (on any rank) skips that update (no optimizer
    step, no EMA update); this many skipped updates in a row stop the run. Checkpoints also carry
    every RNG state, restored before the first step after a resume (exact resume).
    """

    STEP_METRICS = STEP_METRICS

    def __init__(
        self,
        objective: SelfFlowObjective,
        tokenizers: dict[str, Tokenizer],
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_schedule: LRSchedule | None = None,
        config: dict[str, Any] | None = None,
        max_nonfinite_in_a_row: int = 5,
    ):
        super().__init__()
        self.objective = objective
        self.tokenizers = nn.ModuleDict(tokenizers)
        self.optimizer_factory, self.lr_schedule = optimizer, lr_schedule or LRSchedule()
        self.config = config or {}
        buckets = objective.loss_buckets
        self.register_buffer("bucket_sums", torch.zeros(buckets), persistent=False)
        self.register_buffer("bucket_counts", torch.zeros(buckets), persistent=False)
        self._bucket_names = bucket_names(buckets)
        self._last_batch_end: float | None = None
        self.nonfinite = NonFiniteGuard(max_nonfinite_in_a_row)
        self.modality_parameters = ModalityParameters(objective.model)
        self._update_skipped = False
        # the optimizer step being accumulated: its first non-finite loss (value, what) and the
        # modalities it holds
        self._step_nonfinite: tuple[float, str] | None = None
        self._step_modalities: set[str] = set()
        self._rng_to_restore: dict[str, Any] | None = None

    @property
    def model(self):
        return self.objective.model

    @property
    def ema_model(self):
        return self.objective.teacher.module

    def condition(self, batch: dict[str, Any]) -> Condition:
        """What the batch is conditioned on: its labels, its captions encoded by the text tokenizer,
        its size/crop values (packed rows carry their labels inside the packing)."""
        text = (
            self.tokenizers[TEXT].encode(batch["caption"])
            if "caption" in batch and TEXT in self.tokenizers
            else None
        )
        return Condition(labels=batch.get("label"), text=text, sizes=batch.get("sizes"))

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int):
        """The loss of one (micro-)batch. A non-finite loss is still returned, so that every rank
        runs its backward; `on_before_optimizer_step` then skips the whole optimizer step it
        belongs to."""
        if (
            batch is None
        ):  # every file of the batch was unreadable (already reported by the dataset)
            return None
        tokens = self.tokenize(batch)
        images = self.alignment_images(batch, tokens)
        out = self.objective(tokens, self.condition(batch), step=self.global_step, images=images)
        batch_size = tokens.batch_size
        token_counts = modality_token_counts(tokens)
        present = [m for m, count in token_counts.items() if count]
        self._step_modalities.update(present)
        loss = self.modality_parameters.in_graph(out.loss, present)
        value = out.loss.detach().float().item()
        if not math.isfinite(value):
            self._step_nonfinite = self._step_nonfinite or (value, "loss")
            return loss
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch_size)
        self.log("train/loss_flow", out.loss_flow, batch_size=batch_size)
        if out.loss_rep is not None:
            self.log("train/loss_rep", out.loss_rep, prog_bar=True, batch_size=batch_size)
        if out.loss_align is not None:
            self.log("train/loss_align", out.loss_align, prog_bar=True, batch_size=batch_size)
        if (
            self.objective.gamma_schedule.kind != "constant"
        ):  # a constant gamma is in the hyperparameters
            self.log("train/gamma", out.gamma, batch_size=batch_size)
        self.bucket_sums += out.flow_bucket_sums
        self.bucket_counts += out.flow_bucket_counts
        if len(self.data_modalities) > 1:  # joint training: each modality's losses on its own
            for name, losses in out.per_modality.items():
                for key, value in losses.items():
                    self.log(f"train/{name}/{key}", value, batch_size=batch_size)
        self._tokens_by_modality = token_counts
        self._samples_in_batch = batch_size
        return loss

    def alignment_images(self, batch: dict[str, Any], tokens) -> torch.Tensor | None:
        """The clean images REPA's encoder sees (objective=repa), None for the other objectives."""
        wanted = self.objective.alignment is not None and "image" in self.tokenizers
        if not wanted or "data" not in batch:
            return None
        return clean_images(batch["data"], tokens, self.tokenizers["image"])

    @property
    def data_modalities(self) -> list[str]:
        return [m for m in self.tokenizers if m != TEXT]

    def tokenize(self, batch: dict[str, Any]) -> Tokens | PackedTokens:
        """Raw samples (or cached latents) -> tokens: packed rows for a mixed batch."""
        if "groups" in batch:
            return pack_groups(
                batch["groups"], self.tokenizers, batch["pack_length"], self.model.null_class
            )
        return self.tokenizers[batch["modality"]].encode(batch["data"])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # logged here: Lightning drops what a training_step that returned None logged
        self.log("train/nonfinite_skipped", float(self.nonfinite.skipped))
        now = time.perf_counter()
        if self._last_batch_end is not None and batch is not None:
            elapsed = max(now - self._last_batch_end, 1e-9)
            self.log("train/samples_per_s", self._samples_in_batch / elapsed)
            self.log("train/tokens_per_s", sum(self._tokens_by_modality.values()) / elapsed)
            if len(self.data_modalities) > 1:
                for name, count in self._tokens_by_modality.items():
                    self.log(f"train/{name}/tokens_per_s", count / elapsed)
        self._last_batch_end = now
        if self.trainer is None:
            return
        if (
            self._at_last_step()
        ):  # Lightning logs every log_every_n_steps steps, or when the run stops: stop here
            self.trainer.should_stop = True
        if (
            self.global_step % max(1, self.trainer.log_every_n_steps) == 0
            or self.trainer.should_stop
        ):
            self._log_buckets()

    def _at_last_step(self) -> bool:
        """The batch that completed the run's last optimizer step (trainer.max_steps): its metrics
        are always logged, so a run shorter than log_every_n_steps still writes them."""
        return (
            0 < self.trainer.max_steps <= self.global_step
        )  # global_step counts completed optimizer steps

    def _log_buckets(self) -> None:
        counts = self.bucket_counts.clamp_min(1)
        means = (self.bucket_sums / counts).tolist()
        for name, mean, count in zip(self._bucket_names, means, self.bucket_counts.tolist()):
            if count > 0:
                self.log(f"train/loss_flow_t{name}", mean)
        self.bucket_sums.zero_()
        self.bucket_counts.zero_()

    def _usable(self, value: float, what: str) -> bool:
        """False for a NaN/inf value (on any rank): the update is skipped, counted and logged."""
        finite = math.isfinite(value)
        if self.trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        return self.nonfinite.check(value if finite else math.nan, self.global_step, what)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Decide the optimizer step, once for all its micro-batches: it goes ahead only if every
        loss and the gradient norm were finite on every rank."""
        strategy = (
            self.trainer.strategy
            if self.trainer is not None and self.trainer.world_size > 1
            else None
        )
        self.modality_parameters.drop_absent(self._step_modalities, strategy)
        params = [p for p in self.objective.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else None
        value, what = self._step_nonfinite or (
            0.0 if norm is None else float(norm),
            "gradient norm",
        )
        self._update_skipped = not self._usable(value, what) or norm is None
        if self._update_skipped:
            for (
                p
            ) in params:  # no gradient: the optimizer leaves these parameters (and its state) alone
                p.grad = None
            return
        self.log("train/grad_norm", norm)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Lightning's norm clipping refuses FSDP; there the wrapped model clips by the norm over
        all shards."""
        if gradient_clip_val and is_sharded(self.trainer):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(
            *args, **kwargs
        )  # runs training_step and backward through the closure
        if not self._update_skipped:
            self.objective.update_teacher()
        elif self.trainer is not None:  # a skipped update is no step: global_step and the LR stay
            uncount_skipped_step(self.trainer)
        self._step_nonfinite, self._step_modalities = None, set()

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """The schedule follows completed updates: a skipped one leaves the learning rate where it
        was."""
        if not self._update_skipped:
            super().lr_scheduler_step(scheduler, metric)

    def configure_optimizers(self):
        params = [p for p in self.objective.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        for base_lr in base_lrs:
            self.lr_schedule.check_base_lr(base_lr)
        # closures (not the schedule object), so that LambdaLR's state holds the step only: a
        # resumed run follows the schedule of its config at that step
        factors = [lambda step, base=base: self.lr_schedule.factor(step, base) for base in base_lrs]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["selfflow_format"] = CHECKPOINT_FORMAT
        checkpoint["selfflow_config"] = self.config
        checkpoint["selfflow_rng"] = capture_rng_state()
        checkpoint["selfflow_training"] = {
            "nonfinite": self.nonfinite.state_dict(),
            "bucket_sums": self.bucket_sums.cpu(),
            "bucket_counts": self.bucket_counts.cpu(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture by name; keep its RNG states for the first
        resumed step."""
        source = "the checkpoint to resume from"
        check_state_fits(self.state_dict(), checkpoint.get("state_dict", {}), source)
        check_stored_fingerprints(dict(self.tokenizers), checkpoint.get("selfflow_config"), source)
        check_stored_encoder(self.objective.alignment, checkpoint.get("selfflow_config"), source)
        self._rng_to_restore = checkpoint.get("selfflow_rng")
        training = checkpoint.get("selfflow_training") or {}
        self.nonfinite.load_state_dict(training.get("nonfinite", {}))
        if "bucket_sums" in training and training["bucket_sums"].shape == self.bucket_sums.shape:
            self.bucket_sums.copy_(training["bucket_sums"])
            self.bucket_counts.copy_(training["bucket_counts"])

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
            if (
                self.trainer.world_size > 1
            ):  # only rank 0's states were saved: give each rank its own stream again
                torch.manual_seed(int(torch.randint(2**62, ())) + self.trainer.global_rank)


def modality_token_counts(tokens: Tokens | PackedTokens) -> dict[str, int]:
    """Data tokens of each modality in a batch (padding not counted), as the batch answers."""
    every = tokens.x.shape[0] * tokens.x.shape[1]  # a mask of None: every token of the batch
    masks = tokens.modalities.masks.items()
    return {m: every if sel is None else int(sel.sum()) for m, sel in masks}
