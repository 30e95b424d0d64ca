"""The Self-Flow objective: dual-timestep flow matching plus EMA self-distillation of features."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from selfflow.flow.dual_timestep import DualLevels, DualTimestepScheduler, check_mask_ratio
from selfflow.flow.path import interpolate, velocity_target
from selfflow.flow.timesteps import TimestepDistribution
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.objectives.ema import EMA
from selfflow.objectives.flow_loss import bucket_sums, masked_mean, token_squared_error
from selfflow.objectives.representation import ProjectionHead, cosine_distance
from selfflow.tokenizers.base import Tokens


def default_layers(depth: int) -> tuple[int, int]:
    """Student and teacher layers at about 0.3 and 0.7 of the depth (8 and 20 of 28)."""
    student = max(1, round(0.3 * depth))
    teacher = min(depth, max(student + 1, round(0.7 * depth)))
    return student, teacher


@dataclass
class ObjectiveOutput:
    loss: Tensor  # scalar: loss_flow + gamma * loss_rep
    loss_flow: Tensor
    loss_rep: Tensor | None  # None when gamma == 0 (no teacher forward)
    flow_bucket_sums: Tensor  # [buckets] flow error summed per noise-level range
    flow_bucket_counts: Tensor  # [buckets]
    levels: DualLevels = field(repr=False)
    num_tokens: int = 0


class SelfFlowObjective(nn.Module):
    """Owns the student (`model`), its EMA teacher and the projection head; computes the training loss.

    mask_ratio: float, or {modality: float} (method defaults: image 0.25, video 0.10, audio 0.50).
    gamma: weight of the representation loss (0 = dual-timestep only; with mask_ratio 0: vanilla flow matching).
    student_layer / teacher_layer: 1-based blocks (None = about 0.3 and 0.7 of the depth).
    class_dropout: probability of replacing a label with the null label, shared by student and teacher.
    attention_separation: block attention between the two noise groups in the student (ablation).
    """

    def __init__(
        self,
        model: SelfFlowTransformer,
        mask_ratio: float | dict[str, float] = 0.25,
        gamma: float = 0.8,
        student_layer: int | None = None,
        teacher_layer: int | None = None,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        timesteps: TimestepDistribution | None = None,
        mask_mode: str = "exact",
        class_dropout: float = 0.1,
        attention_separation: bool = False,
        loss_buckets: int = 4,
    ):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"objective.gamma={gamma} must be >= 0 (0 turns the representation loss off)")
        if not 0.0 <= class_dropout <= 1.0:
            raise ValueError(f"objective.class_dropout={class_dropout} must be in [0, 1]")
        auto_student, auto_teacher = default_layers(model.depth)
        student_layer = auto_student if student_layer is None else student_layer
        teacher_layer = auto_teacher if teacher_layer is None else teacher_layer
        if not 1 <= student_layer < teacher_layer <= model.depth:
            raise ValueError(
                f"objective.student_layer={student_layer} and objective.teacher_layer={teacher_layer} must satisfy "
                f"1 <= student_layer < teacher_layer <= model depth ({model.depth})"
            )
        per_modality = isinstance(mask_ratio, Mapping)
        ratios = dict(mask_ratio) if per_modality else {m: mask_ratio for m in model.token_channels}
        missing = set(model.token_channels) - set(ratios)
        if missing:
            raise ValueError(f"objective.mask_ratio has no value for modalities {sorted(missing)}")
        self.schedulers = {
            m: DualTimestepScheduler(
                check_mask_ratio(float(r), f"objective.mask_ratio.{m}" if per_modality else "objective.mask_ratio"),
                timesteps, mask_mode)
            for m, r in ratios.items()
        }
        self.model = model
        self.teacher = EMA(model, ema_decay, ema_warmup)
        self.head = ProjectionHead(model.width) if gamma > 0 else None
        self.gamma, self.class_dropout = float(gamma), float(class_dropout)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.attention_separation, self.loss_buckets = attention_separation, loss_buckets

    def drop_labels(self, labels: Tensor | None, batch: int, device) -> Tensor:
        """Replace labels with the null label with probability class_dropout (all of them if unconditional)."""
        null = self.model.null_class
        if labels is None or self.model.num_classes == 0:
            return torch.full((batch,), null, dtype=torch.long, device=device)
        drop = torch.rand(batch, device=device) < self.class_dropout
        return torch.where(drop, torch.full_like(labels, null), labels)

    @staticmethod
    def attention_mask(valid: Tensor | None, groups: Tensor | None) -> Tensor | None:
        """[B, 1, N, N] bool: no attention to padding, and (optionally) none across noise groups."""
        if valid is None and groups is None:
            return None
        mask = None
        if groups is not None:
            mask = groups[:, :, None] == groups[:, None, :]
        if valid is not None:
            key_ok = valid[:, None, :].expand(-1, valid.shape[1], -1)
            mask = key_ok if mask is None else mask & key_ok
        return mask[:, None]

    def forward(self, tokens: Tokens, labels: Tensor | None = None) -> ObjectiveOutput:
        x0, valid = tokens.x, tokens.valid  # x0: [B, N, C]
        batch, num_tokens = x0.shape[:2]
        scheduler = self.schedulers[tokens.modality]
        dual = scheduler(batch, num_tokens, valid, device=x0.device)
        x1 = torch.randn_like(x0)  # one shared noise draw for student and teacher
        student_t = dual.per_token  # [B, N]
        labels = self.drop_labels(labels, batch, x0.device)

        groups = dual.index if self.attention_separation and scheduler.mask_ratio > 0 else None
        want_rep = self.gamma > 0
        student = self.model(
            interpolate(x0, x1, student_t), dual.levels, dual.index, tokens.pos, labels, tokens.modality,
            attn_mask=self.attention_mask(valid, groups),
            hidden_layers=(self.student_layer,) if want_rep else (),
        )
        flow_error = token_squared_error(student.velocity, velocity_target(x0, x1))  # [B, N]
        loss_flow = masked_mean(flow_error, valid)
        sums, counts = bucket_sums(flow_error.detach(), student_t, self.loss_buckets, valid)

        loss_rep = None
        loss = loss_flow
        if want_rep:
            with torch.no_grad():
                teacher_t = dual.teacher_levels  # [B]: min(t, s), the cleaner view, on every token
                target = self.teacher.module(
                    interpolate(x0, x1, teacher_t), teacher_t[:, None], None, tokens.pos, labels, tokens.modality,
                    attn_mask=self.attention_mask(valid, None),
                    hidden_layers=(self.teacher_layer,), stop_after=self.teacher_layer,
                ).hidden[self.teacher_layer]
            projected = self.head(student.hidden[self.student_layer])
            loss_rep = masked_mean(cosine_distance(projected, target), valid)
            loss = loss_flow + self.gamma * loss_rep
        return ObjectiveOutput(loss, loss_flow, loss_rep, sums, counts, dual, int(num_tokens))

    def update_teacher(self) -> None:
        """Call after every optimizer step."""
        self.teacher.update(self.model)
