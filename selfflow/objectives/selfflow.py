"""The Self-Flow objective: dual-timestep flow matching plus EMA self-distillation of features."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from selfflow.flow.dual_timestep import DualLevels, DualTimestepScheduler, check_mask_ratio
from selfflow.flow.path import interpolate, velocity_target
from selfflow.flow.timesteps import TimestepDistribution
from selfflow.models.attention import GroupMask
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.objectives.ema import EMA
from selfflow.objectives.flow_loss import bucket_sums, masked_mean, own_channels, token_squared_error
from selfflow.objectives.gamma_schedule import GammaSchedule
from selfflow.objectives.repa import token_grid
from selfflow.objectives.representation import ProjectionHead, cosine_distance
from selfflow.tokens import Condition, PackedTokens, Tokens, as_segments


def sampling_weights_name(decay: float) -> str:
    """`ema_<decay>`: how `weights=` names an extra sampling EMA (e.g. ema_0.9999).

    Args:
        decay: The EMA's decay.

    Returns:
        The name `weights=` takes.
    """
    return f"ema_{float(decay)!r}"


def sampling_ema_key(name: str) -> str:
    """The module key of a sampling EMA named `name` (module names cannot hold dots): ema_0.9999 -> ema_0_9999.

    Args:
        name: The EMA's name, `ema_<decay>`.

    Returns:
        The name with its dots replaced by underscores.
    """
    return name.replace(".", "_")


def default_layers(depth: int) -> tuple[int, int]:
    """Student and teacher layers at about 0.3 and 0.7 of the depth (8 and 20 of 28).

    Args:
        depth: The model's blocks.

    Returns:
        (student layer, teacher layer), 1-based, the student's before the teacher's.
    """
    student = max(1, round(0.3 * depth))
    teacher = min(depth, max(student + 1, round(0.7 * depth)))
    return student, teacher


@dataclass
class ObjectiveOutput:
    """The losses of one training step and what the logs show of it.

    Attributes:
        loss: The scalar to minimise, loss_flow + gamma * loss_rep.
        loss_flow: The flow-matching loss over the data tokens.
        loss_rep: The representation loss; None when gamma == 0 (no teacher forward).
        gamma: The representation loss weight at this step (objective.gamma times its schedule).
        flow_bucket_sums: [buckets] flow error summed per noise-level range.
        flow_bucket_counts: [buckets] tokens per noise-level range.
        levels: The step's dual-timestep levels and mask.
        per_modality: Modality -> its detached losses, for logging.
    """

    loss: Tensor  # scalar: loss_flow + gamma * loss_rep
    loss_flow: Tensor
    loss_rep: Tensor | None  # None when gamma == 0 (no teacher forward)
    gamma: float  # the representation loss weight at this step (objective.gamma times its schedule)
    flow_bucket_sums: Tensor  # [buckets] flow error summed per noise-level range
    flow_bucket_counts: Tensor  # [buckets]
    levels: DualLevels = field(repr=False)
    per_modality: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # detached, for logging
    loss_align: Tensor | None = None  # REPA's alignment loss (objective.alignment), None without it


class SelfFlowObjective(nn.Module):
    """Owns the student (`model`), its EMA teacher and the projection head; computes the training loss.

    mask_ratio: float, or {modality: float} (method defaults: image 0.25, video 0.10, audio 0.50).
    gamma: weight of the representation loss (0 = dual-timestep only; with mask_ratio 0: vanilla flow matching).
    student_layer / teacher_layer: 1-based blocks (None = about 0.3 and 0.7 of the depth).
    class_dropout: probability of replacing a label with the null label, shared by student and teacher.
    attention_separation: block attention between the two noise groups in the student (ablation); with text, each
    group attends to its own copy of the text tokens.
    loss_weights: {modality: weight} on the per-token losses (joint training; default 1).
    caption_dropout: probability of replacing a caption with the null text (classifier-free guidance), shared by
    student and teacher like the label dropout. Text tokens are never noised and the losses cover data tokens only.
    gamma_schedule: gamma over training (a factor of it per optimizer step; None: constant).
    sampling_ema_decays: extra EMAs of the student, one full model copy each (no gradient, no optimizer state),
    updated with the teacher and read as `weights=ema_<decay>` by selfflow-sample and selfflow-probe: a slower EMA
    to sample from than the teacher the method needs.
    alignment: REPA's alignment to an external encoder (`selfflow.objectives.repa.REPAAlignment`,
    built with the model's width and depth and `encoder`); `forward` then needs the batch's clean
    images (objective=repa).
    encoder: the local folder of REPA's encoder (read only with `alignment`, so that one sweep over
    the objectives can name it for all).
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
        loss_weights: dict[str, float] | None = None,
        caption_dropout: float = 0.1,
        gamma_schedule: GammaSchedule | None = None,
        sampling_ema_decays: tuple[float, ...] | list[float] = (),
        alignment: Callable[..., nn.Module] | None = None,
        encoder: str | None = None,
    ):
        """Build the teacher, the head and the scheduler around `model`.

        Args:
            model: The student.
            mask_ratio: One ratio in [0, 0.5], or one per modality.
            gamma: Weight of the representation loss (>= 0).
            student_layer: 1-based block whose output the head projects; None for about 0.3 of the
                depth.
            teacher_layer: 1-based teacher block it is compared with; None for about 0.7 of the
                depth.
            ema_decay: The teacher's EMA decay.
            ema_warmup: Warm the decay up over the first updates.
            timesteps: The distribution p(t) both levels are drawn from; None for uniform.
            mask_mode: `exact` or `bernoulli` masking.
            class_dropout: Probability of dropping a label (classifier-free guidance).
            attention_separation: Block attention between the two noise groups (ablation).
            loss_buckets: Noise-level ranges the flow loss is logged in.
            loss_weights: Modality -> weight of its per-token losses; None for 1 each.
            caption_dropout: Probability of dropping a caption.
            gamma_schedule: Gamma over training; None for constant.
            sampling_ema_decays: Decays of extra EMAs of the student to sample from.

        Raises:
            ValueError: A value out of range, layers not 1 <= student < teacher <= depth, a modality
                without a mask ratio, or a repeated sampling EMA decay.
        """
        super().__init__()
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
            raise ValueError(
                f"objective.gamma={gamma} must be one number >= 0 (0 turns the representation "
                "loss off; to change it over training set objective.gamma_schedule.kind)"
            )
        if not 0.0 <= class_dropout <= 1.0:
            raise ValueError(f"objective.class_dropout={class_dropout} must be in [0, 1]")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"objective.caption_dropout={caption_dropout} must be in [0, 1]")
        if isinstance(loss_buckets, bool) or not isinstance(loss_buckets, int) or loss_buckets < 1:
            raise ValueError(f"objective.loss_buckets={loss_buckets!r} must be an integer >= 1")
        self.caption_dropout = float(caption_dropout)
        auto_student, auto_teacher = default_layers(model.depth)
        student_layer = auto_student if student_layer is None else student_layer
        teacher_layer = auto_teacher if teacher_layer is None else teacher_layer
        if not 1 <= student_layer < teacher_layer <= model.depth:
            raise ValueError(
                f"objective.student_layer={student_layer} and objective.teacher_layer={teacher_layer} must satisfy "
                f"1 <= student_layer < teacher_layer <= model depth ({model.depth})"
            )
        per_modality = isinstance(mask_ratio, Mapping)
        ratios = dict(mask_ratio) if per_modality else dict.fromkeys(model.token_channels, mask_ratio)
        missing = set(model.token_channels) - set(ratios)
        if missing:
            raise ValueError(f"objective.mask_ratio has no value for modalities {sorted(missing)}")
        self.mask_ratios = {
            m: check_mask_ratio(r, f"objective.mask_ratio.{m}" if per_modality else "objective.mask_ratio")
            for m, r in ratios.items()
        }
        self.scheduler = DualTimestepScheduler(max(self.mask_ratios.values()), timesteps, mask_mode)
        self.loss_weights = {m: float(w) for m, w in (loss_weights or {}).items()}
        negative = {m: w for m, w in self.loss_weights.items() if w < 0}
        if negative:
            raise ValueError(f"objective.loss_weights must be >= 0, got {negative}")
        self.model = model
        self.teacher = EMA(model, ema_decay, ema_warmup)
        names = [sampling_weights_name(d) for d in sampling_ema_decays]
        if len(set(names)) < len(names):
            raise ValueError(
                f"objective.sampling_ema_decays={list(sampling_ema_decays)} repeats a decay; list each once"
            )
        self.sampling_emas = nn.ModuleDict(
            {
                sampling_ema_key(name): EMA(model, float(d), ema_warmup, key="objective.sampling_ema_decays")
                for name, d in zip(names, sampling_ema_decays)
            }
        )
        self.gamma_schedule = gamma_schedule or GammaSchedule()
        self.head = ProjectionHead(model.width) if gamma > 0 else None
        self.gamma, self.class_dropout = float(gamma), float(class_dropout)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.attention_separation, self.loss_buckets = attention_separation, loss_buckets
        self.alignment = None
        if alignment is not None:
            if not encoder:
                raise ValueError(
                    "objective=repa needs objective.encoder=DIR: a local folder with a "
                    "transformers Dinov2Model (save_pretrained); nothing is downloaded"
                )
            self.alignment = alignment(width=model.width, depth=model.depth, encoder=encoder)

    def drop_condition(self, condition: Condition, samples: tuple[int, int], device) -> Condition:
        """Classifier-free guidance dropout, drawn once and shared by the student and the teacher: each sample's label
        ([R, S] samples) with probability class_dropout (all of them for an unconditional model), each caption with
        probability caption_dropout.

        Args:
            condition: The batch's condition, labels per sample [R, S].
            samples: (R, S), the shape of the label draw.
            device (torch.device | str): Where the draw is made.

        Returns:
            The condition with the dropped labels and captions replaced by their null.
        """
        if condition.labels is None or self.model.num_classes == 0:
            condition = replace(condition, labels=None)  # the model's null class
        else:
            condition = condition.drop(torch.rand(samples, device=device) < self.class_dropout, only="labels")
        if condition.text is not None and self.caption_dropout > 0:
            rows = torch.rand(condition.text.batch_size, device=condition.text.valid.device) < self.caption_dropout
            condition = condition.drop(rows, only="text")
        return condition

    @staticmethod
    def attention_mask(groups: Tensor | None, contiguous: bool = True) -> GroupMask | None:
        """groups: [B, N] long, -1 on padding: tokens attend within their own group only (None: no blocking).

        Args:
            groups: [B, N] long group of each token, -1 on padding; None for full attention.
            contiguous: Whether each group's tokens are consecutive (lets flash-attn's varlen kernel
                run).

        Returns:
            The attention mask, or None.
        """
        return None if groups is None else GroupMask(groups, contiguous)

    def _layout(self, tokens: Tokens | PackedTokens, labels: Tensor | None):
        """Segments, per-sample labels [R, S] (None: unlabelled), mask ratios [R, S], per-token loss weights, the
        modality (or masks) and the per-token channel counts [R, N] of a batch (None when every token has all C
        channels)."""
        if isinstance(tokens, PackedTokens):
            ratios = torch.tensor(
                [
                    [self.mask_ratios[m] for m in row] + [0.0] * (tokens.num_segments - len(row))
                    for row in tokens.segment_modality
                ],
                device=tokens.x.device,
            )
            weights = sum(sel * self.loss_weights.get(m, 1.0) for m, sel in tokens.modality_masks.items())
            channels = sum(sel * tokens.channels[m] for m, sel in tokens.modality_masks.items())  # 0 on padding
            return tokens.segment, tokens.segment_labels, ratios, weights, tokens.modality_masks, channels
        segment = as_segments(tokens)
        ratios = torch.full((segment.shape[0], 1), self.mask_ratios[tokens.modality], device=tokens.x.device)
        per_sample = None if labels is None else labels[:, None]
        return segment, per_sample, ratios, self.loss_weights.get(tokens.modality, 1.0), tokens.modality, None

    def gamma_at(self, step: int | None) -> float:
        """The representation loss weight at optimizer step `step` (None: objective.gamma, unscheduled).

        Args:
            step: The optimizer step; None for the unscheduled gamma.

        Returns:
            objective.gamma times its schedule at `step`.
        """
        return self.gamma if step is None else self.gamma * self.gamma_schedule(step)

    def forward(
        self,
        tokens: Tokens | PackedTokens,
        condition: Condition | None = None,
        step: int | None = None,
        images: Tensor | None = None,
    ) -> ObjectiveOutput:
        """tokens: a padded batch of one modality or packed rows; condition: the batch's labels ([B]; packed rows
        carry theirs inside the packing), captions and size conditioning (None: unconditional); step: the optimizer
        step, for the gamma schedule; images: the clean images [B, C, H, W] in [0, 1] (REPA's
        alignment)."""
        condition = condition or Condition()
        x0 = tokens.x  # [R, N, C]
        packed = isinstance(tokens, PackedTokens)
        if packed and (condition.text is not None or condition.sizes is not None):
            raise ValueError("text and size conditioning work with padded batches; turn data packing off")
        segment, sample_labels, ratios, weights, modality, channels = self._layout(tokens, condition.labels)
        valid = segment >= 0 if (packed or tokens.valid is not None) else None
        num_samples = ratios.shape[1]
        dual = self.scheduler.for_segments(segment, num_samples, ratios)
        x1 = torch.randn_like(x0)  # one shared noise draw for student and teacher
        if channels is not None:  # packed rows: noise on each token's own channels only, the zero padding stays zero
            x1 = torch.where(own_channels(channels, x0.shape[-1]), x1, 0.0)
        student_t = dual.per_token  # [R, N]
        # labels per sample [R, S]; dropped once, shared by student and teacher
        condition = self.drop_condition(replace(condition, labels=sample_labels), tuple(ratios.shape), x0.device)

        # attention stays within a sample (packed rows), within a noise group (the separation ablation), and away
        # from padding; None when nothing needs blocking
        sample_groups = self.attention_mask(segment if valid is not None else None)
        groups = sample_groups
        if self.attention_separation and float(ratios.max()) > 0:
            groups = self.attention_mask(torch.where(segment >= 0, dual.index, -1), contiguous=False)
        want_rep = self.gamma > 0
        student = self.model(
            interpolate(x0, x1, student_t),
            dual.levels,
            dual.index,
            tokens.pos,
            condition,
            modality,
            attn_mask=groups,
            hidden_layers=self._hidden_layers(want_rep),
        )
        flow_error = token_squared_error(student.velocity, velocity_target(x0, x1), channels)  # [R, N]
        loss_flow = masked_mean(flow_error * weights, valid)
        sums, counts = bucket_sums(flow_error.detach(), student_t, self.loss_buckets, valid)

        loss_rep, rep_error = None, None
        loss, gamma = loss_flow, self.gamma_at(step)
        if want_rep:
            with torch.no_grad():
                teacher_t = dual.teacher_per_token  # [R, N]: min(t, s) of each token's sample, the cleaner view
                target = self.teacher.module(
                    interpolate(x0, x1, teacher_t),
                    dual.teacher_levels,
                    segment.clamp_min(0) if packed else None,
                    tokens.pos,
                    condition,
                    modality,
                    attn_mask=sample_groups,
                    hidden_layers=(self.teacher_layer,),
                    stop_after=self.teacher_layer,
                ).hidden[self.teacher_layer]
            rep_error = cosine_distance(self.head(student.hidden[self.student_layer]), target)  # [R, N]
            loss_rep = masked_mean(rep_error * weights, valid)
            loss = loss_flow + gamma * loss_rep
        loss_align = self._alignment_loss(student.hidden, tokens, images)
        if loss_align is not None:
            loss = loss + self.alignment.weight * loss_align
        per_modality = self._per_modality(
            flow_error.detach(), None if rep_error is None else rep_error.detach(), modality, valid
        )
        parts = (loss, loss_flow, loss_rep, gamma, sums, counts, dual, per_modality, loss_align)
        return ObjectiveOutput(*parts)

    def _hidden_layers(self, want_rep: bool) -> tuple[int, ...]:
        """The student blocks whose outputs the losses read: Self-Flow's and REPA's layers."""
        layers = (self.student_layer,) if want_rep else ()
        if self.alignment is not None and self.alignment.layer not in layers:
            layers = (*layers, self.alignment.layer)
        return layers

    def _alignment_loss(self, hidden: dict, tokens, images: Tensor | None) -> Tensor | None:
        """REPA's loss, mean over tokens and samples (None without objective.alignment)."""
        if self.alignment is None:
            return None
        packed = isinstance(tokens, PackedTokens)
        if packed or tokens.modality != "image" or tokens.valid is not None:
            raise ValueError(
                "objective=repa aligns image tokens of unpacked batches; train on image data "
                "without packing or buckets (REPA for video and audio: docs/results.md)"
            )
        if images is None:
            raise ValueError(
                "objective=repa needs the batch's clean images: pass images=[B, C, H, W]",
            )
        return self.alignment(hidden[self.alignment.layer], images, token_grid(tokens)).mean()

    @staticmethod
    def _per_modality(flow_error: Tensor, rep_error: Tensor | None, modality, valid: Tensor | None) -> dict:
        """{modality: {"loss_flow": ..., "loss_rep": ...}} over each modality's tokens."""
        selections = {modality: valid} if isinstance(modality, str) else modality
        out = {}
        for name, sel in selections.items():
            if sel is not None and not bool(sel.any()):
                continue
            out[name] = {"loss_flow": masked_mean(flow_error, sel)}
            if rep_error is not None:
                out[name]["loss_rep"] = masked_mean(rep_error, sel)
        return out

    def update_teacher(self) -> None:
        """Call after every optimizer step: the teacher and the sampling EMAs follow the student."""
        for ema in (self.teacher, *self.sampling_emas.values()):
            ema.update(self.model)
